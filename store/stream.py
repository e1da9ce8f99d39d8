"""StreamReader: shuffled, partitioned, resumable iteration over groups for training.

Why groups: every loss pairs records of one example (chosen/rejected, G rollouts), so the
group is the unit a trainer consumes.  Why shard-level partitioning: a shard is the unit of
I/O, so giving each (rank, DataLoader worker) replica whole shards means every byte is
fetched and decoded once per epoch, not once per replica.

Order, for a given (seed, epoch):
  1. shards are permuted by `rng(seed, epoch)` and cut into consecutive *windows* of
     `shuffle_window` shards (default 1: a window is a shard);
  2. the window list is dealt round-robin to the world_size ranks, and each rank's list is
     dealt round-robin to its DataLoader workers (so a rank's windows do not depend on
     num_workers);
  3. each replica walks its windows in order; inside a window the groups of all its shards
     are permuted jointly — by `rng(seed, epoch, shard index)` for a one-shard window (the
     pre-window behaviour, unchanged), by `rng(seed, epoch, window index, W)` otherwise.
     This is the cross-shard shuffle buffer: W shards are held decoded at once.
Steps 1 and 3 do not depend on world_size or num_workers, so the group order inside every
window is the same whatever the parallelism; each group is yielded exactly once per epoch
across all replicas.  (Behind a DataLoader, workers' windows are interleaved group by group,
which does depend on num_workers — as with any IterableDataset.)  Per-replica group counts
can differ by up to one window's worth; `len(reader)` gives this rank's count so a DDP
trainer can agree on a step budget.

Resume: `state_dict()` is `{epoch, seed, consumed}` (plus `shuffle_window` when > 1) where
`consumed` counts groups this rank has taken.  With num_workers = 0 the reader counts them
itself; behind a torch DataLoader (batch_size=None, in-order) pass the count you took to
`state_dict(consumed=n)`: on load, each worker recomputes its own skip count by replaying
the DataLoader's round-robin.  Whole windows are skipped without fetching them.  A state
saved when the whole epoch was consumed resumes at the start of the next epoch (the order
an uninterrupted run continues with after `set_epoch(epoch + 1)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .reader import Store, open_store

try:  # a DataLoader only treats IterableDataset subclasses as streams
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover - torch is a hard dependency of kdcache
    _Base = object  # type: ignore[assignment,misc]

__all__ = ["StreamReader"]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


class StreamReader(_Base):  # type: ignore[misc,valid-type]
    """Iterate groups of `store` (a Store or URL) for one rank; see module docstring."""

    def __init__(
        self,
        store: Store | str,
        fields: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        shuffle_window: int = 1,
    ) -> None:
        self.store = open_store(store) if isinstance(store, str) else store
        self.fields = tuple(self.store.fields if fields is None else fields)
        unknown = [f for f in self.fields if f not in self.store.fields]
        if unknown:
            raise KeyError(f"fields {unknown} are not in {self.store.url} "
                           f"(it has {self.store.fields})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must satisfy 0 <= rank < world_size={world_size}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.prefetch = int(prefetch)
        if int(shuffle_window) < 1:
            raise ValueError(f"shuffle_window={shuffle_window} must be >= 1 (shards per window)")
        self.shuffle_window = int(shuffle_window)
        self.consumed = 0  # groups this rank has taken in the current epoch

    # -- plan --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning."""
        self.epoch = int(epoch)
        self.consumed = 0

    def shard_order(self) -> np.ndarray:
        n = len(self.store.shards)
        return _rng(self.seed, self.epoch).permutation(n) if self.shuffle else np.arange(n)

    def group_order(self, shard: int) -> np.ndarray:
        n = int(self.store.shards[shard]["n_groups"])
        if not self.shuffle:
            return np.arange(n)
        return _rng(self.seed, self.epoch, shard).permutation(n)

    def windows(self) -> list[list[int]]:
        """This epoch's windows: consecutive runs of `shuffle_window` permuted shards."""
        order = [int(s) for s in self.shard_order()]
        w = self.shuffle_window
        return [order[i : i + w] for i in range(0, len(order), w)]

    def _rank_units(self) -> list[int]:
        """Indices (into `windows()`) of the windows this rank reads this epoch."""
        return list(range(len(self.windows())))[self.rank :: self.world_size]

    def _replica_units(self, worker: int, num_workers: int) -> list[int]:
        return self._rank_units()[worker :: max(1, num_workers)]

    def rank_shards(self) -> list[int]:
        """Shards this rank reads this epoch, in order (independent of num_workers)."""
        wins = self.windows()
        return [s for u in self._rank_units() for s in wins[u]]

    def replica_shards(self, worker: int, num_workers: int) -> list[int]:
        """Shards DataLoader worker `worker` of this rank reads this epoch, in order."""
        wins = self.windows()
        return [s for u in self._replica_units(worker, num_workers) for s in wins[u]]

    def window_order(self, index: int, window: list[int] | None = None) -> list[tuple[int, int]]:
        """(shard, group) pairs of window `index` in the order they are yielded."""
        window = self.windows()[index] if window is None else window
        if len(window) == 1:
            s = window[0]
            return [(s, int(g)) for g in self.group_order(s)]
        pairs = [(s, g) for s in window for g in range(int(self.store.shards[s]["n_groups"]))]
        if not self.shuffle:
            return pairs
        perm = _rng(self.seed, self.epoch, index, len(window)).permutation(len(pairs))
        return [pairs[int(i)] for i in perm]

    def _window_len(self, window: list[int]) -> int:
        return sum(int(self.store.shards[s]["n_groups"]) for s in window)

    def _replica_len(self, worker: int, num_workers: int) -> int:
        return sum(int(self.store.shards[s]["n_groups"])
                   for s in self.replica_shards(worker, num_workers))

    def __len__(self) -> int:
        """Groups this rank yields in one epoch (all its DataLoader workers together)."""
        return sum(int(self.store.shards[s]["n_groups"]) for s in self.rank_shards())

    @staticmethod
    def _replay(consumed: int, lengths: list[int]) -> tuple[list[int], list[int]]:
        """Replay an in-order DataLoader's round-robin over workers with `lengths` items.

        Returns (items taken from each worker after `consumed` items, the still-active
        workers in the order they will be polled next).  Torch polls workers cyclically and
        an exhausted worker drops out of the cycle; which worker answers is not timing
        dependent, so this replay is exact.
        """
        taken = [0] * len(lengths)
        active = [i for i, n in enumerate(lengths) if n > 0]
        pos = 0
        left = consumed
        while left > 0 and active:
            w = active[pos]
            taken[w] += 1
            left -= 1
            if taken[w] == lengths[w]:
                active.pop(pos)
            else:
                pos += 1
            pos = pos % len(active) if active else 0
        return taken, active[pos:] + active[:pos]

    # -- iteration -----------------------------------------------------------------
    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if num_workers:
            # A resumed DataLoader polls worker 0 first; so real worker j plays the part of
            # the j-th worker in the replayed polling order, which makes the resumed stream
            # continue exactly where the interrupted one stopped.
            lengths = [self._replica_len(i, num_workers) for i in range(num_workers)]
            taken, polling = self._replay(self.consumed, lengths)
            if worker >= len(polling):
                return
            virtual = polling[worker]
            skip = taken[virtual]
            units = self._replica_units(virtual, num_workers)
        else:
            skip = self.consumed
            units = self._rank_units()
        wins = self.windows()
        # Skip whole windows without fetching them.
        todo: list[tuple[int, int]] = []  # (window index, first position to yield)
        for u in units:
            n = self._window_len(wins[u])
            if skip >= n:
                skip -= n
                continue
            todo.append((u, skip))
            skip = 0
        if not todo:
            return
        shards_iter = self.store.prefetching_shards(
            [s for u, _ in todo for s in wins[u]], self.fields, self.prefetch
        )
        for u, start in todo:
            held = {}
            for _ in wins[u]:
                s, shard = next(shards_iter)
                held[s] = shard
            for s, g in self.window_order(u, wins[u])[start:]:
                self.consumed += 1
                yield held[s].group(g)
            del held

    # -- state ---------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Position for mid-epoch resume; pass `consumed` when iterating through workers."""
        state = {"epoch": self.epoch, "seed": self.seed,
                 "consumed": self.consumed if consumed is None else int(consumed)}
        if self.shuffle_window != 1:
            state["shuffle_window"] = self.shuffle_window
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"state_dict has seed={state['seed']} but this reader has "
                             f"seed={self.seed}; construct the reader with the saved seed")
        if int(state.get("shuffle_window", 1)) != self.shuffle_window:
            raise ValueError(f"state_dict has shuffle_window={state.get('shuffle_window', 1)} "
                             f"but this reader has shuffle_window={self.shuffle_window}; "
                             f"construct the reader with the saved shuffle_window")
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        self.epoch = epoch
        n = len(self)  # this rank's share depends on the epoch's shard order
        if consumed < 0 or consumed > n:
            raise ValueError(f"state_dict has consumed={consumed} groups but this rank's epoch "
                             f"holds {n} (store {self.store.url}, rank {self.rank} of "
                             f"{self.world_size}): resume with the store and world size the "
                             f"state was saved with")
        if n and consumed == n:
            # Saved exactly at the end of an epoch (before the caller's set_epoch ran): the
            # next group is the first of the next epoch, as in an uninterrupted run.
            epoch, consumed = epoch + 1, 0
        self.epoch = epoch
        self.consumed = consumed
