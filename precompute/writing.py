"""`GroupWriter`: how precompute and rollout hand groups to the store's `StoreWriter`.

Nothing new is written before the first group: a new store's writer (which commits an empty
manifest when it is created) is made only when the first group arrives, so a run that fails
while loading models or scoring its first batch leaves no store behind. An existing store is
opened at once (read only): a store with other settings is refused before any model is
loaded, and its committed example ids tell the run what to skip.
"""

from __future__ import annotations

from typing import Any

from .storeapi import NoStoreError, StoreMeta, StoreWriter, open_store


class GroupWriter:
    """A `StoreWriter` created on first use; `done` = groups already committed (resume)."""

    def __init__(self, url: str, meta: StoreMeta, shard_records: int, resume: bool,
                 report_key: str | None = None) -> None:
        self.url, self.meta = url, meta
        self.shard_records, self.resume = shard_records, resume
        self.report_key = report_key
        self._w: StoreWriter | None = None
        try:
            open_store(url)
            exists = True
        except (NoStoreError, NotADirectoryError):
            exists = False
        if exists:  # refuses other settings / resume=False now, before any model is loaded
            self._w = StoreWriter(url, meta, shard_records=shard_records, resume=resume)
        self.done: set[str] = self._w.done_example_ids if self._w is not None else set()
        self.created = not exists

    def _writer(self) -> StoreWriter:
        if self._w is None:
            self._w = StoreWriter(self.url, self.meta, shard_records=self.shard_records,
                                  resume=self.resume)
        return self._w

    def existing_report(self) -> dict[str, Any]:
        """The report a resumed store carries ({} for a new store); creates nothing."""
        if self._w is None:
            return {}
        return dict(self._w.manifest.get(self.report_key or "report", {}))

    @property
    def report(self) -> dict[str, Any]:
        """The manifest's report section (committed with every shard)."""
        return self._writer().manifest.setdefault(self.report_key or "report", {})

    def add_group(self, records: list[dict[str, Any]]) -> None:
        self._writer().add_group(records)

    def close(self, report: dict[str, Any] | None = None) -> None:
        """Commit the last shard and mark the store complete (creating it if still empty)."""
        w = self._writer()
        if report and self.report_key:
            w.manifest.setdefault(self.report_key, {}).update(report)
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
