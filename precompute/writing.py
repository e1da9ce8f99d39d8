"""`GroupWriter`: how precompute and rollout hand groups to the store's `StoreWriter`.

Off the critical path: with `background=True` the groups go through a bounded queue to one
writer thread that runs `StoreWriter.add_group` (validation, shard encoding — zstd/blosc and
numpy release the GIL —, file writes, the manifest commit), so the scorer does not wait while
a shard is compressed. The queue holds at most `max_queue_bytes` of record arrays: when the
writer falls behind, `add_group` blocks (the time is `wait_s`), so memory stays bounded. The
StoreWriter sees exactly the groups, in exactly the order, the inline path gives it, so the
commit protocol and the byte-identical resume are unchanged. An error in the writer thread
(e.g. a full disk) is raised in the caller's thread, as is, at its next `add_group` or at
`close`; after an error or `abort` nothing more is committed.

Nothing new is written before the first group: a new store's writer (which commits an empty
manifest when it is created) is made only when the first group arrives, so a run that fails
while loading models or scoring its first batch leaves no store behind. An existing store is
opened at once (read only): a store with other settings is refused before any model is
loaded, and its committed example ids tell the run what to skip.

The report sums, the report section and the clamping of log-probs to the codec's range are
the StoreWriter's (`report_key`, `sum_keys`, `clamp`): this class only queues.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .storeapi import NoStoreError, StoreMeta, StoreWriter, lock_for, open_store

MAX_QUEUE_BYTES = 256 << 20  # record arrays waiting for the writer thread
_STOP = object()


def _nbytes(records: list[dict[str, Any]]) -> int:
    return sum(v.nbytes for r in records for v in r.values() if isinstance(v, np.ndarray))


class GroupWriter:
    """A `StoreWriter` created on first use; `done` = groups already committed (resume).
    `report_key`, `sum_keys` and `clamp` are the StoreWriter's."""

    def __init__(self, url: str, meta: StoreMeta, shard_records: int, resume: bool,
                 report_key: str = "report", sum_keys: Sequence[str] = (),
                 background: bool = False, max_queue_bytes: int = MAX_QUEUE_BYTES,
                 clamp: bool = False, tokenizer_files: dict[str, bytes] | None = None) -> None:
        self.url, self.meta = url, meta
        self.background, self.max_queue_bytes = background, int(max_queue_bytes)
        # background state: queue of (records, sums), its bytes, the thread, its error
        self._queue: deque[Any] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.wait_s = 0.0  # caller blocked on a full queue
        self.drain_s = 0.0  # caller waiting in close() for the queue to empty
        self.busy_s = 0.0  # writer thread inside StoreWriter.add_group
        self._writer_kw = {"shard_records": shard_records, "resume": resume,
                           "report_key": report_key, "sum_keys": tuple(sum_keys), "clamp": clamp,
                           "tokenizer_files": tokenizer_files}
        self._w: StoreWriter | None = None
        # the store's writer lock, from before anything is read or a model is loaded until
        # close/abort: a second precompute/rollout on this output fails now, naming the first
        self._lock = lock_for(url)
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._open(url, meta, shard_records, resume)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _open(self, url: str, meta: StoreMeta, shard_records: int, resume: bool) -> None:
        try:
            open_store(url)
            exists = True
        except (NoStoreError, NotADirectoryError):
            exists = False
        self.done: set[str] = set()
        if exists:  # refuses other settings / resume=False now, before any model is loaded
            self._w = StoreWriter(url, meta, **self._writer_kw, _lock=False)  # held by this GroupWriter
            self.done = self._w.done_example_ids

    def _writer(self) -> StoreWriter:
        if self._w is None:
            self._w = StoreWriter(self.url, self.meta, **self._writer_kw,
                                  _lock=False)  # held by this GroupWriter
        return self._w

    def add_group(self, records: list[dict[str, Any]], sums: dict[str, float] | None = None
                  ) -> None:
        """Hand over one group (committed with its shard); `sums` are this group's report sums.
        In the background mode this returns once the group is queued (blocking while the
        queue is full) and raises an error the writer thread met."""
        if not self.background:
            t0 = time.perf_counter()
            self._writer().add_group(records, sums)
            self.busy_s += time.perf_counter() - t0
            return
        size = _nbytes(records)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="kdcache-writer",
                                                daemon=True)
                self._thread.start()
            t0 = time.perf_counter()  # _queued_bytes includes the group being written
            while (self._error is None and self._queued_bytes
                   and self._queued_bytes + size > self.max_queue_bytes):
                self._cond.wait()
            self.wait_s += time.perf_counter() - t0
            if self._error is not None:
                raise self._error
            self._queue.append((records, sums, size))
            self._queued_bytes += size
            self._cond.notify_all()

    def _drain(self) -> None:
        """The writer thread: StoreWriter.add_group for each queued group, in order."""
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
            if item is _STOP:
                return
            records, sums, size = item
            t0 = time.perf_counter()
            try:
                self._writer().add_group(records, sums)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                with self._cond:
                    self._error = e
                    self._queue.clear()
                    self._queued_bytes = 0
                    self._cond.notify_all()
                return
            self.busy_s += time.perf_counter() - t0
            with self._cond:
                self._queued_bytes -= size
                self._cond.notify_all()

    def _stop(self, discard: bool) -> None:
        """Let the thread finish the queue (or drop it) and end; re-raise its error."""
        if self._thread is None:
            return
        t0 = time.perf_counter()
        with self._cond:
            if discard:  # the group being written (if any) still finishes
                self._queued_bytes -= sum(item[2] for item in self._queue if item is not _STOP)
                self._queue.clear()
            self._queue.append(_STOP)
            self._cond.notify_all()
        self._thread.join()
        self._thread = None
        self.drain_s += time.perf_counter() - t0
        if self._error is not None and not discard:
            raise self._error

    def close(self, report: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]]
              | None = None) -> None:
        """Commit the last shard and mark the store complete (creating it if still empty);
        `report` goes to `StoreWriter.close`."""
        self._stop(discard=False)
        try:
            self._writer().close(report)
        finally:
            self._release()

    def abort(self) -> None:
        """Drop what is not committed; the committed shards stay for a resume."""
        try:
            self._stop(discard=True)
            if self._w is not None:
                self._w.abort()
        finally:
            self._release()

    def __enter__(self) -> GroupWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
