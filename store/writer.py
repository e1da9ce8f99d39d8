"""StoreWriter: validate records, cut them into shards, commit shards through the manifest.

Commit protocol (see docs/STORE_FORMAT.md): a shard's files are written first, under
`shards/shard-NNNNN/`; only then is `manifest.json` replaced atomically with a version that
lists the shard.  Readers trust the manifest alone, so a crash at any point leaves either
the previous or the next consistent store — never a half shard.  Shard names come from the
shard's position, and shards are cut by a rule that only depends on the sequence of groups,
so an uninterrupted run and a killed-then-resumed run produce the same shards, byte for
byte, and the same manifest apart from its timestamps.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._io import (
    MANIFEST,
    SHARDS_DIR,
    TMP_MARK,
    atomic_write,
    is_local,
    join,
    open_fs,
    read_manifest,
    temp_owner_dead,
    write_files,
)
from .codecs import ADV_ARRAY, MAX_ABS, CodecSpec, resolve_codec
from .fingerprint import hash_bytes, hash_json, store_key
from .format import (
    CRC_SCHEMA_VERSIONS,
    ROLES,
    SCHEMA_VERSION,
    SEQUENCE_FIELDS,
    TEXT_FIELDS,
    TOKEN_FIELDS,
    StoreMeta,
    token_shape,
)
from .integrity import check_manifest, check_schema_version, crc32c, manifest_checksum
from .lock import StoreLock
from .tokfiles import write_tokenizer_files

__all__ = ["StoreWriter", "CHUNK_ROWS", "check_schema_version", "NoStoreError", "LOGPROB_FLOOR", "UNCOMMITTED",
           "WRITABLE_VERSIONS", "STALE_TEMP_S", "commit_manifest"]

#: Rows per Zarr chunk along the token axis (13 MB of float32 at K=50).  Larger chunks give
#: zstd a longer window over the ids (−1 B/token going from 16384 to 32768 rows at a 32k
#: vocabulary); a chunk is decoded whole, and a shard is read whole anyway.
CHUNK_ROWS = 65536
_INT32_MAX = 2**31 - 1
#: On-disk versions this code can write (older ones for tests of the backward-compatible
#: reader, and for merging old stores without re-rounding their values).
WRITABLE_VERSIONS = (2, 3, 4, SCHEMA_VERSION)
#: A temporary file older than this (seconds) is no longer written by anyone.
STALE_TEMP_S = 3600.0
#: With `clamp=True`, log-probs below this (p < e^-255, zero for every loss) are stored as
#: it: the lowest value the compact codec holds with a margin (its range is ±MAX_ABS).
LOGPROB_FLOOR = 1.0 - MAX_ABS
#: Report entry of stores written before the writer folded sums at each commit: per-group
#: sums of groups handed over but maybe not committed (read on resume, never written now).
UNCOMMITTED = "uncommitted_sums"


class NoStoreError(FileNotFoundError):
    """Raised when a URL holds no kdcache store."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _to_numpy(v: Any) -> np.ndarray:
    """numpy view of a list / numpy array / torch tensor (half precision widened)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch.Tensor, without importing torch
        t = v.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(v)


def field_layout(meta: StoreMeta, codec: CodecSpec) -> dict[str, Any]:
    """The manifest's `fields` section: logical dtype, shape, row rule and codec per field."""
    out: dict[str, Any] = {}
    for name in meta.fields:
        f = TOKEN_FIELDS[name]
        trailing = {"k": ["K"], "b": ["B"], "": []}[f.trailing]
        out[name] = {
            "dtype": f.dtype,
            "shape": ["T+1" if f.extra_row else "T", *trailing],
            "rows": "T+1" if f.extra_row else "T",
            "codec": codec.describe(name, meta.fields),
        }
    return out


class StoreWriter:
    """Append groups of records to a store at `url` (any fsspec URL).

    `shard_records` is a target: a shard is cut before a group that would push it past the
    target (a group never spans shards) and as soon as it reaches the target.  With
    `resume=True` an existing store with the same meta is continued after its last committed
    shard (`done_example_ids` tells the caller what to skip); with `resume=False` an existing
    store is an error.  `tokenizer_files` ({name: bytes}, listed in
    `meta.tokenizer["files"]` by `describe_files`) are written under `tokenizer/`.  `_schema_version` writes an older on-disk version (tests of the
    backward-compatible reader, merges of old stores).  `_staged=True` commits nothing until
    `close()` (one manifest write at the end) and removes the shards it wrote on `abort()`:
    `merge` uses it on object stores so a failed merge leaves nothing at its output.
    On a local filesystem the writer holds the store's lock (store/lock.py) from here until
    `close()`/`abort()`; a second writer of the same store fails at once, naming the holder.

    Report: with `report_key`, the manifest's section of that name holds `sum_<key>` for
    each of `sum_keys`, the sums (`add_group(..., sums=)`) of exactly the committed groups
    (folded at each shard commit, so a killed run's resume counts every group once), and
    `close(report=)` adds the producer's own entries. `clamp=True` stores log-probs below
    the codec's range at its floor instead of refusing them.
    """

    def __init__(
        self, url: str, meta: StoreMeta, shard_records: int = 1024, resume: bool = True,
        _schema_version: int = SCHEMA_VERSION, _staged: bool = False, _lock: bool = True,
        report_key: str | None = None, sum_keys: Sequence[str] = (), clamp: bool = False,
        tokenizer_files: dict[str, bytes] | None = None,
    ) -> None:
        if int(shard_records) < 1:
            raise ValueError(f"shard_records must be >= 1, got {shard_records}")
        self.url = str(url)
        self.meta = meta
        self.shard_records = int(shard_records)
        if _schema_version not in WRITABLE_VERSIONS:
            raise ValueError(f"can write schema versions {list(WRITABLE_VERSIONS)}, "
                             f"not {_schema_version}")
        self.schema_version = int(_schema_version)
        self.codec = resolve_codec(meta.options, version=self.schema_version)
        self.fs, self.root = open_fs(self.url)
        self._staged = bool(_staged)
        self.report_key, self.sum_keys, self.clamp = report_key, tuple(sum_keys), bool(clamp)
        # one writer per local store: a second one fails here, naming the holder
        self._lock = StoreLock(self.root).acquire() if is_local(self.fs) and _lock else None
        try:
            self._open(meta, resume, tokenizer_files)
        except BaseException:
            self._release()
            raise

    def _open(self, meta: StoreMeta, resume: bool, tokenizer_files: dict[str, bytes] | None) -> None:
        self._pending: list[dict[str, Any]] = []
        self._pending_ids: list[str] = []
        self._done: set[str] = set()
        self._closed = False
        self._written: list[str] = []  # shard directories written (removed on a staged abort)
        self._sums = dict.fromkeys(self.sum_keys, 0.0)  # of committed groups
        self._group_sums: dict[str, list[float]] = {}  # of buffered groups
        existing = read_manifest(self.fs, self.root)
        self._remove_stale_temps()
        if tokenizer_files:  # before any manifest lists them (METHODS §5; store/tokfiles.py)
            write_tokenizer_files(self.fs, self.root, tokenizer_files,
                                  meta.tokenizer.get("files"))
        if existing is None:
            now = _now()
            self._manifest: dict[str, Any] = {
                "format": "kdcache-store",
                "schema_version": self.schema_version,
                "store_key": store_key(meta, self.schema_version),
                "meta": meta.to_dict(),
                "fields": field_layout(meta, self.codec),
                "shard_records": self.shard_records,
                "shards": [],
                "totals": {},
                "complete": False,
                "created": now,
                "updated": now,
            }
            if not self._staged:
                self._commit()
        else:
            self._open_existing(existing, resume)
        if self.report_key is not None:
            self._resume_sums()

    def _remove_stale_temps(self) -> None:
        """Delete `.manifest.json.tmp-*` left by a killed writer (local stores only: object
        stores are written with single PUTs and have no temp files).

        Stale = its owner process is gone (same host), or it is older than STALE_TEMP_S
        (another host, or a temp name from before v4).  A live writer's temp file exists
        for the milliseconds of one atomic write and is never removed here.
        """
        if not is_local(self.fs) or not os.path.isdir(self.root):
            return
        prefix = f".{MANIFEST}{TMP_MARK}"
        now = time.time()
        for name in os.listdir(self.root):
            if not name.startswith(prefix):
                continue
            path = os.path.join(self.root, name)
            try:
                if temp_owner_dead(name) or now - os.path.getmtime(path) >= STALE_TEMP_S:
                    os.remove(path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ opening
    def _open_existing(self, manifest: dict[str, Any], resume: bool) -> None:
        if not resume:
            raise FileExistsError(
                f"a kdcache store already exists at {self.url}; pass resume=True to continue "
                f"it, or delete it / choose another URL to start over"
            )
        v = check_schema_version(manifest, self.url)
        check_manifest(manifest, self.url)  # never extend a damaged manifest
        if v != self.schema_version:
            raise ValueError(
                f"store at {self.url} was written with schema_version={v}; this kdcache writes "
                f"{self.schema_version} and will not mix versions in one store: finish it with the "
                f"kdcache that started it, or write a new store"
            )
        old = StoreMeta.from_dict(manifest["meta"])
        if old.content_dict() != self.meta.content_dict():
            a, b = old.content_dict(), self.meta.content_dict()
            diff = sorted(k for k in a if a[k] != b.get(k))
            raise ValueError(
                f"cannot resume store at {self.url}: its meta differs in {diff} "
                f"(stored {[a[k] for k in diff]!r}, given {[b[k] for k in diff]!r}); "
                f"use the original settings, or write to a new URL"
            )
        self._manifest = manifest
        self._manifest["meta"] = self.meta.to_dict()  # code_version may legitimately move on
        for shard in manifest["shards"]:
            path = join(self.root, SHARDS_DIR, shard["name"], "records.parquet")
            with self.fs.open(path, "rb") as f:
                ids = pq.read_table(f, columns=["example_id"]).column(0).to_pylist()
            self._done.update(ids)

    # ------------------------------------------------------------------ public API
    @property
    def done_example_ids(self) -> set[str]:
        """Example ids whose groups are committed (skip them when resuming)."""
        return set(self._done)

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    # ------------------------------------------------------------------ report sums
    def _report(self) -> dict[str, Any]:
        return self._manifest.setdefault(self.report_key, {})

    def _resume_sums(self) -> None:
        report = self._report()
        for k in self.sum_keys:
            self._sums[k] = float(report.get(f"sum_{k}", 0.0))
        for eid, values in report.pop(UNCOMMITTED, {}).items():  # an older writer's entries
            if eid in self._done:  # committed after that writer's last fold: count it
                for k, v in zip(self.sum_keys, values, strict=True):
                    self._sums[k] += float(v)
        self._write_sums()

    def _write_sums(self) -> None:
        report = self._report()
        for k, v in self._sums.items():
            report[f"sum_{k}"] = v

    def _fold(self, ids: list[str]) -> None:
        """The groups `ids` are being committed: their sums join the report's."""
        if self.report_key is None or not self.sum_keys:
            return
        for eid in ids:
            for k, v in zip(self.sum_keys, self._group_sums.pop(eid, ()), strict=False):
                self._sums[k] += v
        self._write_sums()

    def add_group(self, records: list[dict[str, Any]], sums: dict[str, float] | None = None) -> None:
        """Validate and buffer one group (all records of one example_id, in order); `sums`
        are its report sums (counted once the group is committed)."""
        if self._closed:
            raise RuntimeError(f"StoreWriter for {self.url} is closed")
        if not records:
            raise ValueError("add_group got an empty list: a group needs at least one record")
        eid = records[0].get("example_id")
        for i, r in enumerate(records):
            if r.get("example_id") != eid:
                raise ValueError(
                    f"add_group: record {i} has example_id={r.get('example_id')!r} but record 0 "
                    f"has {eid!r}; a group is all records of one example — call add_group once "
                    f"per example_id"
                )
        if eid in self._done or eid in self._pending_ids:
            raise ValueError(
                f"example_id {eid!r} was already added to {self.url}; skip ids in "
                f"writer.done_example_ids when resuming"
            )
        norm = [self._validate(r, i, str(eid)) for i, r in enumerate(records)]
        if self._pending and len(self._pending) + len(norm) > self.shard_records:
            self._flush()
        if self.sum_keys:
            self._group_sums[str(eid)] = [float((sums or {}).get(k, 0.0)) for k in self.sum_keys]
        self._pending.extend(norm)
        self._pending_ids.append(str(eid))
        if len(self._pending) >= self.shard_records:
            self._flush()

    def close(self, report: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]]
              | None = None) -> None:
        """Commit the last partial shard and mark the store complete. `report` (or
        report(final sums)) is merged into the report section (needs `report_key`)."""
        if self._closed:
            return
        if report and self.report_key is None:
            raise ValueError("StoreWriter.close(report=...) needs a report_key")
        try:
            if self._pending:
                self._flush()
            if self.report_key is not None:
                rep = self._report()
                rep.update(report(dict(self._sums)) if callable(report) else (report or {}))
            self._manifest["complete"] = True
            self._commit()
            self._closed = True
        finally:  # closed, or failed for good (the caller cannot finish it): let go
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def abort(self) -> None:
        """Drop buffered records without committing them (the store stays incomplete).

        A staged writer also removes the shards it wrote: nothing of it stays behind.
        """
        self._pending.clear()
        self._pending_ids.clear()
        self._group_sums.clear()
        self._closed = True
        try:
            if self._staged:
                for d in self._written:
                    if self.fs.exists(d):
                        self.fs.rm(d, recursive=True)
                self._written.clear()
        finally:
            self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ validation
    def _validate(self, r: dict[str, Any], i: int, eid: str) -> dict[str, Any]:
        where = f"record {i} of group {eid!r}"
        keys = set(r)
        unknown = keys - set(SEQUENCE_FIELDS) - set(TOKEN_FIELDS)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed per-sequence keys are "
                f"{sorted(SEQUENCE_FIELDS)} and per-token keys {sorted(TOKEN_FIELDS)}"
            )
        undeclared = (keys & set(TOKEN_FIELDS)) - set(self.meta.fields)
        if undeclared:
            raise ValueError(
                f"{where}: per-token field(s) {sorted(undeclared)} are not in StoreMeta.fields "
                f"{self.meta.fields}; add them to meta.fields or drop them from the record"
            )
        missing = [f for f in self.meta.fields if f not in r] + [
            n for n, f in SEQUENCE_FIELDS.items() if f.required and n not in r
        ]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")

        out: dict[str, Any] = {"example_id": eid}
        role = r["role"]
        if role not in ROLES:
            raise ValueError(f"{where}: role={role!r} is not one of {list(ROLES)}")
        out["role"] = str(role)
        out["group"] = int(r.get("group", 0))
        if out["group"] < 0:
            raise ValueError(f"{where}: group={out['group']} must be >= 0 (rollout index)")
        for name in ("prompt_ids", "response_ids", "teacher_prompt_ids"):
            v = r.get(name)
            if v is None:
                if name == "teacher_prompt_ids":
                    out[name] = None
                    continue
                raise ValueError(f"{where}: {name} is None; pass a 1-D list/array of token ids")
            out[name] = self._ids(v, f"{where}: {name}", ndim=1)
        T = len(out["response_ids"])
        if "n_tokens" in r and int(r["n_tokens"]) != T:
            raise ValueError(
                f"{where}: n_tokens={r['n_tokens']} but len(response_ids)={T}; n_tokens must be "
                f"T (or leave it out and it is filled in)"
            )
        out["n_tokens"] = T
        term = r["is_terminal"]
        if not isinstance(term, (bool, np.bool_)):
            raise ValueError(f"{where}: is_terminal must be a bool, got {type(term).__name__}")
        out["is_terminal"] = bool(term)
        rew = r.get("reward")
        if rew is not None:
            rew = float(rew)
            if not np.isfinite(rew):
                raise ValueError(f"{where}: reward={rew} is not finite; use None for 'no reward'")
        out["reward"] = rew
        for name in TEXT_FIELDS:
            v = r.get(name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}: {name} must be a str or None, got {type(v).__name__}")
            out[name] = v

        k, nb = self.meta.k, len(self.meta.betas)
        for name in self.meta.fields:
            f = TOKEN_FIELDS[name]
            exp = token_shape(name, T, k, nb)
            arr = _to_numpy(r[name])
            symbolic = {"k": "[T, K]", "b": "[T+1, B]", "": "[T]"}[f.trailing]
            if arr.shape != exp:
                raise ValueError(
                    f"{where}: field {name!r} has shape {tuple(arr.shape)}, expected {exp} = "
                    f"{symbolic} with T=len(response_ids)={T}, K=meta.k={k}, "
                    f"B=len(meta.betas)={nb}; fix: {_shape_hint(name)}"
                )
            if f.kind == "ids":
                out[name] = self._ids(arr, f"{where}: {name}", ndim=2)
            else:
                if arr.dtype.kind != "f":
                    raise ValueError(
                        f"{where}: field {name!r} has dtype {arr.dtype}, expected a float array "
                        f"(stored as {f.dtype}); pass log-probs/values as floats"
                    )
                if np.isnan(arr).any():
                    raise ValueError(f"{where}: field {name!r} contains NaN; the teacher scoring "
                                     f"produced invalid numbers for this sequence")
                if self.codec.quantises(name):
                    if self.clamp and f.kind == "logprob":
                        arr = np.maximum(arr, arr.dtype.type(LOGPROB_FLOOR))
                    bad = ~np.isfinite(arr) | (np.abs(arr) > MAX_ABS)
                    if bad.any():
                        raise ValueError(
                            f"{where}: field {name!r} has value {arr[bad].flat[0]} outside "
                            f"±{MAX_ABS} (codec 'compact' quantises finite values only); "
                            f"check for masked (-inf) logits or set options codec='lossless'"
                        )
                    # keep float64 input for exact snapping; float32 is copied below anyway
                    out[name] = arr if arr.dtype == np.float64 else arr.astype(np.float32)
                else:
                    out[name] = arr.astype(np.float32)
        return out

    @staticmethod
    def _ids(v: Any, where: str, ndim: int) -> np.ndarray:
        arr = _to_numpy(v)
        if arr.size == 0:
            return arr.astype(np.int32).reshape(arr.shape if arr.ndim else (0,))
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{where}: dtype {arr.dtype} is not an integer type; pass token ids "
                             f"as ints (int32/int64)")
        if ndim == 1 and arr.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D sequence of ids, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() > _INT32_MAX:
            raise ValueError(f"{where}: ids must lie in [0, 2^31), got min {arr.min()} "
                             f"max {arr.max()}")
        return arr.astype(np.int32)

    # ------------------------------------------------------------------ commit
    def _flush(self) -> None:
        recs, ids = self._pending, self._pending_ids
        index = len(self._manifest["shards"])
        name = f"shard-{index:05d}"
        shard_dir = join(self.root, SHARDS_DIR, name)
        files = build_shard_files(recs, self.meta, self.codec, name)
        # Anything already at this name is an uncommitted leftover of a killed run.
        if self.fs.exists(shard_dir):
            self.fs.rm(shard_dir, recursive=True)
        self._written.append(shard_dir)
        try:
            write_files(self.fs, {join(shard_dir, rel): data for rel, data in files.items()})
        except BaseException:  # e.g. a full disk: leave no half-written shard behind
            try:
                if self.fs.exists(shard_dir):
                    self.fs.rm(shard_dir, recursive=True)
            except OSError:
                pass  # gc removes it later (unreferenced, owner gone)
            raise
        entry = shard_entry(name, recs, len(ids), files,
                            crc=self.schema_version in CRC_SCHEMA_VERSIONS)
        self._manifest["shards"].append(entry)
        self._manifest["complete"] = False
        self._fold(ids)
        if not self._staged:
            self._commit()
        self._done.update(ids)
        self._pending, self._pending_ids = [], []

    def _commit(self) -> None:
        commit_manifest(self.fs, self.root, self._manifest)


def commit_manifest(fs: Any, root: str, m: dict[str, Any]) -> None:
    """Recompute totals and checksums of manifest `m` and replace manifest.json atomically."""
    shards = m["shards"]
    m["totals"] = {
        "n_shards": len(shards),
        "n_records": sum(s["n_records"] for s in shards),
        "n_groups": sum(s["n_groups"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_bytes": sum(f["bytes"] for s in shards for f in s["files"].values()),
    }
    m["checksum"] = hash_json([s["checksum"] for s in shards])
    m["updated"] = _now()
    m.pop("manifest_checksum", None)
    if m.get("schema_version") in CRC_SCHEMA_VERSIONS:
        # over the JSON form, exactly as a reader will parse it (tuples → lists, ...)
        import json

        m["manifest_checksum"] = manifest_checksum(json.loads(json_dumps(m)))
    data = (json_dumps(m) + "\n").encode("utf-8")
    atomic_write(fs, join(root, MANIFEST), data)


def json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, sort_keys=True)


def _shape_hint(name: str) -> str:
    f = TOKEN_FIELDS[name]
    if f.trailing == "k":
        return "one row per response token with the teacher's top-K (K = StoreMeta.k)"
    if f.trailing == "b":
        return ("one row per state s_1..s_{T+1} (including the state after the last token), "
                "one column per β in StoreMeta.betas")
    return "one value per response token"


def build_shard_files(
    recs: list[dict[str, Any]], meta: StoreMeta, codec: CodecSpec, name: str
) -> dict[str, bytes]:
    """Encode validated records into {relative path: bytes} for one shard."""
    import zarr
    from zarr.storage import MemoryStore

    n_tok = np.array([r["n_tokens"] for r in recs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_tok)[:-1]]).astype(np.int64)
    cols: dict[str, pa.Array] = {}
    for col, f in SEQUENCE_FIELDS.items():
        if col in TEXT_FIELDS and all(r.get(col) is None for r in recs):
            continue  # no text in this shard: the columns of a store without text, unchanged
        cols[col] = pa.array([r.get(col) for r in recs], type=f.arrow_type)
    cols["token_offset"] = pa.array(offsets, type=pa.int64())
    table = pa.table(cols)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=9)
    files = {"records.parquet": buf.getvalue()}

    store_dict: dict[str, Any] = {}
    group = zarr.open_group(
        MemoryStore(store_dict),
        mode="w",
        zarr_format=3,
        attributes={"kdcache": {"schema_version": codec.version, "shard": name,
                                "n_records": len(recs), "n_tokens": int(n_tok.sum())}},
    )
    for field_name in meta.fields:
        f = TOKEN_FIELDS[field_name]
        data = np.concatenate([np.asarray(r[field_name]) for r in recs], axis=0)
        attrs: dict[str, Any] = {}
        array_name = field_name
        if codec.ref_as_adv(field_name, meta.fields):
            # ADPA advantage on the grid: q(topk) − q(ref), stored as float32 grid values so
            # plain zarr reads the advantage; ref is rebuilt from the integers (exact).
            topk = np.concatenate([np.asarray(r["topk_logprobs"]) for r in recs], axis=0)
            step = codec.step
            q_adv = (np.rint(np.asarray(topk, np.float64) / step)
                     - np.rint(np.asarray(data, np.float64) / step))
            data = (q_adv * step).astype(np.float32)
            array_name = ADV_ARRAY
            attrs = {"kdcache": {"field": field_name, "base": "topk_logprobs",
                                 "rebuild": f"{field_name} = topk_logprobs - {ADV_ARRAY}",
                                 "exact": "integer grid indices: q_ref = q_topk - q_adv"}}
        elif codec.quantises(field_name):
            data = codec.snap(data)
        data = data.astype(f.dtype, copy=False)
        chunks = (max(1, min(CHUNK_ROWS, data.shape[0])), *data.shape[1:])
        arr = group.create_array(
            array_name,
            shape=data.shape,
            chunks=chunks,
            dtype=f.dtype,
            fill_value=0,
            attributes=attrs or None,
            **codec.zarr_codecs(array_name, data),
        )
        if data.size:
            arr[...] = data
    for key in sorted(store_dict):
        files[f"tokens.zarr/{key}"] = store_dict[key].to_bytes()
    return files


def shard_entry(
    name: str, recs: list[dict[str, Any]], n_groups: int, files: dict[str, bytes],
    crc: bool = True,
) -> dict[str, Any]:
    """Manifest entry for a shard; `checksum` covers counts and per-file hashes, no times.

    Each file has its sha256 (`kdcache store verify`) and, with `crc` (v4+), its crc32c
    (checked by readers on every fetch; cheap).
    """
    entry: dict[str, Any] = {
        "name": name,
        "n_records": len(recs),
        "n_groups": n_groups,
        "n_tokens": int(sum(r["n_tokens"] for r in recs)),
        "first_example_id": recs[0]["example_id"],
        "last_example_id": recs[-1]["example_id"],
        "files": {
            rel: {"sha256": hash_bytes(data), "bytes": len(data),
                  **({"crc32c": crc32c(data)} if crc else {})}
            for rel, data in sorted(files.items())
        },
    }
    entry["checksum"] = hash_json(entry)
    return entry
