"""Shared fixtures for the store tests: random but well-formed groups of records."""

from __future__ import annotations

import numpy as np

from kdcache.store import StoreMeta

ALL_FIELDS = [
    "topk_ids",
    "topk_logprobs",
    "token_logprob",
    "ref_topk_logprobs",
    "ref_token_logprob",
    "soft_value",
    "behavior_logprob",
]


def make_meta(k: int = 8, betas=(0.5, 2.0), fields=None, **options) -> StoreMeta:
    return StoreMeta(
        k=k,
        betas=list(betas),
        fields=list(ALL_FIELDS if fields is None else fields),
        models={"dpo": {"name": "tiny-dpo", "sha": "abc"}, "ref": {"name": "tiny-ref"}},
        tokenizer={"name": "tiny-tok", "vocab": 1000},
        dataset={"name": "toy", "sha": "d0"},
        options=dict(options) if options else {"codec": "lossless"},
        code_version="test",
    )


def make_record(rng: np.random.Generator, eid: str, role: str, group: int, meta: StoreMeta,
                dtype=np.float32, max_t: int = 12) -> dict:
    T = int(rng.integers(0, max_t + 1))
    K, B, V = meta.k, len(meta.betas), 1000
    r: dict = {
        "example_id": eid,
        "role": role,
        "group": group,
        "prompt_ids": rng.integers(0, V, int(rng.integers(1, 6))).astype(np.int64),
        "response_ids": rng.integers(0, V, T).astype(np.int32),
        "teacher_prompt_ids": None if rng.random() < 0.5 else rng.integers(0, V, 3).tolist(),
        "is_terminal": bool(rng.random() < 0.7),
        "reward": None if rng.random() < 0.5 else float(rng.normal()),
    }
    lp = -np.sort(rng.exponential(2.0, (T, K)), axis=1)
    f = set(meta.fields)
    if "topk_ids" in f:
        r["topk_ids"] = np.stack([rng.permutation(V)[:K] for _ in range(T)]) if T else \
            np.zeros((0, K), np.int64)
    if "topk_logprobs" in f:
        r["topk_logprobs"] = lp.astype(dtype)
    if "token_logprob" in f:
        r["token_logprob"] = (-rng.exponential(2.0, T)).astype(dtype)
    if "ref_topk_logprobs" in f:
        r["ref_topk_logprobs"] = (lp + rng.normal(0, 0.5, (T, K))).clip(max=0).astype(dtype)
    if "ref_token_logprob" in f:
        r["ref_token_logprob"] = (-rng.exponential(2.0, T)).astype(dtype)
    if "soft_value" in f:
        r["soft_value"] = rng.normal(10, 3, (T + 1, B)).astype(dtype)
    if "behavior_logprob" in f:
        r["behavior_logprob"] = (-rng.exponential(1.0, T)).astype(dtype)
    return r


def make_groups(n: int, meta: StoreMeta, seed: int = 0, dtype=np.float32,
                max_t: int = 12) -> list[list[dict]]:
    """n groups; sizes 1..3 records, mixed roles."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        size = int(rng.integers(1, 4))
        roles = ["chosen", "rejected"] if size == 2 else ["student_rollout"] * size
        out.append([make_record(rng, f"ex{g:05d}", roles[i], i if size != 2 else 0, meta,
                                dtype, max_t) for i in range(size)])
    return out


def write_store(url: str, meta: StoreMeta, groups, shard_records: int = 7, **kw) -> None:
    from kdcache.store import StoreWriter

    with StoreWriter(url, meta, shard_records=shard_records, **kw) as w:
        for g in groups:
            w.add_group(g)
