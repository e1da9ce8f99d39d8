"""`GroupWriter`: how precompute and rollout hand groups to the store's `StoreWriter`.

Nothing new is written before the first group: a new store's writer (which commits an empty
manifest when it is created) is made only when the first group arrives, so a run that fails
while loading models or scoring its first batch leaves no store behind. An existing store is
opened at once (read only): a store with other settings is refused before any model is
loaded, and its committed example ids tell the run what to skip.

Report sums that stay exact across a kill and a resume: each group's sums (e.g. scored
tokens, top-K mass) go into the manifest's report as `uncommitted_sums[example_id]` when the
group is handed over, and are folded into `sum_<key>` once the writer has committed the
group's shard. The manifest is only ever written by a commit, so a committed manifest
holds in `sum_*` only committed groups, and in `uncommitted_sums` every group added since;
a resumed run counts the entries whose group is committed and drops the others (their groups
are scored and added again). The entries are few: the groups of the shard being filled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .storeapi import NoStoreError, StoreMeta, StoreWriter, open_store

UNCOMMITTED = "uncommitted_sums"


class GroupWriter:
    """A `StoreWriter` created on first use; `done` = groups already committed (resume)."""

    def __init__(self, url: str, meta: StoreMeta, shard_records: int, resume: bool,
                 report_key: str = "report", sum_keys: Sequence[str] = ()) -> None:
        self.url, self.meta = url, meta
        self.shard_records, self.resume = shard_records, resume
        self.report_key, self.sum_keys = report_key, tuple(sum_keys)
        self._w: StoreWriter | None = None
        try:
            open_store(url)
            exists = True
        except (NoStoreError, NotADirectoryError):
            exists = False
        self._sums = dict.fromkeys(self.sum_keys, 0.0)  # of committed groups
        self._pending: deque[str] = deque()  # example ids added, not yet known committed
        self._committed = 0
        if exists:  # refuses other settings / resume=False now, before any model is loaded
            self._w = StoreWriter(url, meta, shard_records=shard_records, resume=resume)
            self._resume_sums()
        self.done: set[str] = self._w.done_example_ids if self._w is not None else set()
        self.created = not exists

    def _writer(self) -> StoreWriter:
        if self._w is None:
            self._w = StoreWriter(self.url, self.meta, shard_records=self.shard_records,
                                  resume=self.resume)
        return self._w

    def _report(self) -> dict[str, Any]:
        return self._writer().manifest.setdefault(self.report_key, {})

    def _n_committed(self) -> int:
        return int(self._writer().manifest.get("totals", {}).get("n_groups", 0))

    def _resume_sums(self) -> None:
        report = self._report()
        done = self._writer().done_example_ids
        for k in self.sum_keys:
            self._sums[k] = float(report.get(f"sum_{k}", 0.0))
        for eid, values in report.pop(UNCOMMITTED, {}).items():
            if eid in done:  # committed after the last fold: count it; else it is redone
                for k, v in zip(self.sum_keys, values, strict=True):
                    self._sums[k] += float(v)
        self._committed = self._n_committed()
        self._write_sums(report)

    def _write_sums(self, report: dict[str, Any]) -> None:
        for k, v in self._sums.items():
            report[f"sum_{k}"] = v

    def add_group(self, records: list[dict[str, Any]], sums: dict[str, float] | None = None
                  ) -> None:
        """Hand over one group (committed with its shard); `sums` are this group's report sums."""
        w = self._writer()
        eid = str(records[0].get("example_id"))
        report = self._report()
        if self.sum_keys:
            report.setdefault(UNCOMMITTED, {})[eid] = [float((sums or {}).get(k, 0.0))
                                                       for k in self.sum_keys]
            self._pending.append(eid)
        w.add_group(records)
        if self.sum_keys and self._n_committed() > self._committed:
            self._fold(report)

    def _fold(self, report: dict[str, Any]) -> None:
        """Groups commit in order: the first (now committed - before) pending ones are in."""
        n = self._n_committed()
        uncommitted = report.get(UNCOMMITTED, {})
        while self._committed < n and self._pending:
            values = uncommitted.pop(self._pending.popleft(), None)
            for k, v in zip(self.sum_keys, values or (), strict=False):
                self._sums[k] += v
            self._committed += 1
        self._committed = n
        self._write_sums(report)

    def close(self, report: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]]
              | None = None) -> None:
        """Commit the last shard and mark the store complete (creating it if still empty).
        `report` (or report(final sums)) is merged into the manifest's report section."""
        w = self._writer()
        rep = self._report()
        sums = dict(self._sums)
        for values in rep.pop(UNCOMMITTED, {}).values():  # all commit now
            for k, v in zip(self.sum_keys, values, strict=True):
                sums[k] += v
        for k, v in sums.items():
            rep[f"sum_{k}"] = v
        rep.update(report(sums) if callable(report) else (report or {}))
        w.close()

    def abort(self) -> None:
        """Drop what is not committed; the committed shards stay for a resume."""
        if self._w is not None:
            self._w.abort()

    def __enter__(self) -> GroupWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
