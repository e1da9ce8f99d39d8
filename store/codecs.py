"""Per-field Zarr codec pipelines: a lossless mode and a bounded-error compact mode.

Why these codecs: every step is a registered Zarr codec written into each array's
`zarr.json`, so a reader (ours or plain zarr after `import kdcache.store`) decodes without
guesswork.  Schema v3 (written now):

* ids: `transpose([1, 0])` → `bytes` → blosc(zstd, byte shuffle).  Rank-major order puts
  ids of one rank together (their distributions differ a lot by rank); exact in every mode.
* lossless reals: float32 `bytes` → blosc(zstd, shuffle).  Bit-exact.
* compact (error bound ε, default 2e-3 nats): `kdcache.gridq` (this module) maps float32
  values to int32 indices on a float32 grid of step `s ≤ 2·(ε − spacing32(MAX_ABS))`:
  `q = rint(x/s)`, decoded value `float32(q)·s` (one correctly rounded float32 product).
  Options: `sign` (store −q, so log-probs become ≥ 0), `delta` (differences along the last
  axis: the descending `topk_logprobs` become small non-negative ints), `zigzag` (signed →
  non-negative).  Guarantee: |decoded − original| ≤ ε for every finite |x| ≤ MAX_ABS (the
  writer refuses anything else in compact mode).
* compact `ref_topk_logprobs` next to `topk_logprobs`: stored as the zarr array `topk_adv`
  = the integer grid difference q(topk_logprobs) − q(ref_topk_logprobs) (the ADPA
  advantage, METHODS §1), zigzag-coded; the reader rebuilds ref from the two integer
  arrays, so ref's error is exactly that of quantising ref itself (≤ ε).

Schema v4 (written now) is v3 with a `crc32c` codec appended to every chain: each chunk
carries the crc32c of its compressed bytes, which `fastdecode` (and plain zarr) check on
every decode.  Schema v2/v3 stores (v2: numcodecs `fixedscaleoffset` + `delta`, grid step in
float64) are still decoded by `fastdecode` / zarr; `CodecSpec(version=2 or 3)` still writes
them (tests of the backward-compatible reader only).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .format import SCHEMA_VERSION, TOKEN_FIELDS

__all__ = ["CodecSpec", "resolve_codec", "MAX_ABS", "DEFAULT_ERROR_BOUND", "MIN_ERROR_BOUND",
           "GridQuant", "grid_step", "grid_encode", "grid_ints", "ADV_ARRAY", "stored_arrays",
           "array_field", "IdMap", "IDMAP", "id_table", "idmap_config", "unpack_table",
           "id_encode", "id_decode"]

#: Largest |value| the compact mode accepts (nats).  Teacher log-probs of top-K tokens and
#: soft values of real LMs are far inside this; anything beyond is masked logits or a bug.
MAX_ABS = 256.0
DEFAULT_ERROR_BOUND = 2e-3
_SPACING = float(np.spacing(np.float32(MAX_ABS)))  # float32 ulp at MAX_ABS
MIN_ERROR_BOUND = 1e-4
DEFAULT_CODEC = "compact"
#: zarr array holding q(topk_logprobs) − q(ref_topk_logprobs) in compact v3 stores.
ADV_ARRAY = "topk_adv"
GRIDQ = "kdcache.gridq"
IDMAP = "kdcache.idmap"
#: zstd level of the ids chain (v5): within 0.2 B/token of level 19 on realistic teachers at
#: ~20x its compression speed (benchmarks/results/store.md)
ID_ZSTD_LEVEL = 9


# Module-wide as well: catch_warnings is not thread-safe and shards decode in threads.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")


@contextlib.contextmanager
def quiet_numcodecs() -> Iterator[None]:
    """Silence zarr's "numcodecs codecs are not in the v3 spec" warning.

    We use them knowingly: they are registered zarr codecs and declared in zarr.json.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
        yield


# ----------------------------------------------------------------------------- grid codec
def grid_step(error_bound: float) -> float:
    """Largest float32 step s with s/2 + spacing32(MAX_ABS)/2 < error_bound."""
    target = 2.0 * (error_bound - _SPACING)
    s = np.float32(target)
    if float(s) > target:
        s = np.nextafter(s, np.float32(0))
    return float(s)


def grid_encode(x: np.ndarray, step: float, sign: int = 1, delta: bool = False,
                zigzag: bool = False) -> np.ndarray:
    """float → int32 codes: q = sign·rint(x/step) in float64, then delta / zigzag."""
    q = np.rint(np.asarray(x, dtype=np.float64) / step).astype(np.int64)
    if sign < 0:
        q = -q
    if delta and q.ndim >= 1 and q.shape[-1]:
        q = np.diff(q, axis=-1, prepend=np.zeros_like(q[..., :1]))
    if zigzag:
        q = (q << 1) ^ (q >> 63)
    return q.astype(np.int32)


def grid_ints(codes: np.ndarray, delta: bool = False, zigzag: bool = False,
              out: np.ndarray | None = None) -> np.ndarray:
    """int32 codes → sign·q (int32, into `out` if given); the value is `result·sign·step`."""
    e = np.asarray(codes, dtype=np.int32)
    if zigzag:
        low = np.bitwise_and(e, 1)
        np.negative(low, out=low)
        e = np.bitwise_xor(np.right_shift(e, 1, out=out), low, out=out)
    if delta and e.ndim >= 1:
        e = np.cumsum(e, axis=-1, dtype=np.int32, out=out)
    if out is not None and e is not out:
        out[...] = e
        e = out
    return e


def grid_decode(codes: np.ndarray, step: float, sign: int = 1, delta: bool = False,
                zigzag: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """int32 codes → float32 values `float32(q)·float32(sign·step)` (one rounding)."""
    q = grid_ints(codes, delta, zigzag)
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    # float32(q) is exact (|q| < 2^24) and the product of two 24-bit mantissas is exact in
    # float64, so whichever loop numpy picks the result is the correctly rounded product.
    np.multiply(q, np.float32(sign * step), out=out, casting="unsafe")
    return out


def snap(x: np.ndarray, step: float) -> np.ndarray:
    """Values a v3 grid codec decodes to, computed on the writer side (float32)."""
    q = np.rint(np.asarray(x, dtype=np.float64) / step)
    return (q * step).astype(np.float32)  # exact product in float64, one rounding


def _gridq_class() -> type:
    """The zarr ArrayArrayCodec for `kdcache.gridq` (built lazily: zarr imports are slow)."""
    global _GRIDQ_CLS
    if _GRIDQ_CLS is not None:
        return _GRIDQ_CLS
    from zarr.abc.codec import ArrayArrayCodec
    from zarr.core.common import parse_named_configuration
    from zarr.core.dtype import Int32
    from zarr.registry import register_codec

    @dataclass(frozen=True)
    class GridQuantCodec(ArrayArrayCodec):
        """float32 ↔ int32 grid indices (see module docstring); declared as kdcache.gridq."""

        is_fixed_size = True
        step: float
        sign: int = 1
        delta: bool = False
        zigzag: bool = False

        def __init__(self, *, step: float, sign: int = 1, delta: bool = False,
                     zigzag: bool = False) -> None:
            if float(np.float32(step)) != float(step) or not step > 0:
                raise ValueError(f"{GRIDQ}: step={step} must be a positive float32 number")
            if sign not in (1, -1):
                raise ValueError(f"{GRIDQ}: sign={sign} must be 1 or -1")
            object.__setattr__(self, "step", float(step))
            object.__setattr__(self, "sign", int(sign))
            object.__setattr__(self, "delta", bool(delta))
            object.__setattr__(self, "zigzag", bool(zigzag))

        @classmethod
        def from_dict(cls, data: dict[str, Any]) -> GridQuantCodec:
            _, cfg = parse_named_configuration(data, GRIDQ)
            return cls(**cfg)

        def to_dict(self) -> dict[str, Any]:
            return {"name": GRIDQ, "configuration": {
                "step": self.step, "sign": self.sign, "delta": self.delta,
                "zigzag": self.zigzag}}

        def resolve_metadata(self, chunk_spec: Any) -> Any:
            return replace(chunk_spec, dtype=Int32(), fill_value=np.int32(0))

        async def _decode_single(self, chunk_array: Any, chunk_spec: Any) -> Any:
            codes = chunk_array.as_numpy_array()
            out = grid_decode(codes, self.step, self.sign, self.delta, self.zigzag)
            return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

        async def _encode_single(self, chunk_array: Any, chunk_spec: Any) -> Any:
            codes = grid_encode(chunk_array.as_numpy_array(), self.step, self.sign,
                                self.delta, self.zigzag)
            return chunk_spec.prototype.nd_buffer.from_numpy_array(codes)

        def compute_encoded_size(self, input_byte_length: int, _spec: Any) -> int:
            return input_byte_length  # float32 → int32

    register_codec(GRIDQ, GridQuantCodec)
    _GRIDQ_CLS = GridQuantCodec
    return GridQuantCodec


_GRIDQ_CLS: type | None = None


def GridQuant(**config: Any) -> Any:  # noqa: N802 - reads like a class at call sites
    """A `kdcache.gridq` zarr codec instance (registers the codec with zarr on first use)."""
    return _gridq_class()(**config)


# ----------------------------------------------------------------------------- id codec
def id_table(ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The code table of an id array: its distinct ids, most frequent first.

    Ids are grouped by frequency class ⌊log2(count)⌋ (descending) and sorted by id inside a
    class, so a code is roughly a frequency rank (small codes for frequent ids, which is what
    zstd packs best) while the table stays cheap to store: inside a class the ids are
    ascending, so the table is stored as gaps.  The fill value 0 is always in the table:
    zarr pads a partial last chunk with it before encoding.  Returns (table, class sizes).
    """
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    u, cnt = np.unique(np.concatenate([flat, [0]]), return_counts=True)
    cls = np.floor(np.log2(cnt)).astype(np.int64)
    order = np.lexsort((u, -cls))
    sizes = np.bincount(cls.max() - cls[order])
    return u[order].astype(np.int32), [int(x) for x in sizes if x]


def _pack_table(table: np.ndarray, sizes: list[int]) -> str:
    import base64

    from numcodecs import Zstd

    gaps = np.diff(table.astype(np.int64), prepend=0)
    starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    gaps[starts[starts < len(gaps)]] = table[starts[starts < len(gaps)]]
    return base64.b64encode(Zstd(level=19).encode(gaps.astype("<i4"))).decode("ascii")


def unpack_table(packed: str, sizes: list[int]) -> np.ndarray:
    """The code → id table of a `kdcache.idmap` configuration (int32)."""
    import base64

    from numcodecs import Zstd

    gaps = np.frombuffer(Zstd().decode(base64.b64decode(packed)), dtype="<i4").astype(np.int64)
    if int(sum(sizes)) != len(gaps) or any(int(x) <= 0 for x in sizes):
        raise ValueError(f"{IDMAP}: class sizes {sizes} do not add up to the {len(gaps)} table "
                         f"entries")
    if not len(gaps):
        return np.zeros(0, np.int32)
    starts = np.cumsum([0, *sizes[:-1]])
    out = np.cumsum(gaps)
    out -= np.repeat(out[starts] - gaps[starts], sizes)  # restart the sum at each class
    return out.astype(np.int32)


def idmap_config(ids: np.ndarray) -> dict[str, Any]:
    """`kdcache.idmap` configuration for an id array (its own table; uint16 codes when the
    table has at most 65536 entries, int32 otherwise)."""
    table, sizes = id_table(ids)
    return {"table": _pack_table(table, sizes), "classes": sizes,
            "dtype": "uint16" if len(table) <= 1 << 16 else "int32"}


def _idmap_class() -> type:
    """The zarr ArrayArrayCodec for `kdcache.idmap` (built lazily, like gridq)."""
    global _IDMAP_CLS
    if _IDMAP_CLS is not None:
        return _IDMAP_CLS
    from zarr.abc.codec import ArrayArrayCodec
    from zarr.core.common import parse_named_configuration
    from zarr.core.dtype import Int32, UInt16
    from zarr.registry import register_codec

    @dataclass(frozen=True)
    class IdMapCodec(ArrayArrayCodec):
        """int32 ids ↔ codes: code = position of the id in a per-array table stored in the
        configuration (distinct ids, frequency classes first; see `id_table`)."""

        is_fixed_size = True
        table: str
        classes: tuple[int, ...]
        dtype: str

        def __init__(self, *, table: str, classes: list[int], dtype: str = "uint16") -> None:
            if dtype not in ("uint16", "int32"):
                raise ValueError(f"{IDMAP}: dtype={dtype!r} must be 'uint16' or 'int32'")
            object.__setattr__(self, "table", str(table))
            object.__setattr__(self, "classes", tuple(int(c) for c in classes))
            object.__setattr__(self, "dtype", dtype)

        @property
        def ids(self) -> np.ndarray:
            got = self.__dict__.get("_ids")
            if got is None:
                got = unpack_table(self.table, list(self.classes))
                object.__setattr__(self, "_ids", got)
            return got

        @classmethod
        def from_dict(cls, data: dict[str, Any]) -> IdMapCodec:
            _, cfg = parse_named_configuration(data, IDMAP)
            return cls(**cfg)

        def to_dict(self) -> dict[str, Any]:
            return {"name": IDMAP, "configuration": {
                "table": self.table, "classes": list(self.classes), "dtype": self.dtype}}

        def resolve_metadata(self, chunk_spec: Any) -> Any:
            dt = UInt16() if self.dtype == "uint16" else Int32()
            return replace(chunk_spec, dtype=dt, fill_value=dt.cast_scalar(0))

        async def _decode_single(self, chunk_array: Any, chunk_spec: Any) -> Any:
            codes = chunk_array.as_numpy_array()
            return chunk_spec.prototype.nd_buffer.from_numpy_array(
                id_decode(codes, self.ids))

        async def _encode_single(self, chunk_array: Any, chunk_spec: Any) -> Any:
            codes = id_encode(chunk_array.as_numpy_array(), self.ids, self.dtype)
            return chunk_spec.prototype.nd_buffer.from_numpy_array(codes)

        def compute_encoded_size(self, input_byte_length: int, _spec: Any) -> int:
            return input_byte_length // 2 if self.dtype == "uint16" else input_byte_length

    register_codec(IDMAP, IdMapCodec)
    _IDMAP_CLS = IdMapCodec
    return IdMapCodec


_IDMAP_CLS: type | None = None


def id_encode(ids: np.ndarray, table: np.ndarray, dtype: str) -> np.ndarray:
    """ids → codes (positions in `table`); an id missing from the table is a ValueError."""
    ids = np.asarray(ids)
    if not ids.size:
        return np.zeros(ids.shape, dtype)
    if len(table) and int(table.max()) < 1 << 24 and int(ids.max()) < 1 << 24 \
            and ids.min() >= 0:
        # vocabulary-sized ids: a dense lookup table, one gather per id
        lut = np.full(max(int(table.max()), int(ids.max())) + 1, -1, np.int64)
        lut[table] = np.arange(len(table))
        codes = lut[ids]
        if (codes < 0).any():
            raise ValueError(f"{IDMAP}: an id is missing from the array's table")
        return codes.astype(dtype)
    order = np.argsort(table, kind="stable")
    sorted_ids = table[order]
    pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(table) - 1, 0))
    if not len(table) or not np.array_equal(sorted_ids[pos], ids):
        raise ValueError(f"{IDMAP}: an id is missing from the array's table")
    return order[pos].astype(dtype)


def id_decode(codes: np.ndarray, table: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """codes → int32 ids (into `out` if given); a code outside the table is a ValueError."""
    codes = np.asarray(codes)
    if codes.size and int(codes.max()) >= len(table):
        raise ValueError(f"{IDMAP}: code {int(codes.max())} is outside the table of "
                         f"{len(table)} ids (corrupt chunk)")
    if not codes.size:
        return np.zeros(codes.shape, np.int32) if out is None else out
    # bounds checked above; "clip" skips numpy's per-element check (~40 % faster)
    return np.take(table, codes, out=out, mode="clip")


#: rows of a shard on which the writer compares the candidate pipelines (deterministic:
#: the choice depends on the data only, so resumed and merged runs write the same bytes)
TRIAL_ROWS = 4096


def smaller(sizes: dict[str, int]) -> str:
    """The key with the smallest size (the first one on ties)."""
    return min(sizes, key=lambda k: sizes[k])


def _blosc_size(a: np.ndarray, clevel: int, shuffle: int) -> int:
    from numcodecs import Blosc

    return len(Blosc("zstd", clevel, shuffle).encode(np.ascontiguousarray(a[:TRIAL_ROWS])))


def choose_ids_pipeline(ids: np.ndarray, clevel: int) -> str:
    """"idmap" (table codes, token-major, zstd) or "transpose" (raw ids rank-major, blosc
    shuffle: v3/v4's pipeline), whichever is smaller on the shard's first TRIAL_ROWS rows.

    At 32k-152k vocabularies idmap is ~45 % smaller; at a 256-symbol vocabulary (ids of
    one rank repeat a lot, rows rarely) rank-major is ~20 % smaller."""
    from numcodecs import Zstd

    sample = np.asarray(ids)[:TRIAL_ROWS]
    if sample.ndim != 2 or not sample.size:
        return "idmap"
    cfg = idmap_config(sample)
    codes = id_encode(sample, unpack_table(cfg["table"], cfg["classes"]), cfg["dtype"])
    sizes = {"idmap": len(cfg["table"]) + len(Zstd(ID_ZSTD_LEVEL).encode(codes)),
             "transpose": _blosc_size(sample.astype(np.int32).T, clevel, 1)}
    return smaller(sizes)


def IdMap(**config: Any) -> Any:  # noqa: N802
    """A `kdcache.idmap` zarr codec instance (registers the codec with zarr on first use)."""
    return _idmap_class()(**config)


def register() -> None:
    """Make `kdcache.gridq` and `kdcache.idmap` known to zarr (done on `import kdcache.store`)."""
    _gridq_class()
    _idmap_class()


# ----------------------------------------------------------------------------- layout
def stored_arrays(field: str, fields: list[str] | tuple[str, ...], codec: CodecSpec) -> list[str]:
    """zarr arrays that hold `field` in a store of `fields` written with `codec`."""
    if codec.ref_as_adv(field, fields):
        return [ADV_ARRAY, "topk_logprobs"]
    return [field]


def array_field(array: str) -> str:
    """The store field a zarr array belongs to (for per-field byte counts)."""
    return "ref_topk_logprobs" if array == ADV_ARRAY else array


@dataclass(frozen=True)
class CodecSpec:
    """Resolved codec choice of a store (recorded in the manifest's `fields`).

    `version` is the schema version whose pipelines are written (2 only for tests of the
    backward-compatible reader).
    """

    mode: str  # "lossless" | "compact"
    error_bound: float  # 0.0 for lossless
    clevel: int = 0  # 0: the version's default (v2: 5; v3: 6 — zstd 11, ~1 % smaller)
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.clevel:
            object.__setattr__(self, "clevel", 6 if self.version >= 3 else 5)

    @property
    def step(self) -> float:
        """Quantisation grid step; |x − snap(x)| ≤ step/2 and float32 rounding adds ≤ ulp/2."""
        if self.version >= 3:
            return grid_step(self.error_bound)
        return 2.0 * (self.error_bound - _SPACING)

    def quantises(self, name: str) -> bool:
        return self.mode == "compact" and TOKEN_FIELDS[name].kind != "ids"

    def ref_as_adv(self, name: str, fields: list[str] | tuple[str, ...]) -> bool:
        """True when compact `ref_topk_logprobs` is stored as the advantage array."""
        return (self.version >= 3 and self.mode == "compact" and name == "ref_topk_logprobs"
                and "topk_logprobs" in fields)

    def snap(self, x: np.ndarray) -> np.ndarray:
        """Round real values onto the grid in float64 and return float32.

        Done on the writer side so that the stored float32 value is exactly what the reader
        returns (and re-encoding decoded values is exact: the grid is idempotent).
        """
        if self.version >= 3:
            return snap(x, self.step)
        scale = 1.0 / self.step
        return (np.rint(np.asarray(x, dtype=np.float64) * scale) / scale).astype(np.float32)

    def gridq_config(self, name: str) -> dict[str, Any]:
        if name == ADV_ARRAY:
            return {"step": self.step, "sign": 1, "delta": False, "zigzag": True}
        f = TOKEN_FIELDS[name]
        if f.kind == "logprob":
            # log-probs are ≤ 0: store −q ≥ 0; descending rows → non-negative deltas
            return {"step": self.step, "sign": -1, "delta": f.descending, "zigzag": False}
        return {"step": self.step, "sign": 1, "delta": False, "zigzag": True}

    def zarr_codecs(self, name: str, data: np.ndarray | None = None) -> dict[str, Any]:
        """`filters`/`compressors` kwargs for `zarr.Group.create_array` for zarr array `name`
        (`data`: the array's values; v5 ids build their code table from them).

        v4+: the chain ends in `crc32c` (a checksum of the compressed chunk, checked on read).
        """
        from zarr.codecs import Crc32cCodec

        kw = self._zarr_codecs(name, data)
        if self.version >= 4:
            kw["compressors"] = [*kw["compressors"], Crc32cCodec()]
        return kw

    def _zarr_codecs(self, name: str, data: np.ndarray | None) -> dict[str, Any]:
        from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

        if self.version < 3:
            return self._zarr_codecs_v2(name)
        if name == ADV_ARRAY:
            shuffle = "bitshuffle"
            if self.version >= 5 and data is not None:
                # v5: byte or bit shuffle, whichever packs this shard's advantage smaller
                # (byte: −6 % at 32k-152k vocabularies; bit: −3 % at 256)
                codes = grid_encode(data, self.step, **{k: v for k, v in
                                                        self.gridq_config(name).items()
                                                        if k != "step"})
                shuffle = smaller({"shuffle": _blosc_size(codes, self.clevel, 1),
                                   "bitshuffle": _blosc_size(codes, self.clevel, 2)})
            return {"filters": [GridQuant(**self.gridq_config(name))],
                    "compressors": [BloscCodec(cname="zstd", clevel=self.clevel,
                                               shuffle=shuffle)]}
        f = TOKEN_FIELDS[name]
        if f.kind == "ids" and self.version >= 5:
            if data is None:
                raise ValueError(f"the v5 codec of {name!r} needs the array's values")
            if choose_ids_pipeline(data, self.clevel) == "idmap":
                # token-major codes from a per-shard table, one zstd frame per chunk: rows
                # of similar contexts share long runs of ids, which zstd matches
                return {"filters": [IdMap(**idmap_config(data))],
                        "compressors": [ZstdCodec(level=ID_ZSTD_LEVEL, checksum=False)]}
        if f.kind == "ids":
            return {"filters": [TransposeCodec(order=(1, 0))] if f.trailing else [],
                    "compressors": [BloscCodec(cname="zstd", clevel=self.clevel,
                                               shuffle="shuffle")]}
        if not self.quantises(name):
            return {"filters": [],
                    "compressors": [BloscCodec(cname="zstd", clevel=self.clevel,
                                               shuffle="shuffle")]}
        cfg = self.gridq_config(name)
        return {"filters": [GridQuant(**cfg)],
                "compressors": [BloscCodec(cname="zstd", clevel=self.clevel,
                                           shuffle="shuffle" if cfg["delta"] else "bitshuffle")]}

    def _zarr_codecs_v2(self, name: str) -> dict[str, Any]:
        from zarr.codecs import BloscCodec
        from zarr.codecs import numcodecs as znc

        f = TOKEN_FIELDS[name]
        if not self.quantises(name):
            shuffle = "shuffle" if f.kind == "ids" or self.mode == "lossless" else "bitshuffle"
            return {
                "filters": [],
                "compressors": [BloscCodec(cname="zstd", clevel=self.clevel, shuffle=shuffle)],
            }
        with quiet_numcodecs():
            filters: list[Any] = [
                znc.FixedScaleOffset(offset=0, scale=1.0 / self.step, dtype="<f4", astype="<i4")
            ]
            if f.trailing == "k":
                filters.append(znc.Delta(dtype="<i4"))
        return {
            "filters": filters,
            "compressors": [BloscCodec(cname="zstd", clevel=self.clevel, shuffle="bitshuffle")],
        }

    def describe(self, name: str, fields: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """Human/manifest description of the pipeline for `name` (zarr.json is authoritative)."""
        d = self._describe(name, fields)
        if self.version >= 4:
            d["pipeline"] = [*d["pipeline"], "crc32c"]
        return d

    def _describe(self, name: str, fields: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode}
        f = TOKEN_FIELDS[name]
        if self.version < 3:
            if self.quantises(name):
                d.update(error_bound=self.error_bound, step=self.step, max_abs=MAX_ABS)
                d["pipeline"] = ["fixedscaleoffset(<f4→<i4)"] + (
                    ["delta(<i4)"] if f.trailing == "k" else []
                ) + ["bytes", "blosc(zstd, bitshuffle)"]
            else:
                d["pipeline"] = ["bytes", "blosc(zstd, shuffle)"]
            return d
        if f.kind == "ids" and self.version >= 5:
            d["pipeline"] = [f"{IDMAP}(per-shard table, frequency classes first)", "bytes",
                             f"zstd {ID_ZSTD_LEVEL}"]
            d["per_shard"] = ("or transpose([1,0]) → bytes → blosc(zstd, shuffle) where that "
                              "is smaller (zarr.json says which)")
        elif f.kind == "ids":
            d["pipeline"] = (["transpose([1,0])"] if f.trailing else []) + \
                ["bytes", f"blosc(zstd {self.clevel}, shuffle)"]
        elif not self.quantises(name):
            d["pipeline"] = ["bytes", f"blosc(zstd {self.clevel}, shuffle)"]
        else:
            d.update(error_bound=self.error_bound, step=self.step, max_abs=MAX_ABS)
            arr = ADV_ARRAY if self.ref_as_adv(name, fields) else name
            cfg = self.gridq_config(arr)
            shuffle = "shuffle" if cfg["delta"] else "bitshuffle"
            if arr == ADV_ARRAY and self.version >= 5:
                shuffle = "shuffle or bitshuffle, whichever is smaller per shard"
            d["pipeline"] = [f"{GRIDQ}({', '.join(f'{k}={v}' for k, v in cfg.items())})",
                             "bytes", f"blosc(zstd {self.clevel}, {shuffle})"]
            if arr == ADV_ARRAY:
                d["stored_as"] = (f"zarr array '{ADV_ARRAY}' = q(topk_logprobs) − "
                                  f"q(ref_topk_logprobs); ref = (q_topk − adv)·step")
        return d


def resolve_codec(options: dict[str, Any], version: int = SCHEMA_VERSION) -> CodecSpec:
    """Read `codec` / `error_bound` from StoreMeta.options (default: compact, 2e-3 nats)."""
    mode = options.get("codec", DEFAULT_CODEC)
    if mode == "lossless":
        if "error_bound" in options and options["error_bound"] not in (0, 0.0, None):
            raise ValueError(
                "options has codec='lossless' and a non-zero error_bound; drop error_bound or "
                "use codec='compact'"
            )
        return CodecSpec("lossless", 0.0, version=version)
    if mode == "compact":
        eps = float(options.get("error_bound", DEFAULT_ERROR_BOUND))
        if not math.isfinite(eps) or eps < MIN_ERROR_BOUND:
            raise ValueError(
                f"options.error_bound={eps} is below the supported minimum {MIN_ERROR_BOUND} "
                f"nats for codec='compact'; use a larger bound or codec='lossless'"
            )
        return CodecSpec("compact", eps, version=version)
    raise ValueError(f"options.codec={mode!r} is not a codec; use 'compact' or 'lossless'")
