"""Several stores at once (METHODS §4): a mixture of stores, or an ensemble of teachers.

Mixing (`MixedGroups`): group i of the run comes from store j with probability w_j. The
choice of draw i is a pure function of (seed, i): uniforms are drawn in blocks of
`MIX_BLOCK` from `rng(seed, MIX_TAG, block)`, so the sampler's whole state is the number of
draws made, and a resume at any step continues the same sequence. Every store keeps its own
reader (its own shuffled epochs, reshuffled when it runs out), so a store with a large weight
and few groups is simply repeated more often.

Ensemble (`EnsembleGroups`): the stores scored the SAME examples with different teachers.
Their readers share the seed and, as checked up front, the shard layout, so they yield
corresponding groups in lockstep; every group is checked (same example_id, role, prompt and
response ids) and merged into the first store's records, each record carrying every teacher's
per-token fields under `teachers` (collate builds one union index from them).

Both expose `state_dict()` / `load_state_dict()` like a StreamReader: the checkpoint saves
that as its reader state (train/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .data import group_stream

MIX_TAG = 0x6D6978  # "mix": keeps the sampler's stream apart from the readers' shuffles
MIX_BLOCK = 4096
# per-token fields that come from a teacher (a record's other keys are the shared sequence)
TEACHER_FIELDS = ("topk_ids", "topk_logprobs", "token_logprob", "ref_topk_logprobs", "ref_token_logprob",
                  "soft_value")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


class MixedGroups:
    """Groups drawn from the readers' streams with probabilities `weights` (sum 1)."""

    def __init__(self, readers: Sequence, weights: Sequence[float], seed: int) -> None:
        self.readers = list(readers)
        self.streams = [group_stream(r) for r in self.readers]
        self.cum = np.cumsum(np.asarray(weights, dtype=np.float64))
        self.seed = int(seed)
        self.draws = 0
        self._block: tuple[int, np.ndarray] | None = None

    def choice(self, i: int) -> int:
        """The store that draw i takes its group from (deterministic for the seed)."""
        b = i // MIX_BLOCK
        if self._block is None or self._block[0] != b:
            self._block = (b, _rng(self.seed, MIX_TAG, b).random(MIX_BLOCK))
        u = self._block[1][i % MIX_BLOCK] * self.cum[-1]
        # first store whose cumulative weight exceeds u: a zero-weight store is never drawn
        return min(int(np.searchsorted(self.cum, u, side="right")), len(self.cum) - 1)

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        group = next(self.streams[self.choice(self.draws)])
        self.draws += 1
        return group

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws, "stores": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.readers, self.seed)
        self.draws = int(state["draws"])
        for r, s in zip(self.readers, state["stores"], strict=True):
            r.load_state_dict(s)


class EnsembleGroups:
    """Corresponding groups of every store, checked and merged (module docstring)."""

    def __init__(self, readers: Sequence, urls: Sequence[str]) -> None:
        self.readers = list(readers)
        self.urls = list(urls)
        self.streams = [group_stream(r) for r in self.readers]

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        return merge_teachers([next(s) for s in self.streams], self.urls)

    def state_dict(self) -> dict:
        return {"seed": self.readers[0].seed, "stores": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.readers, self.readers[0].seed)
        for r, s in zip(self.readers, state["stores"], strict=True):
            r.load_state_dict(s)


def _check_state(state: dict, readers: Sequence, seed: int) -> None:
    stores = state.get("stores")
    if not isinstance(stores, list) or len(stores) != len(readers):
        raise ValueError(f"the checkpoint's reader state holds {len(stores) if isinstance(stores, list) else 'no'} "
                         f"store positions for {len(readers)} --store: resume with the stores it was saved with, "
                         f"or start over with --no-resume")
    if int(state.get("seed", seed)) != seed:
        raise ValueError(f"the checkpoint's sampler has seed {state['seed']}, this run {seed}: resume with the "
                         f"saved --seed")


def merge_teachers(groups: list[list[dict]], urls: Sequence[str]) -> list[dict]:
    """The first store's records, each with `teachers`: every store's teacher fields, in
    store order. Refuses (naming the first mismatch) stores that do not hold the same
    sequences."""
    first = groups[0]
    for j, g in enumerate(groups[1:], 1):
        if len(g) != len(first):
            eid = first[0].get("example_id") if first else None
            raise ValueError(_mismatch(urls, j, eid, None, f"{len(g)} records vs {len(first)} in the group"))
        for a, b in zip(first, g, strict=True):
            for key in ("example_id", "role"):
                if a.get(key) != b.get(key):
                    raise ValueError(_mismatch(urls, j, a.get("example_id"), a.get("role"),
                                               f"{key} {b.get(key)!r} vs {a.get(key)!r}"))
            for key in ("response_ids", "prompt_ids"):
                x, y = np.asarray(a[key]), np.asarray(b[key])
                if x.shape != y.shape or not np.array_equal(x, y):
                    raise ValueError(_mismatch(urls, j, a["example_id"], a["role"], _ids_differ(key, x, y)))
    out = []
    for i, rec in enumerate(first):
        out.append({**rec, "teachers": [{f: g[i][f] for f in TEACHER_FIELDS if g[i].get(f) is not None}
                                        for g in groups]})
    return out


def _ids_differ(key: str, x: np.ndarray, y: np.ndarray) -> str:
    if x.shape != y.shape:
        return f"{key} have {len(y)} tokens vs {len(x)}"
    t = int(np.flatnonzero(x != y)[0])
    return f"{key}[{t}] is {int(y[t])} vs {int(x[t])}"


def _mismatch(urls: Sequence[str], j: int, eid, role, what: str) -> str:
    where = f"example_id {eid!r}" + (f", role {role!r}" if role is not None else "")
    return (f"--ensemble: store {urls[j]!r} does not score the same sequences as {urls[0]!r}: at {where}, "
            f"{what}; ensemble stores must come from `kdcache precompute` on the same data (same "
            f"--max-length and --shard-records) with one teacher each")


def check_layout(stores: Sequence, urls: Sequence[str]) -> None:
    """Up front, from the manifests alone: ensemble stores hold the same shards, groups,
    records and tokens (so their readers yield corresponding groups)."""
    a = stores[0]
    for j, b in enumerate(stores[1:], 1):
        if len(b.shards) != len(a.shards):
            raise ValueError(
                f"--ensemble: store {urls[j]!r} has {len(b.shards)} shards and {urls[0]!r} {len(a.shards)}: "
                f"ensemble stores must come from `kdcache precompute` on the same data (same --max-length "
                f"and --shard-records) with one teacher each")
        for i, (sa, sb) in enumerate(zip(a.shards, b.shards, strict=True)):
            for key in ("n_groups", "n_records", "n_tokens"):
                if int(sa[key]) != int(sb[key]):
                    _first_difference(a, b, i, [urls[0], urls[j]])  # names the example when it can
                    raise ValueError(
                        f"--ensemble: store {urls[j]!r} shard {i} holds {sb[key]} {key[2:]} and {urls[0]!r} "
                        f"{sa[key]}: ensemble stores must come from `kdcache precompute` on the same data (same "
                        f"--max-length and --shard-records) with one teacher each")


def _first_difference(a, b, shard: int, urls: list[str]) -> None:
    """Compare one shard's records tables (no per-token data) group by group: raises the
    mismatch naming store, example_id, role and what differs, if a group shows it."""
    sa, sb = a.load_shard(shard, fields=()), b.load_shard(shard, fields=())
    for g in range(min(int(a.shards[shard]["n_groups"]), int(b.shards[shard]["n_groups"]))):
        merge_teachers([sa.group(g), sb.group(g)], urls)
