"""Read the first group of the run in a background thread while the student loads.

The first store read (fetch and decode of the first shard) would otherwise sit between the
model load and the first step. Only the FIRST group is read ahead: the reader's position
(`consumed`, saved in every checkpoint) then already counts a group that the first step
takes anyway, before any checkpoint can be written, so resume stays exact. After it the
stream is read in the loop's own thread, as before (the store prefetches shards itself).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any


class FirstAhead:
    """An iterator over `it` whose first item is being fetched from construction on."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._fetch, name="kdcache-first-group", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it))
        except BaseException as e:  # StopIteration or a store error: raised in the caller's thread
            self._error = e

    def __iter__(self) -> FirstAhead:
        return self

    def __next__(self) -> Any:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            return self._first.pop()
        return next(self._it)
