"""Direct decoding of the Zarr v3 arrays this package writes, without zarr's async machinery.

Why: zarr's generic read path (asyncio loop thread, per-chunk coroutines, buffer
prototypes) costs about as much as the actual decompression for our few-MB chunks.  The
arrays we write use a tiny subset of Zarr v3 — regular chunk grid, default "/" chunk keys,
`transpose`, `kdcache.gridq` or `numcodecs.*` array-to-array filters, `bytes`,
`blosc`/`zstd`, and a final `crc32c` — so this module decodes exactly that subset straight
from `zarr.json` and returns None for anything else, which the reader refuses (a store is
untrusted input: zarr's generic codecs would decompress whatever a frame declares).  With
an `Expect` from the manifest, shapes, chunk shapes and id tables are checked before
anything is allocated, and every frame must state exactly its chunk's size.  It never
guesses: every step comes from the metadata, and the tests check it equals
zarr's own decoding.  A chunk whose crc32c does not match, or that cannot be decoded, raises
`ChunkError` naming the chunk's key (the reader adds the store and shard).

Speed (benchmarks/results/store.md): after decompression, every per-element step — the
id table lookup, the grid's zigzag / cumulative sum / scaling, and the rebuild of
`ref_topk_logprobs` from `topk_adv` (`decode_topk_ref`) — runs over blocks of about
`codecs.BLOCK_ELEMS` elements, so a block's intermediates stay in the core's L2 cache instead of
streaming shard-sized temporaries through memory once per step.  `decode_grid` returns the
integer grid indices (the plain, unblocked reference the tests compare against).
blosc/zstd and the numpy loops release the GIL, so the reader can decode a shard's arrays
in threads when it has more than one core.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from . import codecs
from ._io import load_json
from .codecs import GRIDQ, IDMAP, grid_ints, id_decode, unpack_table

__all__ = ["decode_array", "decode_grid", "decode_topk_ref", "grid_config", "array_meta",
           "ChunkError", "Expect", "check_layout"]


@dataclass(frozen=True)
class Expect:
    """What the manifest says a shard's arrays hold: {array: shape} and the vocabulary size
    (None: not recorded).  A zarr.json that declares anything else is refused before any
    memory is allocated for it: a crafted store cannot size the reader's buffers."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    vocab: int | None = None


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


def _bad(name: str, what: str) -> ChunkError:
    return ChunkError(f"{name}/zarr.json", what)


def _check_grid(p: _Plan, want: tuple[int, ...] | None) -> None:
    """Shape and chunk shape against the manifest (`want`), before anything is allocated."""
    if want is not None and p.shape != tuple(want):
        raise _bad(p.name, f"declares shape {list(p.shape)[:4]}, but the manifest implies "
                           f"{list(want)} (crafted or corrupt metadata)")
    rows = p.shape[0] if p.shape else 0
    if len(p.chunk) != len(p.shape) or any(not isinstance(c, int) or c < 1 for c in p.chunk) \
            or p.chunk[0] > max(rows, 1):
        raise _bad(p.name, f"declares chunk shape {list(p.chunk)[:4]} for shape "
                           f"{list(p.shape)[:4]} (crafted or corrupt metadata)")


def _check_table(p: _Plan, cfg: dict[str, Any], expect: Expect) -> None:
    """An id table holds at most the array's distinct ids plus the fill 0, and at most the
    vocabulary: bounded before its frame is decompressed; its ids are in [0, vocab)."""
    classes = cfg.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, int) for c in classes):
        raise _bad(p.name, f"{IDMAP} has no valid class sizes")
    n = sum(classes)
    cap = int(np.prod(p.shape, dtype=np.int64)) + 1
    if expect.vocab is not None:
        cap = min(cap, expect.vocab + 1)
    if n > cap:
        raise _bad(p.name, f"{IDMAP} declares a table of {n} ids, more than the "
                           f"{cap} the array and vocabulary allow (crafted or corrupt)")


def _plan(name: str, meta: dict[str, Any], expect: Expect | None = None) -> _Plan | None:
    """How to decode array `name`; None when outside the subset.  With `expect`, shapes,
    chunk shapes and id tables are checked against the manifest first (a ChunkError)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("codecs"), list) \
            or not isinstance(meta.get("shape"), list) \
            or not isinstance(meta.get("chunk_grid", {}).get("configuration", {})
                              .get("chunk_shape"), list) \
            or not all(isinstance(x, int) and x >= 0 for x in meta["shape"]):
        return None
    if (meta.get("zarr_format") != 3 or meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("storage_transformers")
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"
            or meta["data_type"] not in _DTYPES):
        return None
    p = _Plan(name, meta)
    if expect is not None:
        _check_grid(p, expect.shapes.get(name))
    if len(p.shape) not in (1, 2) or len(p.chunk) != len(p.shape) \
            or (len(p.shape) == 2 and p.chunk[1] != p.shape[1]):
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
        elif seen_bytes and cname == "blosc" and not p.compressors:
            p.compressors.append(numcodecs.Blosc())  # blosc frames are self-describing
        elif seen_bytes and cname == "zstd" and not p.compressors:
            p.compressors.append(numcodecs.Zstd())
        elif seen_bytes:
            return None
        elif cname == GRIDQ and i == 0 and p.dtype == np.float32:
            p.gridq = cfg
        elif cname == IDMAP and i == 0 and p.dtype == np.int32 and cfg.get("dtype") in (
                "uint16", "int32"):
            if expect is not None:
                _check_table(p, cfg, expect)
            p.idmap = unpack_table(cfg["table"], list(cfg["classes"]))
            if expect is not None and expect.vocab is not None and len(p.idmap) and (
                    int(p.idmap.min()) < 0 or int(p.idmap.max()) >= expect.vocab):
                raise _bad(name, f"{IDMAP} table holds ids outside the vocabulary "
                                 f"[0, {expect.vocab}) (crafted or corrupt)")
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
    return None if raw is None else load_json(raw, f"{name}/zarr.json")


def _frame_size(codec: Any, u8: np.ndarray) -> int | None:
    """Decompressed size a blosc or zstd frame declares in its header (None: not stated)."""
    if isinstance(codec, numcodecs.Blosc) and len(u8) >= 16:
        return int.from_bytes(u8[4:8].tobytes(), "little")  # blosc1 header: nbytes
    if isinstance(codec, numcodecs.Zstd) and len(u8) >= 6 \
            and int.from_bytes(u8[:4].tobytes(), "little") == 0xFD2FB528:
        fhd = int(u8[4])
        single = (fhd >> 5) & 1
        pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        width = (single, 2, 4, 8)[fhd >> 6]
        if not width or len(u8) < pos + width:
            return None
        return int.from_bytes(u8[pos : pos + width].tobytes(), "little") + (256 if width == 2
                                                                            else 0)
    return None


_SCRATCH = threading.local()


def _scratch(slot: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable byte buffer: fresh memory for every decompressed chunk cost
    page faults that made decompression ~1.7x slower (benchmarks/results/store.md).  Memory
    held: at most two chunks per decoding thread (2 × 13 MB for 65536-row K=50 chunks)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    b = bufs.get(slot)
    if b is None or len(b) < nbytes:
        b = bufs[slot] = np.empty(nbytes, np.uint8)
    return b[:nbytes]


def _check_frame(codec: Any, u8: np.ndarray, nbytes: int) -> None:
    """Refuse a compressed frame whose header does not state exactly `nbytes` (a ValueError):
    checked before anything is allocated or decompressed."""
    declared = _frame_size(codec, u8)
    if declared != nbytes:
        raise ValueError(f"its compressed frame declares {declared} bytes, but the chunk "
                         f"holds {nbytes} (crafted or corrupt)" if declared is not None else
                         f"its compressed frame does not state its size (the chunk holds "
                         f"{nbytes} bytes; kdcache writes frames that do)")
    if isinstance(codec, numcodecs.Blosc) and len(u8) >= 16:
        cbytes = int.from_bytes(u8[12:16].tobytes(), "little")
        if cbytes != len(u8):  # blosc reads as many bytes as its header says
            raise ValueError(f"its blosc frame declares {cbytes} compressed bytes, but the "
                             f"chunk holds {len(u8)} (crafted or corrupt)")


def _decompress(compressors: list[Any], buf: Any, nbytes: int, slot: str | None) -> Any:
    """Decompressed bytes of a chunk, never more than `nbytes` (the chunk's size from its
    shape): the frame's header must state exactly that size, or the chunk is refused
    before anything is allocated; it is decompressed into this thread's scratch buffer
    `slot` (or a fresh buffer of that size), and blosc and zstd both stop at the end of the
    buffer they are given."""
    if not compressors:
        return buf
    u8 = np.frombuffer(buf, np.uint8)
    _check_frame(compressors[0], u8, nbytes)
    out = _scratch(slot, nbytes) if slot is not None else np.empty(nbytes, np.uint8)
    return compressors[0].decode(u8, out=out)


def _inner(p: _Plan) -> np.dtype:
    """The dtype the `bytes` codec serialised (what a decompressed chunk holds)."""
    if p.gridq is not None:
        inner = np.dtype("i4")
    elif p.idmap is not None:
        inner = p.idmap_dtype
    elif p.filters:  # the dtype the first filter *produces* is what `bytes` serialised
        inner = np.dtype(getattr(p.filters[-1], "astype", None) or p.filters[-1].dtype)
    else:
        inner = p.dtype
    return inner.newbyteorder("<" if p.endian == "little" else ">")


def _chunks(p: _Plan, files: dict[str, bytes], check: bool = True, slot: str | None = None):
    """Yield (lo, hi, encoded-side array or None for a fill chunk) per chunk.

    With `slot`, a chunk may be decompressed into this thread's scratch buffer `slot`: the
    array yielded is then only valid until the next chunk is requested."""
    inner = _inner(p)
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
            buf = _decompress(p.compressors, buf, int(np.prod(enc_shape)) * inner.itemsize,
                              slot)
            arr = np.frombuffer(buf, dtype=inner)
            if not p.filters:
                arr = arr.reshape(enc_shape)
                if p.transpose:
                    arr = arr.T
        except Exception as e:  # corrupt bytes in a store without checksums
            raise ChunkError(key, f"cannot be decoded ({type(e).__name__}: {e})") from None
        yield lo, hi, arr


def check_layout(files: dict[str, bytes], name: str, expect: Expect) -> None:
    """What `decode_array` checks before allocating, without decoding (`store verify`):
    the array's metadata against `expect`, and every stored chunk's frame header.  A
    ChunkError names what is wrong; an array outside the decoder's subset is one too."""
    meta = array_meta(files, name)
    p = None if meta is None else _plan(name, meta, expect)
    if p is None:
        raise _bad(name, "declares a layout or codec chain kdcache does not write (not a "
                         "kdcache store, or crafted)")
    enc_rows = p.chunk[0] * (p.chunk[1] if len(p.chunk) > 1 else 1)
    itemsize = _inner(p).itemsize
    n_chunks = -(-p.shape[0] // p.chunk[0]) if p.shape[0] else 0
    for i in range(n_chunks):
        key = f"{p.name}/c/{i}" + ("/0" if len(p.shape) == 2 else "")
        raw = files.get(key)
        if raw is None or not p.compressors:
            continue
        u8 = np.frombuffer(raw, np.uint8)[:-4] if p.crc32c else np.frombuffer(raw, np.uint8)
        try:
            _check_frame(p.compressors[0], u8, enc_rows * itemsize)
        except ValueError as e:
            raise ChunkError(key, f"cannot be decoded ({e})") from None


def _key(p: _Plan, lo: int) -> str:
    return f"{p.name}/c/{lo // p.chunk[0]}" + ("/0" if len(p.shape) == 2 else "")


def _block_rows(row_elems: int) -> int:
    return max(1, codecs.BLOCK_ELEMS // max(1, row_elems))


def _blocks(n_rows: int, row_elems: int) -> list[tuple[int, int]]:
    """Row ranges of about `codecs.BLOCK_ELEMS` elements covering `n_rows` rows."""
    step = _block_rows(row_elems)
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def _row_elems(a: np.ndarray) -> int:
    return int(np.prod(a.shape[1:], dtype=np.int64)) if a.ndim > 1 else 1


def _grid_into(codes: np.ndarray, g: dict[str, Any], scale: np.float32,
               dst: np.ndarray) -> None:
    """dst[...] = grid_ints(codes)·scale (float32), block by block (float32 loop: exact
    conversion of |q| < 2^24, see `decode_topk_ref`)."""
    delta, zigzag = bool(g.get("delta")), bool(g.get("zigzag"))
    row = _row_elems(codes)
    q = np.empty(max(1, min(len(codes), _block_rows(row)) * row), np.int32)
    for a, b in _blocks(len(codes), row):
        qb = q[: (b - a) * row].reshape((b - a, *codes.shape[1:]))
        grid_ints(codes[a:b], delta, zigzag, qb)
        np.multiply(qb, scale, out=dst[a:b], dtype=np.float32, casting="unsafe")


def decode_array(files: dict[str, bytes], name: str, check: bool = True,
                 expect: Expect | None = None) -> np.ndarray | None:
    """Decode array `name` from a {key: bytes} map of a zarr v3 group, or None if unsupported.

    Each chunk's crc32c (when the chain declares one) is checked unless `check=False`
    (benchmarks only, to measure what the check costs).  `expect`: shapes and vocabulary
    from the manifest, checked before allocating (see `Expect`)."""
    meta = array_meta(files, name)
    p = None if meta is None else _plan(name, meta, expect)
    if p is None:
        return None
    out = np.empty(p.shape, dtype=p.dtype)
    g = p.gridq
    scale = None if g is None else np.float32(int(g.get("sign", 1)) * float(g["step"]))
    for lo, hi, arr in _chunks(p, files, check, slot="a"):
        dst = out[lo:hi]
        if arr is None:
            dst[...] = p.fill
        elif p.idmap is not None:
            try:
                id_decode(arr[: hi - lo], p.idmap, out=dst)
            except ValueError as e:
                raise ChunkError(_key(p, lo), f"cannot be decoded ({e})") from None
        elif g is not None:
            _grid_into(arr[: hi - lo], g, scale, dst)
        elif p.filters:
            for f in reversed(p.filters):
                arr = f.decode(arr)
            arr = np.asarray(arr)
            arr = arr.view(p.dtype) if arr.dtype == p.dtype else arr.astype(p.dtype)
            dst[...] = arr.reshape(p.chunk)[: hi - lo]
        else:
            dst[...] = arr[: hi - lo]
    return out


def grid_config(files: dict[str, bytes], name: str,
                expect: Expect | None = None) -> dict[str, Any] | None:
    """The `kdcache.gridq` configuration of array `name`; None if it is not such an array
    (or is outside the fast decoder's subset)."""
    meta = array_meta(files, name)
    p = None if meta is None else _plan(name, meta, expect)
    return None if p is None else p.gridq


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


def _encoded_rows(p: _Plan, files: dict[str, bytes], check: bool, slot: str | None):
    """(lo, hi, encoded int32 rows lo:hi) per chunk; a fill chunk is encoded zeros (grid
    index 0 under every gridq option)."""
    for lo, hi, arr in _chunks(p, files, check, slot):
        yield lo, hi, (np.zeros((hi - lo, *p.shape[1:]), np.int32) if arr is None
                       else arr[: hi - lo])


def decode_topk_ref(files: dict[str, bytes], adv: str, want_topk: bool,
                    check: bool = True, expect: Expect | None = None,
                    ) -> tuple[np.ndarray | None, np.ndarray] | None:
    """(topk_logprobs or None, ref_topk_logprobs) rebuilt from the gridq arrays
    `topk_logprobs` and `adv` (= q(topk) − q(ref)) in one blocked pass; None when either is
    not a gridq array of the fast decoder's subset (the caller checks the metadata first).

    Values equal the plain rebuild from `decode_grid`: topk = (sign·q_topk)·(sign·step),
    ref = (sign·q_topk ∓ q_adv)·(sign·step), each one correctly rounded float32 product.
    """
    # Products use numpy's float32 loop (faster than float64 + a cast): float32(q) is exact
    # for |q| < 2^24, which the grid guarantees (codecs.MAX_GRID_INT), so the one rounding
    # of the product is the same either way.
    mt, ma = array_meta(files, "topk_logprobs"), array_meta(files, adv)
    pt = None if mt is None else _plan("topk_logprobs", mt, expect)
    pa = None if ma is None else _plan(adv, ma, expect)
    if pt is None or pa is None or pt.gridq is None or pa.gridq is None \
            or pt.shape != pa.shape:
        return None
    gt, ga = pt.gridq, pa.gridq
    s = np.float32(int(gt.get("sign", 1)) * float(gt["step"]))
    combine = np.add if s < 0 else np.subtract  # sign·q_ref = sign·q_topk ∓ q_adv
    topk = np.empty(pt.shape, np.float32) if want_topk else None
    ref = np.empty(pt.shape, np.float32)
    if pt.chunk == pa.chunk:  # the writer's layout: chunk i of one pairs with chunk i of the other
        pairs: Any = ((lo, et, ea) for (lo, _, et), (_, _, ea) in
                      zip(_encoded_rows(pt, files, check, "a"), _encoded_rows(pa, files, check, "b"),
                          strict=True))
    else:
        full = []
        for p in (pt, pa):
            e = np.empty(p.shape, np.int32)
            for lo, hi, rows in _encoded_rows(p, files, check, None):
                e[lo:hi] = rows
            full.append(e)
        pairs = [(0, full[0], full[1])]
    row = _row_elems(ref)
    qt = np.empty(max(1, min(len(ref), _block_rows(row)) * row), np.int32)
    qa = np.empty_like(qt)
    dt, zt = bool(gt.get("delta")), bool(gt.get("zigzag"))
    da, za = bool(ga.get("delta")), bool(ga.get("zigzag"))
    for lo, et, ea in pairs:
        for a, b in _blocks(len(et), row):
            shape = (b - a, *et.shape[1:])
            bt = grid_ints(et[a:b], dt, zt, qt[: (b - a) * row].reshape(shape))
            if topk is not None:
                np.multiply(bt, s, out=topk[lo + a : lo + b], dtype=np.float32,
                            casting="unsafe")
            ba = grid_ints(ea[a:b], da, za, qa[: (b - a) * row].reshape(shape))
            combine(bt, ba, out=ba)
            np.multiply(ba, s, out=ref[lo + a : lo + b], dtype=np.float32, casting="unsafe")
    return topk, ref
