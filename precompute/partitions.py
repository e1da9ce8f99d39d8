"""What a partition store of a precompute run is: its meta (`partitioned`, `unpartitioned`)
and how such stores are merged (`kdcache store merge`).

`--partition i/N` writes one store per part whose meta is the whole run's plus the options
`partition` ([i, N]) and `partition_plan` (what decides which examples a part holds). The
store's merge (`kdcache.store.admin.merge`) knows none of that: this module hands it the
whole run's meta and `unpartitioned` as what the inputs must agree on. `--merge-parts`
(launch.py) also hands it the single run's batch plan as the order.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .config import PrecomputeConfig
from .storeapi import StoreMeta, merge, open_store

__all__ = ["merge_stores", "partition_plan", "partitioned", "unpartitioned"]


def partition_plan(cfg: PrecomputeConfig) -> dict[str, Any]:
    """The settings that decide which examples partition i/N holds (in its key)."""
    return asdict(cfg.batch_plan)


def partitioned(meta: StoreMeta, part: tuple[int, int], plan: dict[str, Any]) -> StoreMeta:
    """The meta the run's partition `part` = (i, N) writes (prepare() differs only there)."""
    d = meta.to_dict()
    d["options"] = dict(d["options"], partition=list(part))
    d["options"].pop("partition_plan", None)
    d["options"]["partition_plan"] = plan
    return StoreMeta.from_dict(d)


def unpartitioned(meta: StoreMeta) -> StoreMeta:
    """The meta an unpartitioned run of the same inputs writes (partition: None)."""
    d = meta.to_dict()
    opts = {k: v for k, v in d.get("options", {}).items() if k != "partition_plan"}
    if "partition" in opts:
        opts["partition"] = None
    return StoreMeta.from_dict({**d, "options": opts})


def _in_partition_order(stores: list[Any]) -> tuple[list[Any], StoreMeta]:
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
        raise ValueError(f"partition stores of different counts {sorted(counts)}: merge the N "
                         "parts of one run")
    (n,) = counts
    index = [int(p[0]) for p in parts]
    missing = sorted(set(range(n)) - set(index))
    dup = sorted({i for i in index if index.count(i) > 1})
    if missing or dup:
        raise ValueError(f"partitions of {n}: missing {missing}, repeated {dup}; pass each of "
                         f"0/{n} .. {n - 1}/{n} exactly once")
    ordered = [st for _, st in sorted(zip(index, stores, strict=True), key=lambda x: x[0])]
    return ordered, unpartitioned(stores[0].meta)


def merge_stores(urls: list[str], out: str, option: str = "OUT") -> str:
    """`kdcache store merge`: stores with one meta, or the complete partition stores of one
    precompute run (all N parts, any order), into a new store at `out` under the
    unpartitioned run's meta (its key). Partitions are taken part after part; `--merge-parts`
    restores the single run's shard order too."""
    if not urls:
        raise ValueError("merge needs at least one input store")
    stores, meta = _in_partition_order([open_store(u) for u in urls])
    return merge([st.url for st in stores], out, meta=meta, agree=unpartitioned, option=option)
