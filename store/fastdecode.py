"""Direct decoding of the Zarr v3 arrays this package writes, without zarr's async machinery.

Why: zarr's generic read path (asyncio loop thread, per-chunk coroutines, buffer
prototypes) costs about as much as the actual decompression for our few-MB chunks.  The
arrays we write use a tiny subset of Zarr v3 — regular chunk grid, default "/" chunk keys,
`numcodecs.*` array-to-array filters, `bytes`, and `blosc`/`zstd` — so this module decodes
exactly that subset straight from `zarr.json` and returns None for anything else, in which
case the caller falls back to zarr.  It never guesses: every step comes from the metadata,
and the tests check it equals zarr's own decoding.
"""

from __future__ import annotations

import json
from typing import Any

import numcodecs
import numpy as np

__all__ = ["decode_array"]

_DTYPES = {"float32": "f4", "float64": "f8", "int32": "i4", "int64": "i8", "int16": "i2",
           "uint8": "u1", "uint16": "u2", "uint32": "u4", "bool": "?", "int8": "i1"}


def _pipeline(codecs: list[dict[str, Any]], dtype: np.dtype) -> tuple[list, list, str] | None:
    """Split codecs into (array→array filters, bytes→bytes compressors, endian) or None."""
    filters, compressors, endian, seen_bytes = [], [], "little", False
    for c in codecs:
        name, cfg = c["name"], dict(c.get("configuration", {}))
        if name == "bytes":
            endian = cfg.get("endian", "little")
            seen_bytes = True
        elif name in ("numcodecs.fixedscaleoffset", "numcodecs.delta") and not seen_bytes:
            filters.append(numcodecs.get_codec({"id": name.split(".", 1)[1], **cfg}))
        elif name == "blosc" and seen_bytes:
            compressors.append(numcodecs.Blosc())  # blosc frames are self-describing
        elif name == "zstd" and seen_bytes:
            compressors.append(numcodecs.Zstd())
        else:
            return None
    return (filters, compressors, endian) if seen_bytes else None


def decode_array(files: dict[str, bytes], name: str) -> np.ndarray | None:
    """Decode array `name` from a {key: bytes} map of a zarr v3 group, or None if unsupported."""
    meta = json.loads(files[f"{name}/zarr.json"])
    if (meta.get("zarr_format") != 3 or meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("storage_transformers")
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"
            or meta["data_type"] not in _DTYPES):
        return None
    dtype = np.dtype(_DTYPES[meta["data_type"]])
    pipe = _pipeline(meta["codecs"], dtype)
    if pipe is None:
        return None
    filters, compressors, endian = pipe
    shape = tuple(meta["shape"])
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    if len(shape) not in (1, 2) or (len(shape) == 2 and chunk[1] != shape[1]):
        return None
    out = np.empty(shape, dtype=dtype)
    fill = meta.get("fill_value", 0)
    wire = dtype.newbyteorder("<" if endian == "little" else ">")
    n_chunks = -(-shape[0] // chunk[0]) if shape[0] else 0
    for i in range(n_chunks):
        key = f"{name}/c/{i}" + ("/0" if len(shape) == 2 else "")
        lo, hi = i * chunk[0], min((i + 1) * chunk[0], shape[0])
        raw = files.get(key)
        if raw is None:
            out[lo:hi] = fill
            continue
        buf: Any = raw
        for c in reversed(compressors):
            buf = c.decode(buf)
        # the dtype the first filter *produces* is what the bytes codec serialised
        inner = np.dtype(getattr(filters[-1], "astype", None) or filters[-1].dtype) \
            if filters else dtype
        arr = np.frombuffer(buf, dtype=inner.newbyteorder(wire.byteorder))
        for f in reversed(filters):
            arr = f.decode(arr)
        arr = np.asarray(arr).view(dtype) if np.asarray(arr).dtype == dtype else \
            np.asarray(arr).astype(dtype)
        out[lo:hi] = arr.reshape(chunk)[: hi - lo]
    return out
