"""Direct decoding of the Zarr v3 arrays this package writes, without zarr's async machinery.

Why: zarr's generic read path (asyncio loop thread, per-chunk coroutines, buffer
prototypes) costs about as much as the actual decompression for our few-MB chunks.  The
arrays we write use a tiny subset of Zarr v3 — regular chunk grid, default "/" chunk keys,
`transpose`, `kdcache.gridq` or `numcodecs.*` array-to-array filters, `bytes`,
`blosc`/`zstd`, and a final `crc32c` — so this module decodes exactly that subset straight
from `zarr.json` and returns None for anything else, in which case the caller falls back to
zarr.  It never guesses: every step comes from the metadata, and the tests check it equals
zarr's own decoding.  A chunk whose crc32c does not match, or that cannot be decoded, raises
`ChunkError` naming the chunk's key (the reader adds the store and shard).

Speed: chunks are decompressed straight into place and a `kdcache.gridq` array is
dequantised by one fused numpy op into a preallocated float32 buffer; `decode_grid` returns
the integer grid indices instead, which is how `ref_topk_logprobs` is rebuilt exactly from
the `topk_adv` array.  blosc/zstd and the numpy loops release the GIL, so the reader decodes
a shard's arrays in threads.
"""

from __future__ import annotations

import json
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from .codecs import GRIDQ, IDMAP, grid_ints, id_decode, unpack_table

__all__ = ["decode_array", "decode_grid", "array_meta", "ChunkError"]


class ChunkError(ValueError):
    """A chunk failed its crc32c check or could not be decoded; `key` names it."""

    def __init__(self, key: str, what: str, checksum: bool = False) -> None:
        super().__init__(f"{key} {what}")
        self.key = key
        self.what = what
        self.checksum = checksum  # True: the crc32c did not match (corrupted bytes)

_DTYPES = {"float32": "f4", "float64": "f8", "int32": "i4", "int64": "i8", "int16": "i2",
           "uint8": "u1", "uint16": "u2", "uint32": "u4", "bool": "?", "int8": "i1"}


class _Plan:
    """What decoding one array takes, read from its zarr.json (None-able via `plan`)."""

    def __init__(self, name: str, meta: dict[str, Any]) -> None:
        self.name = name
        self.meta = meta
        self.dtype = np.dtype(_DTYPES[meta["data_type"]])
        self.shape = tuple(meta["shape"])
        self.chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.fill = meta.get("fill_value", 0)
        self.filters: list[Any] = []  # numcodecs array→array filters (v2 stores)
        self.compressors: list[Any] = []
        self.transpose: tuple[int, ...] | None = None
        self.gridq: dict[str, Any] | None = None
        self.idmap: np.ndarray | None = None  # code → id table (kdcache.idmap)
        self.idmap_dtype = np.dtype("u2")
        self.endian = "little"
        self.crc32c = False  # chunks end in 4 bytes of crc32c (little endian)


def _plan(name: str, meta: dict[str, Any]) -> _Plan | None:
    if (meta.get("zarr_format") != 3 or meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("storage_transformers")
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"
            or meta["data_type"] not in _DTYPES):
        return None
    p = _Plan(name, meta)
    if len(p.shape) not in (1, 2) or (len(p.shape) == 2 and p.chunk[1] != p.shape[1]):
        return None
    seen_bytes = False
    for i, c in enumerate(meta["codecs"]):
        cname, cfg = c["name"], dict(c.get("configuration", {}))
        if p.crc32c:  # crc32c must be the last codec (it checksums the stored bytes)
            return None
        if cname == "crc32c" and seen_bytes:
            p.crc32c = True
        elif cname == "bytes":
            p.endian = cfg.get("endian", "little")
            seen_bytes = True
        elif seen_bytes and cname == "blosc":
            p.compressors.append(numcodecs.Blosc())  # blosc frames are self-describing
        elif seen_bytes and cname == "zstd":
            p.compressors.append(numcodecs.Zstd())
        elif seen_bytes:
            return None
        elif cname == GRIDQ and i == 0 and p.dtype == np.float32:
            p.gridq = cfg
        elif cname == IDMAP and i == 0 and p.dtype == np.int32 and cfg.get("dtype") in (
                "uint16", "int32"):
            p.idmap = unpack_table(cfg["table"], list(cfg["classes"]))
            p.idmap_dtype = np.dtype("u2" if cfg["dtype"] == "uint16" else "i4")
        elif (cname == "transpose" and len(p.shape) == 2 and tuple(cfg["order"]) == (1, 0)
              and p.transpose is None and not p.filters and p.idmap is None):
            p.transpose = (1, 0)
        elif (cname in ("numcodecs.fixedscaleoffset", "numcodecs.delta") and p.gridq is None
              and p.transpose is None and p.idmap is None):
            p.filters.append(numcodecs.get_codec({"id": cname.split(".", 1)[1], **cfg}))
        else:
            return None
    if not seen_bytes:
        return None
    return p


def array_meta(files: dict[str, bytes], name: str) -> dict[str, Any] | None:
    raw = files.get(f"{name}/zarr.json")
    return None if raw is None else json.loads(raw)


def _chunks(p: _Plan, files: dict[str, bytes], check: bool = True):
    """Yield (lo, hi, encoded-side array or None for a fill chunk) per chunk."""
    if p.gridq is not None:
        inner = np.dtype("i4")
    elif p.idmap is not None:
        inner = p.idmap_dtype
    elif p.filters:  # the dtype the first filter *produces* is what `bytes` serialised
        inner = np.dtype(getattr(p.filters[-1], "astype", None) or p.filters[-1].dtype)
    else:
        inner = p.dtype
    inner = inner.newbyteorder("<" if p.endian == "little" else ">")
    n_chunks = -(-p.shape[0] // p.chunk[0]) if p.shape[0] else 0
    enc_shape = p.chunk[::-1] if p.transpose else p.chunk
    for i in range(n_chunks):
        key = f"{p.name}/c/{i}" + ("/0" if len(p.shape) == 2 else "")
        lo, hi = i * p.chunk[0], min((i + 1) * p.chunk[0], p.shape[0])
        raw = files.get(key)
        if raw is None:
            yield lo, hi, None
            continue
        buf: Any = raw
        if p.crc32c and not check:  # benchmarks only: what the check costs
            buf = np.frombuffer(raw, dtype=np.uint8)[:-4]
        elif p.crc32c:
            # a numpy view: google_crc32c takes it without a copy (not a memoryview)
            u8 = np.frombuffer(raw, dtype=np.uint8)
            if len(u8) < 4 or google_crc32c.value(u8[:-4]) != int.from_bytes(u8[-4:], "little"):
                raise ChunkError(key, "failed its crc32c check (corrupted bytes)", True)
            buf = u8[:-4]
        try:
            for c in reversed(p.compressors):
                buf = c.decode(buf)
            arr = np.frombuffer(buf, dtype=inner)
            if not p.filters:
                arr = arr.reshape(enc_shape)
                if p.transpose:
                    arr = arr.T
        except Exception as e:  # corrupt bytes in a store without checksums
            raise ChunkError(key, f"cannot be decoded ({type(e).__name__}: {e})") from None
        yield lo, hi, arr


def _key(p: _Plan, lo: int) -> str:
    return f"{p.name}/c/{lo // p.chunk[0]}" + ("/0" if len(p.shape) == 2 else "")


def decode_array(files: dict[str, bytes], name: str, check: bool = True) -> np.ndarray | None:
    """Decode array `name` from a {key: bytes} map of a zarr v3 group, or None if unsupported.

    Each chunk's crc32c (when the chain declares one) is checked unless `check=False`
    (benchmarks only, to measure what the check costs)."""
    meta = array_meta(files, name)
    p = None if meta is None else _plan(name, meta)
    if p is None:
        return None
    out = np.empty(p.shape, dtype=p.dtype)
    g = p.gridq
    scale = None if g is None else np.float32(int(g.get("sign", 1)) * float(g["step"]))
    for lo, hi, arr in _chunks(p, files, check):
        dst = out[lo:hi]
        if arr is None:
            dst[...] = p.fill
        elif p.idmap is not None:
            try:
                id_decode(arr[: hi - lo], p.idmap, out=dst)
            except ValueError as e:
                raise ChunkError(_key(p, lo), f"cannot be decoded ({e})") from None
        elif g is not None:
            q = grid_ints(arr[: hi - lo], bool(g.get("delta")), bool(g.get("zigzag")))
            np.multiply(q, scale, out=dst, casting="unsafe")
        elif p.filters:
            for f in reversed(p.filters):
                arr = f.decode(arr)
            arr = np.asarray(arr)
            arr = arr.view(p.dtype) if arr.dtype == p.dtype else arr.astype(p.dtype)
            dst[...] = arr.reshape(p.chunk)[: hi - lo]
        else:
            dst[...] = arr[: hi - lo]
    return out


def decode_grid(files: dict[str, bytes], name: str,
                check: bool = True) -> tuple[np.ndarray, float] | None:
    """(sign·q as int32, sign·step) of a `kdcache.gridq` array; None for anything else.

    The float32 values are `float32(ints) · float32(sign·step)`, exactly what
    `decode_array` returns.
    """
    meta = array_meta(files, name)
    p = None if meta is None else _plan(name, meta)
    if p is None or p.gridq is None:
        return None
    g = p.gridq
    out = np.empty(p.shape, dtype=np.int32)
    for lo, hi, arr in _chunks(p, files, check):
        if arr is None:  # the fill value 0.0 is the grid index 0
            out[lo:hi] = 0
        else:
            grid_ints(arr[: hi - lo], bool(g.get("delta")), bool(g.get("zigzag")), out[lo:hi])
    return out, int(g.get("sign", 1)) * float(g["step"])
