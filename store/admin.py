"""Store housekeeping: list stores with provenance, garbage-collect, merge partitions.

Why here and not in the CLI: these walk the on-disk layout, which only `kdcache.store`
is allowed to know about.
"""

from __future__ import annotations

import time
from typing import Any

from ._io import MANIFEST, SHARDS_DIR, TMP_MARK, join, open_fs, read_manifest
from .fingerprint import store_key
from .format import SCHEMA_VERSION, StoreMeta
from .reader import open_store
from .writer import StoreWriter

__all__ = ["list_stores", "gc", "merge"]


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _manifests(fs: Any, root: str) -> list[str]:
    """Store directories under `root` (including root itself)."""
    found = fs.glob(join(root, "**", MANIFEST)) if fs.isdir(root) else []
    dirs = sorted({p.rsplit("/", 1)[0] for p in found if "/" + SHARDS_DIR + "/" not in p})
    return dirs


def list_stores(root: str) -> list[dict[str, Any]]:
    """Every store under `root` with its provenance (key, models, dataset, size, state)."""
    fs, base = open_fs(root)
    out = []
    for d in _manifests(fs, base):
        m = read_manifest(fs, d)
        if m is None:
            continue
        meta = m.get("meta", {})
        try:
            key = store_key(StoreMeta.from_dict(meta))
        except (TypeError, ValueError):
            key = m.get("store_key")
        out.append({
            "url": _url(fs, d),
            "key": key,
            "schema_version": m.get("schema_version"),
            "models": meta.get("models"),
            "dataset": meta.get("dataset"),
            "fields": meta.get("fields"),
            "n_records": m.get("totals", {}).get("n_records", 0),
            "n_tokens": m.get("totals", {}).get("n_tokens", 0),
            "n_bytes": m.get("totals", {}).get("n_bytes", 0),
            "complete": bool(m.get("complete")),
            "updated": m.get("updated"),
        })
    return out


def _age_s(fs: Any, path: str) -> float:
    try:
        return time.time() - fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, OSError, KeyError):
        return float("inf")


def gc(root: str, min_age_s: float = 3600.0, dry_run: bool = False) -> dict[str, Any]:
    """Remove files no manifest references (dead shards, leftovers, temp files).

    A running writer's next shard is unreferenced until it commits, so only files older
    than `min_age_s` are removed: never gc a store a writer is using with min_age_s=0.
    Returns {"removed": [paths], "bytes_freed": n, "dry_run": bool}.
    """
    fs, base = open_fs(root)
    removed: list[str] = []
    freed = 0
    for d in _manifests(fs, base):
        m = read_manifest(fs, d)
        if m is None:
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
            if _age_s(fs, p) < min_age_s:
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
    return {"removed": removed, "bytes_freed": freed, "dry_run": dry_run}


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
    n = shard_records or int(stores[0].manifest.get("shard_records", 1024))
    # Compact values are on their version's grid; re-encoding them on the same grid is
    # exact, on another grid it would add a second rounding.  So v2 inputs give a v2 output.
    versions = {st.schema_version for st in stores}
    if len(versions) > 1 and meta.options.get("codec", "compact") == "compact":
        raise ValueError(f"cannot merge compact stores of schema versions {sorted(versions)}: "
                         f"their grids differ; merge stores of one version")
    version = 2 if versions == {2} else SCHEMA_VERSION
    seen: set[str] = set()
    with StoreWriter(out_url, meta, shard_records=n, resume=False,
                     _schema_version=version) as w:
        for u, st in zip(urls, stores, strict=True):
            for group in st.groups():
                eid = group[0]["example_id"]
                if eid in seen:
                    raise ValueError(f"example_id {eid!r} of {u} is also in an earlier input; "
                                     f"partitions must be disjoint")
                seen.add(eid)
                w.add_group(group)
    return out_url
