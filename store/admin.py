"""Store housekeeping: list stores with provenance, garbage-collect, merge partitions.

Why here and not in the CLI: these walk the on-disk layout, which only `kdcache.store`
is allowed to know about.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from ._io import (
    MANIFEST,
    SHARDS_DIR,
    TMP_MARK,
    is_local,
    join,
    open_fs,
    read_manifest,
    temp_name,
    temp_owner_dead,
)
from .fingerprint import store_key
from .format import SCHEMA_VERSION, StoreMeta
from .integrity import manifest_problems
from .reader import open_store
from .writer import STALE_TEMP_S, NoStoreError, StoreWriter

__all__ = ["list_stores", "gc", "merge", "DEFAULT_GC_MIN_AGE_S"]

#: `gc` removes unreferenced files only when they are at least this old (seconds): a
#: running writer's next shard is unreferenced until it commits.
DEFAULT_GC_MIN_AGE_S = STALE_TEMP_S


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _root(root: str) -> tuple[Any, str]:
    """(fs, path) of an existing directory/prefix; a missing root is a one-line error."""
    fs, base = open_fs(root)
    if not fs.exists(base):
        raise NoStoreError(f"{root} does not exist: pass the directory (or bucket prefix) that "
                           f"holds the stores")
    if not fs.isdir(base):
        raise NotADirectoryError(f"{root} is a file, not a directory of stores: pass the "
                                 f"directory (or bucket prefix) that holds the stores")
    return fs, base


def _manifests(fs: Any, root: str) -> list[str]:
    """Store directories under `root` (including root itself)."""
    found = fs.glob(join(root, "**", MANIFEST)) if fs.isdir(root) else []
    dirs = sorted({p.rsplit("/", 1)[0] for p in found if "/" + SHARDS_DIR + "/" not in p})
    return dirs


def _damage(m: dict[str, Any] | None, url: str) -> str | None:
    """Why a store's manifest cannot be trusted (None when it can)."""
    if m is None:
        return "manifest.json disappeared"
    try:
        found = manifest_problems(m, url)
    except ValueError as e:
        return str(e)
    return f"manifest.json {found[0][1]}" if found else None


def list_stores(root: str) -> list[dict[str, Any]]:
    """Every store under `root` with its provenance (key, models, dataset, size, state).

    A store whose manifest is damaged is listed with `"damaged": reason` (and what could
    be read), so one bad store does not hide the others.
    """
    fs, base = _root(root)
    out = []
    for d in _manifests(fs, base):
        url = _url(fs, d)
        try:
            m = read_manifest(fs, d)
        except ValueError as e:
            out.append({"url": url, "damaged": str(e)})
            continue
        if m is None:
            continue
        meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
        try:
            key = store_key(StoreMeta.from_dict(meta), m.get("schema_version"))
        except (TypeError, ValueError):
            key = m.get("store_key")
        totals = m.get("totals") if isinstance(m.get("totals"), dict) else {}
        row = {
            "url": url,
            "key": key,
            "schema_version": m.get("schema_version"),
            "models": meta.get("models"),
            "dataset": meta.get("dataset"),
            "fields": meta.get("fields"),
            "n_records": totals.get("n_records", 0),
            "n_tokens": totals.get("n_tokens", 0),
            "n_bytes": totals.get("n_bytes", 0),
            "complete": bool(m.get("complete")),
            "updated": m.get("updated"),
        }
        bad = _damage(m, url)
        if bad:
            row["damaged"] = bad
        out.append(row)
    return out


def _age_s(fs: Any, path: str) -> float:
    try:
        return time.time() - fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, OSError, KeyError):
        return float("inf")


def _stale(fs: Any, path: str, min_age_s: float) -> bool:
    """Not in use by a live writer: its owner process is gone, or it is old enough."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return (TMP_MARK in name and temp_owner_dead(name)) or _age_s(fs, path) >= min_age_s


def _newest_age(fs: Any, path: str) -> float:
    """Age of the most recently modified file under `path` (a directory)."""
    ages = [_age_s(fs, p) for p in fs.find(path)]
    return min(ages) if ages else _age_s(fs, path)


def gc(root: str, min_age_s: float = DEFAULT_GC_MIN_AGE_S,
       dry_run: bool = False) -> dict[str, Any]:
    """Remove files no manifest references (dead shards, leftovers, temp files).

    A running writer's next shard is unreferenced until it commits, so only files older
    than `min_age_s` (default one hour) are removed; temp files (`*.tmp-*`) whose writer
    process is gone (same host) are removed at any age, and so are the temporary output
    directories of a killed `merge`.  Never gc a store a writer is using with min_age_s=0.
    A store whose manifest is damaged is skipped (listed under "skipped"): deleting by a
    corrupt shard list could delete live shards.
    Returns {"removed": [paths], "bytes_freed": n, "dry_run": bool, "skipped": [...]}.
    """
    if not isinstance(min_age_s, (int, float)) or not math.isfinite(min_age_s) \
            or min_age_s < 0:
        raise ValueError(f"min_age_s={min_age_s!r} must be a number of seconds >= 0")
    fs, base = _root(root)
    removed: list[str] = []
    skipped: list[str] = []
    freed = 0
    for d in _manifests(fs, base):
        if TMP_MARK in d.rsplit("/", 1)[-1] and d != base:
            # the temporary output of a merge: removed whole once its owner is gone
            name = d.rsplit("/", 1)[-1]
            if temp_owner_dead(name) or _newest_age(fs, d) >= min_age_s:
                size = sum(int(i.get("size") or 0) for i in fs.find(d, detail=True).values())
                removed.append(_url(fs, d))
                freed += size
                if not dry_run:
                    fs.rm(d, recursive=True)
            continue
        try:
            m = read_manifest(fs, d)
        except ValueError as e:
            skipped.append(f"{_url(fs, d)}: {e}")
            continue
        bad = _damage(m, _url(fs, d))
        if bad:
            skipped.append(f"{_url(fs, d)}: {bad}")
            continue
        keep = {join(d, MANIFEST)}
        for s in m["shards"]:
            for rel in s["files"]:
                keep.add(join(d, SHARDS_DIR, s["name"], rel))
        candidates = []
        for p, info in fs.find(d, detail=True).items():
            p = p.rstrip("/")
            if p in keep or info.get("type") == "directory":
                continue
            in_shards = p.startswith(join(d, SHARDS_DIR) + "/")
            if in_shards or TMP_MARK in p.rsplit("/", 1)[-1]:
                candidates.append((p, int(info.get("size") or 0)))
        for p, size in candidates:
            if not _stale(fs, p, min_age_s):
                continue
            removed.append(_url(fs, p))
            freed += size
            if not dry_run:
                fs.rm(p)
        if not dry_run:  # drop now-empty shard directories (local filesystems keep them)
            live = {s["name"] for s in m["shards"]}
            sd = join(d, SHARDS_DIR)
            if fs.isdir(sd):
                for sub in fs.ls(sd, detail=False):
                    name = sub.rstrip("/").rsplit("/", 1)[-1]
                    if name not in live and not fs.find(sub):
                        fs.rm(sub, recursive=True)
    return {"removed": removed, "bytes_freed": freed, "dry_run": dry_run, "skipped": skipped}


_PARTITION_KEYS = ("partition", "partition_plan")


def _without_partition(meta: StoreMeta) -> StoreMeta:
    """The meta an unpartitioned run of the same inputs writes (partition: None)."""
    d = meta.to_dict()
    opts = {k: v for k, v in d.get("options", {}).items() if k != "partition_plan"}
    if "partition" in opts:
        opts["partition"] = None
    return StoreMeta.from_dict({**d, "options": opts})


def _unpartitioned(urls: list[str], stores: list) -> tuple[list, StoreMeta]:
    """Partition stores i/N of one run, ordered by i, and the meta of the whole run; other
    stores unchanged. A missing or repeated part is named."""
    parts = [st.meta.options.get("partition") for st in stores]
    if not any(parts):
        return stores, stores[0].meta
    if not all(parts):
        raise ValueError("cannot merge partition stores with unpartitioned ones: pass only the "
                         "N partition stores of one run")
    counts = {int(p[1]) for p in parts}
    if len(counts) != 1:
        raise ValueError(f"partition stores of different counts {sorted(counts)}: merge the N parts of one run")
    (n,) = counts
    index = [int(p[0]) for p in parts]
    missing = sorted(set(range(n)) - set(index))
    dup = sorted({i for i in index if index.count(i) > 1})
    if missing or dup:
        raise ValueError(f"partitions of {n}: missing {missing}, repeated {dup}; pass each of "
                         f"0/{n} .. {n - 1}/{n} exactly once")
    ordered = [st for _, st in sorted(zip(index, stores, strict=True), key=lambda x: x[0])]
    return ordered, _without_partition(stores[0].meta)


def merge(urls: list[str], out_url: str, shard_records: int | None = None) -> str:
    """Concatenate partition stores with identical meta into one store at `out_url`.

    Partition stores of one precompute run (`--partition i/N`, metas equal but for the
    partition) are accepted as the full set 0..N-1 and merged under the unpartitioned meta,
    so the result has the single run's key and records; `kdcache precompute --merge-parts N`
    also reproduces the single run's shard order, from its batch plan.

    Groups are re-encoded in `urls` order with the same shard rule a single run uses, so
    merging the partitions of a run equals that run written in one go (same shard
    checksums); compact-codec values are already on the grid and re-encode exactly.
    """
    if not urls:
        raise ValueError("merge needs at least one input store")
    if shard_records is not None and int(shard_records) < 1:
        raise ValueError(f"shard_records must be >= 1, got {shard_records}")
    fs, out_root = open_fs(out_url)
    _check_out_free(fs, out_root, out_url, urls)
    stores = [open_store(u) for u in urls]
    stores, meta = _unpartitioned(urls, stores)
    urls = [st.url for st in stores]
    for u, st in zip(urls[1:], stores[1:], strict=True):
        a, b = _without_partition(meta).content_dict(), _without_partition(st.meta).content_dict()
        if a != b:
            diff = sorted(k for k in a if a[k] != b[k])
            raise ValueError(f"cannot merge {u} into {urls[0]}: meta differs in {diff}; only "
                             f"partitions of one precompute run can be merged")
    for u, st in zip(urls, stores, strict=True):
        if not st.complete:
            raise ValueError(f"cannot merge {u}: the store is incomplete (its writer did not "
                             f"close); finish or resume that run first")
    n = int(shard_records or stores[0].manifest.get("shard_records", 1024))
    # Compact values are on their version's grid; re-encoding them on the same grid is
    # exact, on another grid it would add a second rounding.  v2's grid differs from v3's
    # (v3 and v4 share theirs), so v2 inputs give a v2 output and are never mixed.
    versions = {2 if st.schema_version <= 2 else 3 for st in stores}
    if len(versions) > 1 and meta.options.get("codec", "compact") == "compact":
        raise ValueError(f"cannot merge compact stores of schema versions "
                         f"{sorted({st.schema_version for st in stores})}: their grids differ; "
                         f"merge stores of one version")
    version = 2 if versions == {2} else SCHEMA_VERSION
    # Nothing is written before this point.  Locally the store is built under a temporary
    # sibling name and renamed into place (atomic); on object stores nothing is committed
    # until the one manifest write at the end, and a failure removes what was written.
    local = is_local(fs)
    parent, leaf = os.path.split(out_root) if local else ("", out_root)
    target = os.path.join(parent, temp_name(leaf)) if local else out_url
    made = _first_missing(parent) if local else None  # created below, removed on failure
    seen: set[str] = set()
    try:
        with StoreWriter(target, meta, shard_records=n, resume=False,
                         _schema_version=version, _staged=not local) as w:
            for u, st in zip(urls, stores, strict=True):
                for group in st.groups():
                    eid = group[0]["example_id"]
                    if eid in seen:
                        raise ValueError(f"example_id {eid!r} of {u} is also in an earlier "
                                         f"input; partitions must be disjoint")
                    seen.add(eid)
                    w.add_group(group)
        if local:
            if os.path.isdir(out_root):
                os.rmdir(out_root)  # empty (checked above); rename cannot replace it portably
            os.rename(target, out_root)
    except BaseException:
        if local and fs.exists(target):
            fs.rm(target, recursive=True)
        d = os.path.abspath(parent)
        while made and d.startswith(made) and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)  # only the (now empty) directories this merge created
            d = os.path.dirname(d)
        raise
    return out_url


def _first_missing(path: str) -> str | None:
    """The top-most directory of `path` that does not exist yet (None: it all exists)."""
    missing = None
    p = os.path.abspath(path)
    while not os.path.exists(p):
        missing, p = p, os.path.dirname(p)
    return missing


def _check_out_free(fs: Any, root: str, out_url: str, inputs: list[str]) -> None:
    """OUT must be new (or an empty directory) and none of the inputs."""
    for u in inputs:
        if open_fs(u)[1] == root:
            raise ValueError(f"merge output {out_url} is also an input: write to a new location")
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root, detail=False)):
        what = "a store" if fs.exists(join(root, MANIFEST)) else "something"
        raise FileExistsError(f"merge output {out_url} already holds {what}: choose a new "
                              f"location, or delete it first")
    if is_local(fs):
        anc = _existing_ancestor(root)
        if not os.path.isdir(anc) or not os.access(anc, os.W_OK):
            raise PermissionError(f"cannot write {out_url}: {anc} is not a writable directory")


def _existing_ancestor(path: str) -> str:
    """The deepest existing directory above `path` (local)."""
    p = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p
