"""Reading stores: `open_store` (random access / plain iteration) and shard decoding.

Why shard-at-a-time: a shard is the unit of commit, checksum and compression, so it is also
the unit of I/O.  `Store` keeps only the most recently used shard decoded; memory stays at
one shard whatever the store size.  The manifest is the only source of truth: files on
disk that it does not list are ignored.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._io import (
    SHARDS_DIR,
    LocalGuard,
    UnsafeFile,
    cat_files,
    is_local,
    join,
    open_fs,
    read_manifest,
)
from .codecs import ADV_ARRAY
from .fingerprint import hash_bytes
from .format import CRC_SCHEMA_VERSIONS, ROLES, TEXT_FIELDS, TOKEN_FIELDS, StoreMeta
from .integrity import (
    ChecksumError,
    check_manifest,
    check_schema_version,
    crc32c,
    file_error,
    is_chunk,
    unsafe_file_error,
)
from .tokfiles import read_tokenizer_files
from .writer import NoStoreError

__all__ = ["Store", "Shard", "open_store", "ChecksumError"]


class Shard:
    """One decoded shard: per-sequence columns plus the per-token arrays asked for.

    Records are materialised lazily by `record(i)`; per-token values are numpy views into
    the shard's arrays (no copy), so treat them as read-only or copy before mutating.
    """

    def __init__(self, name: str, table: Any, tokens: dict[str, np.ndarray]) -> None:
        self.name = name
        self.n = table.num_rows
        self.table = table  # the records.parquet Arrow table
        self.tokens = tokens
        # Plain Python lists: a record is built from them per group, and indexing a list
        # is several times cheaper than converting a numpy scalar.
        self._seq: dict[str, list[Any]] = {}
        for col in ("example_id", "role", "group", "n_tokens", "reward"):
            self._seq[col] = table.column(col).to_pylist()
        self._seq["is_terminal"] = [bool(x) for x in table.column("is_terminal").to_pylist()]
        # optional text columns (METHODS §5): a record carries them only where they are set
        self._text = {c: table.column(c).to_pylist() for c in TEXT_FIELDS
                      if c in table.column_names}
        self.token_offset = table.column("token_offset").to_numpy()
        self._starts: list[int] = self.token_offset.tolist()
        self._lists: dict[str, tuple[list[int], np.ndarray, list[bool] | None]] = {}
        for col in ("prompt_ids", "response_ids", "teacher_prompt_ids"):
            arr = table.column(col).combine_chunks()
            offs = arr.offsets.to_numpy().tolist()
            vals = arr.values.to_numpy(zero_copy_only=False)
            valid = None if arr.null_count == 0 else arr.is_valid().to_pylist()
            self._lists[col] = (offs, vals, valid)
        self._extra = [(name, arr, TOKEN_FIELDS[name].extra_row) for name, arr in tokens.items()]
        # group boundaries: records of one example are contiguous
        eids = self._seq["example_id"]
        starts = [i for i in range(self.n) if i == 0 or eids[i] != eids[i - 1]]
        self.group_bounds = list(zip(starts, starts[1:] + [self.n], strict=True))

    def __len__(self) -> int:
        return self.n

    def column(self, name: str) -> list[Any]:
        """A per-sequence column as a list: example_id, role, group, n_tokens, reward,
        is_terminal."""
        return self._seq[name]

    def lengths(self, name: str) -> np.ndarray:
        """Per-record lengths of a token-id column: prompt_ids, response_ids, teacher_prompt_ids."""
        return np.diff(self._lists[name][0])

    def record(self, i: int) -> dict[str, Any]:
        seq = self._seq
        T = seq["n_tokens"][i]
        out: dict[str, Any] = {
            "example_id": seq["example_id"][i],
            "role": seq["role"][i],
            "group": seq["group"][i],
            "is_terminal": seq["is_terminal"][i],
            "reward": seq["reward"][i],
            "n_tokens": T,
        }
        for col, vals in self._text.items():
            if vals[i] is not None:
                out[col] = vals[i]
        for col, (offs, vals, valid) in self._lists.items():
            if valid is not None and not valid[i]:
                out[col] = None
            else:
                out[col] = vals[offs[i] : offs[i + 1]]
        start = self._starts[i]
        for name, arr, extra_row in self._extra:
            if extra_row:  # T+1 rows: one extra row per earlier record
                s = start + i
                out[name] = arr[s : s + T + 1]
            else:
                out[name] = arr[start : start + T]
        return out

    def group(self, g: int) -> list[dict[str, Any]]:
        a, b = self.group_bounds[g]
        return [self.record(i) for i in range(a, b)]


_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    """Threads that decode one shard's arrays concurrently (blosc and numpy drop the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                   thread_name_prefix="kdcache-decode")
    return _POOL


def _forget_pool() -> None:  # a forked child (DataLoader worker) has none of our threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _cores() -> int:
    """CPUs this process may run on (a pinned DataLoader worker: often 1)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _needed_arrays(fields: Sequence[str], zarr_keys: Any) -> list[str]:
    """zarr arrays to decode for `fields` (a compact v3 ref also needs its base array)."""
    want: list[str] = []
    for f in fields:
        if f == "ref_topk_logprobs" and f"{f}/zarr.json" not in zarr_keys \
                and f"{ADV_ARRAY}/zarr.json" in zarr_keys:
            want += [ADV_ARRAY, "topk_logprobs"]
        else:
            want.append(f)
    return list(dict.fromkeys(want))


def shard_expect(entry: dict[str, Any], meta: StoreMeta) -> tuple[Any, dict[str, int]]:
    """(fastdecode.Expect, record counts) a shard's files must agree with, from its manifest
    entry and the store's meta: array shapes from n_tokens / n_records / K / len(betas)."""
    from .fastdecode import Expect

    n_tok, n_rec = int(entry["n_tokens"]), int(entry["n_records"])
    shapes: dict[str, tuple[int, ...]] = {}
    for f in meta.fields:
        spec = TOKEN_FIELDS[f]
        rows = n_tok + (n_rec if spec.extra_row else 0)
        width = {"k": (meta.k,), "b": (len(meta.betas),), "": ()}[spec.trailing]
        shapes[f] = (rows, *width)
    if "topk_logprobs" in shapes:
        shapes[ADV_ARRAY] = shapes["topk_logprobs"]
    elif "ref_topk_logprobs" in shapes:
        shapes[ADV_ARRAY] = shapes["ref_topk_logprobs"]
    tok = meta.tokenizer if isinstance(meta.tokenizer, dict) else {}
    vocab = tok.get("vocab_size")
    vocab = int(vocab) if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 \
        else None
    return Expect(shapes, vocab), {"n_records": n_rec, "n_tokens": n_tok,
                                   "n_groups": int(entry["n_groups"])}


def decode_shard(
    name: str, raw: dict[str, bytes], fields: Sequence[str], threads: bool = True,
    check: bool = True, expect: Any = None, counts: dict[str, int] | None = None,
) -> Shard:
    """Decode fetched shard files ({relative path: bytes}) into a `Shard`.

    A shard's arrays are decoded concurrently in a small shared thread pool (`threads`).
    Chunks with a crc32c codec are checked as they are decoded (`check=False`: benchmarks
    of the check's cost only).  `expect` / `counts` (see `shard_expect`): what the manifest
    says the shard holds; every size the files declare is checked against them before
    memory is allocated for it.
    """
    from .fastdecode import ChunkError, decode_array, decode_topk_ref, grid_config

    zfiles = {k[len("tokens.zarr/") :]: v for k, v in raw.items() if k.startswith("tokens.zarr/")}
    arrays = _needed_arrays(fields, zfiles)
    adv = ADV_ARRAY in arrays
    threads = threads and _cores() > 1  # on one core threads only add switching

    def named(fn: Any, a: str) -> Any:
        """fn() with damage reported as a ShardFileError naming the file."""
        if f"{a}/zarr.json" not in zfiles:
            raise ShardFileError(f"tokens.zarr/{a}/zarr.json", "is missing from the shard")
        try:
            return fn()
        except ChunkError as e:
            raise ShardFileError(f"tokens.zarr/{e.key}", e.what) from None
        except ShardFileError:
            raise
        except Exception as e:  # corrupt metadata in a store without crc
            raise ShardFileError(f"tokens.zarr/{a}",
                                 f"cannot be decoded ({type(e).__name__}: {e})") from None

    def one(a: str) -> Any:
        def plain() -> Any:
            arr = decode_array(zfiles, a, check, expect)
            if arr is None:  # only the subset of zarr kdcache writes, each step bounded
                raise ShardFileError(f"tokens.zarr/{a}/zarr.json",
                                     "declares a layout or codec chain kdcache does not write "
                                     "(not a kdcache store, or crafted)")
            return arr
        return named(plain, a)

    def topk_ref() -> tuple[np.ndarray | None, np.ndarray]:
        # ref = topk − adv on the integer grid, rebuilt with topk in one blocked pass
        steps = {}
        for a in (ADV_ARRAY, "topk_logprobs"):
            g = named(lambda a=a: grid_config(zfiles, a, expect), a)
            if g is None:
                raise ShardFileError(f"tokens.zarr/{a}/zarr.json",
                                     f"does not declare a kdcache.gridq array, so "
                                     f"ref_topk_logprobs cannot be rebuilt from {ADV_ARRAY} "
                                     f"(not written by kdcache, or corrupt)")
            steps[a] = abs(float(g["step"]))
        if steps[ADV_ARRAY] != steps["topk_logprobs"]:
            raise ShardFileError(f"tokens.zarr/{ADV_ARRAY}/zarr.json",
                                 f"has step {steps[ADV_ARRAY]}, not topk_logprobs' step "
                                 f"{steps['topk_logprobs']} (corrupt metadata)")
        got = named(lambda: decode_topk_ref(zfiles, ADV_ARRAY, "topk_logprobs" in fields,
                                            check, expect), ADV_ARRAY)
        if got is None:
            raise ShardFileError(f"tokens.zarr/{ADV_ARRAY}/zarr.json",
                                 "does not have topk_logprobs' shape (corrupt metadata)")
        return got

    jobs: dict[str, Any] = {a: (lambda a=a: one(a)) for a in arrays
                            if not (adv and a in (ADV_ARRAY, "topk_logprobs"))}
    if adv:
        jobs[ADV_ARRAY] = topk_ref
    if threads and len(jobs) > 1:
        futs = {a: _decode_pool().submit(fn) for a, fn in jobs.items()}
        try:
            table = _read_records(raw, counts, getattr(expect, "vocab", None))
        finally:
            dec = {a: f.result() for a, f in futs.items()}
    else:
        table = _read_records(raw, counts, getattr(expect, "vocab", None))
        dec = {a: fn() for a, fn in jobs.items()}
    tokens: dict[str, np.ndarray] = {}
    if adv:
        topk, tokens["ref_topk_logprobs"] = dec[ADV_ARRAY]
        if topk is not None:
            tokens["topk_logprobs"] = topk
    for f in fields:
        if f not in tokens:
            tokens[f] = dec[f]
    try:
        return Shard(name, table, {f: tokens[f] for f in fields})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardFileError("records.parquet", f"does not hold the expected columns ({e})") \
            from None


def check_shard(raw: dict[str, bytes], entry: dict[str, Any], meta: StoreMeta) -> None:
    """Every size a shard's files declare against its manifest entry, without decoding the
    arrays (`store verify`): each array's zarr.json and chunk frame headers, and
    records.parquet (footer counts, then per-record lengths).  A ShardFileError names the
    first problem."""
    from .fastdecode import ChunkError, check_layout

    expect, counts = shard_expect(entry, meta)
    zfiles = {k[len("tokens.zarr/"):]: v for k, v in raw.items() if k.startswith("tokens.zarr/")}
    arrays = sorted({k.split("/", 1)[0] for k in zfiles if k.count("/") >= 1})
    for a in arrays:
        try:
            check_layout(zfiles, a, expect)
        except ChunkError as e:
            raise ShardFileError(f"tokens.zarr/{e.key}", e.what) from None
        except Exception as e:  # noqa: BLE001 - malformed metadata of any kind
            raise ShardFileError(f"tokens.zarr/{a}/zarr.json",
                                 f"cannot be read ({type(e).__name__}: {e})") from None
    _read_records(raw, counts, expect.vocab)


class ShardFileError(ValueError):
    """A shard file is damaged; `rel` names it (the Store adds its URL and shard name)."""

    def __init__(self, rel: str, what: str) -> None:
        super().__init__(f"{rel} {what}")
        self.rel = rel
        self.what = what


#: Values a prompt column (prompt_ids, teacher_prompt_ids) may hold per byte of
#: records.parquet: prompt lengths are not in the manifest, so the file size bounds them.
#: Shared prompts (chosen/rejected, G rollouts) compress ~10x; 256 leaves a wide margin and
#: still stops a few KB of run-length-encoded zeros from decoding to gigabytes.
PROMPT_VALUES_PER_BYTE = 256
#: Longest example_id / role a record may hold (characters).
MAX_ID_CHARS = 4096


def _check_parquet_meta(pf: Any, size: int, counts: dict[str, int]) -> None:
    """Row and value counts the parquet footer declares, against the manifest, before a
    column is decoded."""
    md = pf.metadata
    if md.num_rows != counts["n_records"]:
        raise ShardFileError("records.parquet", f"holds {md.num_rows} rows but the manifest "
                                                f"says {counts['n_records']} (crafted or corrupt)")
    values: dict[str, int] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            top = col.path_in_schema.split(".", 1)[0]
            values[top] = values.get(top, 0) + int(col.num_values)
    # num_values of a list column counts its values plus one level per empty or null list
    caps = {"response_ids": counts["n_tokens"] + counts["n_records"]}
    for col in ("prompt_ids", "teacher_prompt_ids"):
        caps[col] = PROMPT_VALUES_PER_BYTE * size + counts["n_records"]
    for col, cap in caps.items():
        if values.get(col, 0) > cap:
            raise ShardFileError("records.parquet",
                                 f"declares {values[col]} values in {col}, more than the "
                                 f"{cap} its manifest entry allows (crafted or corrupt)")
    for col, n in values.items():
        if col not in caps and n > counts["n_records"]:
            raise ShardFileError("records.parquet", f"declares {n} values in column {col} "
                                                    f"of {counts['n_records']} rows")


def _check_records(table: Any, counts: dict[str, int], vocab: int | None = None) -> Any:
    """Per-record lengths against the manifest: each response_ids holds n_tokens ids,
    token_offset is their running sum, the total is the shard's n_tokens, roles are known,
    ids are short; every token id lies in [0, vocab) (a crafted id would index past the
    student's embedding: an IndexError on CPU, a device-side assert that kills the process
    on CUDA); strings back to plain columns."""
    n = table.num_rows
    for col in ("example_id", "role"):
        arr = table.column(col).combine_chunks()
        if isinstance(arr.type, pa.DictionaryType):
            d = arr.dictionary
            longest = int(pc.max(pc.utf8_length(d)).as_py() or 0) if len(d) else 0
            if longest > MAX_ID_CHARS:
                raise ShardFileError("records.parquet", f"holds a {col} of {longest} "
                                                        f"characters (at most {MAX_ID_CHARS})")
            if col == "role" and set(d.to_pylist()) - set(ROLES) - {None}:
                raise ShardFileError("records.parquet", f"holds roles outside {list(ROLES)}")
            if col == "role":  # plain strings for callers (value_counts in summary)
                i = table.schema.get_field_index(col)
                table = table.set_column(i, col, arr.cast(pa.string()))
    n_tok = table.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
    resp = table.column("response_ids").combine_chunks()
    lens = np.diff(resp.offsets.to_numpy().astype(np.int64))
    offs = table.column("token_offset").to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_tok)[:-1]]) if n else n_tok
    if len(lens) != n or (n_tok < 0).any() or not np.array_equal(lens, n_tok) \
            or not np.array_equal(offs, starts) or int(n_tok.sum()) != counts["n_tokens"]:
        raise ShardFileError("records.parquet", f"does not match its manifest entry "
                                                f"(response_ids lengths, n_tokens, token_offset "
                                                f"or their total {counts['n_tokens']}; crafted "
                                                f"or corrupt)")
    if vocab is not None:
        _check_token_ids(table, vocab)
    eids = table.column("example_id").combine_chunks()
    if n == 0:
        groups = 0
    elif isinstance(eids.type, pa.DictionaryType) \
            and len(pc.unique(eids.dictionary)) == len(eids.dictionary):
        idx = eids.indices.to_numpy(zero_copy_only=False)  # distinct entries: ids == indices
        groups = 1 + int(np.count_nonzero(idx[1:] != idx[:-1]))
    else:
        ids = eids.to_pylist()
        groups = 1 + sum(1 for i in range(1, n) if ids[i] != ids[i - 1])
    if groups != counts["n_groups"]:
        raise ShardFileError("records.parquet", f"holds {groups} groups but the manifest says "
                                                f"{counts['n_groups']} (crafted or corrupt)")
    return table


def _check_token_ids(table: Any, vocab: int) -> None:
    """Every id of the token-id columns in [0, vocab): one vectorised min/max per column
    (a few microseconds per thousand tokens, beside the arrays' decode)."""
    for col in ("prompt_ids", "response_ids", "teacher_prompt_ids"):
        if col not in table.column_names:
            continue
        values = pc.list_flatten(table.column(col))
        if len(values) == 0:
            continue
        lo, hi = (v.as_py() for v in pc.min_max(values).values())
        if lo is not None and (lo < 0 or hi >= vocab):
            bad = lo if lo < 0 else hi
            raise ShardFileError("records.parquet", f"holds token id {bad} in {col}, outside "
                                                    f"the store's vocabulary [0, {vocab}) "
                                                    f"(crafted or corrupt)")


def _read_records(raw: dict[str, bytes], counts: dict[str, int] | None = None,
                  vocab: int | None = None) -> Any:
    if "records.parquet" not in raw:
        raise ShardFileError("records.parquet", "is missing from the shard")
    data = raw["records.parquet"]
    try:
        # a few hundred rows: pyarrow's dataset layer, pre-buffering and thread pool cost
        # more than they save (half the time of read_table).  Strings are read as
        # dictionaries, so a crafted long string repeated in every row is not copied per row
        # before its length is checked.
        pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False,
                            read_dictionary=["example_id", "role"] if counts else None)
        if counts is not None:
            _check_parquet_meta(pf, len(data), counts)
        table = pf.read(use_threads=False)
    except ShardFileError:
        raise
    except Exception as e:  # pyarrow raises several types for bad bytes
        raise ShardFileError("records.parquet",
                             f"cannot be read ({type(e).__name__}: {e})") from None
    if counts is None:
        return table
    try:
        return _check_records(table, counts, vocab)
    except ShardFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, pa.ArrowException) as e:
        raise ShardFileError("records.parquet",
                             f"does not hold the expected columns ({e})") from None


class Store:
    """A committed store, read lazily shard by shard (see `open_store`)."""

    def __init__(self, url: str, fs: Any, root: str, manifest: dict[str, Any]) -> None:
        self.url = url
        self.fs = fs
        self.root = root
        self.manifest = manifest
        self.meta = StoreMeta.from_dict(manifest["meta"])
        self.schema_version: int = manifest["schema_version"]
        # v4+: crc32c of parquet/zarr.json on fetch, chunks check their own crc32c while
        # decoding.  Older stores only have sha256: every fetched file is hashed (slower).
        self.crc = self.schema_version in CRC_SCHEMA_VERSIONS
        self._check_reads = True  # False: benchmarks of the checks' cost only
        self.shards: list[dict[str, Any]] = manifest["shards"]
        counts = [s["n_records"] for s in self.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._cache: tuple[tuple[int, tuple[str, ...]], Shard] | None = None

    # -- sizes -----------------------------------------------------------------
    @property
    def fields(self) -> list[str]:
        """Per-token fields present in this store."""
        return list(self.meta.fields)

    @property
    def num_tokens(self) -> int:
        return int(sum(s["n_tokens"] for s in self.shards))

    @property
    def num_groups(self) -> int:
        return int(sum(s["n_groups"] for s in self.shards))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return (f"Store({self.url!r}, records={len(self)}, tokens={self.num_tokens}, "
                f"shards={len(self.shards)}, fields={self.fields}, complete={self.complete})")

    @property
    def has_tokenizer_files(self) -> bool:
        """The store carries its tokenizer's files (precompute since METHODS revision 3)."""
        return bool(self.meta.tokenizer.get("files"))

    def tokenizer_files(self) -> dict[str, bytes]:
        """{name: bytes} of the teacher tokenizer's files, checked against the manifest;
        a ValueError when the store has none (written before they were stored)."""
        return read_tokenizer_files(self.fs, self.root, self.meta.tokenizer.get("files"), self.url)

    # -- shard I/O -------------------------------------------------------------
    def shard_files(self, index: int, fields: Sequence[str] | None = None) -> list[str]:
        """Relative paths of the files needed to decode `fields` of shard `index`."""
        fields = self.fields if fields is None else list(fields)
        files = self.shards[index]["files"]
        arrays = set(_needed_arrays(fields, {r[len("tokens.zarr/"):] for r in files}))
        wanted = []
        for rel in files:
            parts = rel.split("/")
            if rel == "records.parquet" or rel == "tokens.zarr/zarr.json":
                wanted.append(rel)
            elif parts[0] == "tokens.zarr" and parts[1] in arrays:
                wanted.append(rel)
        return wanted

    def fetch_shard(
        self, index: int, fields: Sequence[str] | None = None, verify: bool = False
    ) -> dict[str, bytes]:
        """Fetch the raw bytes of a shard's files (one concurrent `cat` on async filesystems).

        Checked against the manifest before anything is returned: v4+ stores check the
        crc32c of records.parquet and every zarr.json (chunks check their own crc32c as they
        are decoded; `verify=True` checks the chunks' manifest crc32c here as well, without
        decoding); older stores check the sha256 of every file.  A mismatch raises a
        one-line ChecksumError naming the store, shard and file.
        """
        entry = self.shards[index]
        name = entry["name"]
        rels = self.shard_files(index, fields)
        base = join(self.root, SHARDS_DIR, name)
        paths = [join(base, r) for r in rels]
        got = cat_files(self.fs, paths, self.root,
                        {p: entry["files"][r]["bytes"] for r, p in zip(rels, paths, strict=True)})
        raw = {}
        for r, p in zip(rels, paths, strict=True):
            data = got.get(p)
            if isinstance(data, UnsafeFile):
                raise unsafe_file_error(self.url, name, r, data.what)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                what = type(data).__name__ if isinstance(data, Exception) else "no data"
                raise file_error(self.url, name, r, f"is missing or unreadable ({what})")
            raw[r] = data
        for r, data in raw.items():
            info = entry["files"][r]
            if not self._check_reads:
                continue
            if len(data) != info["bytes"]:
                raise file_error(self.url, name, r, f"is {len(data)} bytes but the manifest "
                                 f"says {info['bytes']} (truncated or replaced)")
            if self.crc:
                if (verify or not is_chunk(r)) and crc32c(data) != info.get("crc32c"):
                    raise file_error(self.url, name, r,
                                     "failed its crc32c check (corrupted bytes)")
            elif hash_bytes(data) != info.get("sha256"):
                raise file_error(self.url, name, r, "failed its sha256 check (corrupted bytes)")
        return raw

    def check_shard(self, index: int, raw: dict[str, bytes]) -> None:
        """Every size shard `index`'s fetched files declare, against the manifest, without
        decoding its arrays (`check_shard`); a one-line error naming store, shard, file."""
        entry = self.shards[index]
        try:
            check_shard(raw, entry, self.meta)
        except ShardFileError as e:
            raise file_error(self.url, entry["name"], e.rel, e.what) from None

    def decode(self, index: int, raw: dict[str, bytes], fields: Sequence[str]) -> Shard:
        """Decode fetched files of shard `index`; damage is a one-line ChecksumError/ValueError
        naming the store, shard and file."""
        entry = self.shards[index]
        name = entry["name"]
        expect, counts = shard_expect(entry, self.meta)
        try:
            return decode_shard(name, raw, fields, check=self._check_reads, expect=expect,
                                counts=counts)
        except ShardFileError as e:
            raise file_error(self.url, name, e.rel, e.what) from None

    def load_shard(
        self, index: int, fields: Sequence[str] | None = None, verify: bool = False
    ) -> Shard:
        """Decode shard `index` (restricted to `fields`); the last one is cached."""
        fields = tuple(self.fields if fields is None else fields)
        unknown = [f for f in fields if f not in self.fields]
        if unknown:
            raise KeyError(f"fields {unknown} are not in store {self.url} (it has {self.fields})")
        key = (index, fields)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        shard = self.decode(index, self.fetch_shard(index, fields, verify), fields)
        self._cache = (key, shard)
        return shard

    # -- record access ---------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row within shard) of global record `i`."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for store of {n} records")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self.locate(int(i))
        return self.load_shard(s).record(j)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for s in range(len(self.shards)):
            shard = self.load_shard(s)
            for j in range(len(shard)):
                yield shard.record(j)

    def groups(self, fields: Sequence[str] | None = None) -> Iterator[list[dict[str, Any]]]:
        """Groups (lists of records sharing example_id) in stored order."""
        for s in range(len(self.shards)):
            shard = self.load_shard(s, fields)
            for g in range(len(shard.group_bounds)):
                yield shard.group(g)

    def prefetching_shards(
        self, order: Sequence[int], fields: Sequence[str] | None = None, prefetch: int = 2
    ) -> Iterator[tuple[int, Shard]]:
        """Yield (index, Shard) for `order`, fetching+decoding up to `prefetch` ahead in threads."""
        fields = tuple(self.fields if fields is None else fields)
        if prefetch <= 0:
            for s in order:
                yield s, self.decode(s, self.fetch_shard(s, fields), fields)
            return

        def work(s: int) -> Shard:
            return self.decode(s, self.fetch_shard(s, fields), fields)

        with ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="kdcache-prefetch") as ex:
            futs = []
            it = iter(order)
            for s in it:
                futs.append((s, ex.submit(work, s)))
                if len(futs) > prefetch:
                    break
            while futs:
                s, fut = futs.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    futs.append((nxt, ex.submit(work, nxt)))
                yield s, fut.result()


def open_store(url: str, check_listing: bool = True, root: str | None = None) -> Store:
    """Open the committed part of the store at `url` (local path or fsspec URL), or, given
    `root`, a bare content key (no `/`, no `://`) names the store `root/key`.

    Checks before returning: the manifest parses, its version is supported, its checksum
    (v4+; older: shard-entry checksums) and store_key match, and — `check_listing`, one
    listing of shards/ — every listed file exists with its recorded size, so a missing
    shard is reported now, not at the training step that needs it.
    """
    url = str(url)
    if root and "/" not in url and "://" not in url:
        url = f"{str(root).rstrip('/')}/{url}"
    fs, root = open_fs(url)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise NoStoreError(f"no kdcache store at {url}: run `kdcache precompute` first "
                           f"(or check the URL; expected {join(root, 'manifest.json')})")
    check_schema_version(manifest, url)
    check_manifest(manifest, url)
    if check_listing:
        check_files(fs, root, manifest, url)
    return Store(url, fs, root, manifest)


def check_files(fs: Any, root: str, m: dict[str, Any], url: str) -> None:
    """Every file the manifest lists exists with its recorded size and is a regular file
    inside the store (never a FIFO, a device or a symlink out of the root).

    Local stores: one lstat per file (`_io.LocalGuard`; a listing would follow a symlinked
    `shards/` wherever it leads).  Object stores: one listing of shards/, which is one
    (paginated) LIST request, not one request per shard, and gives each object's kind.
    """
    if not m["shards"]:
        return
    base = join(root, SHARDS_DIR)
    missing: list[tuple[str, str]] = []

    def size_ok(name: str, rel: str, size: Any, want: int) -> None:
        if size is None:
            missing.append((name, rel))
        elif int(size) != want:
            raise file_error(url, name, rel, f"is {size} bytes but the manifest says {want} "
                                             f"(truncated or replaced)")

    if is_local(fs):
        guard = LocalGuard(fs._strip_protocol(root))
        for s in m["shards"]:
            for rel, info in s["files"].items():
                path = fs._strip_protocol(join(base, s["name"], rel))
                try:
                    size = guard.stat(path).st_size
                except (FileNotFoundError, NotADirectoryError):
                    size = None
                except UnsafeFile as e:
                    raise unsafe_file_error(url, s["name"], rel, e.what) from None
                size_ok(s["name"], rel, size, info["bytes"])
    else:
        try:
            listing = fs.find(base, detail=True)
        except FileNotFoundError:
            listing = {}
        found = {p.rstrip("/"): info for p, info in listing.items()}
        for s in m["shards"]:
            for rel, info in s["files"].items():
                got = found.get(join(base, s["name"], rel))
                if got is not None and got.get("type", "file") != "file":
                    raise unsafe_file_error(url, s["name"], rel,
                                            f"is a {got.get('type')}, not a regular file")
                size_ok(s["name"], rel, None if got is None else got.get("size"), info["bytes"])
    if missing:
        name, rel = missing[0]
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise file_error(url, name, rel, f"is missing{more}")
