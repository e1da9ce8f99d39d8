"""From the store's group stream to the micro-batches of one optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .batch import SeqBatch, collate
from .config import TrainConfig
from .objectives import OBJECTIVE_SPECS, select_records


def group_stream(reader, epoch_groups: Callable[[int], int] | None = None) -> Iterator[list[dict]]:
    """Groups forever: epoch after epoch, the reader reshuffling from (seed, epoch).

    `epoch_groups(epoch)`: take at most that many groups from an epoch, then move on (under
    DDP every rank takes the same number, so ranks cross epoch boundaries together)."""
    while True:
        produced = False
        limit = None if epoch_groups is None else epoch_groups(reader.epoch)
        if limit is None or reader.consumed < limit:
            for group in reader:
                produced = True
                yield group
                if limit is not None and reader.consumed >= limit:
                    break
        if not produced and reader.consumed == 0:
            raise ValueError("the store yielded no groups: it is empty or holds no committed shard")
        reader.set_epoch(reader.epoch + 1)


def check_blocks(objective: str, block_ids: list[int]) -> None:
    blocks = OBJECTIVE_SPECS[objective].blocks
    for b, roles in enumerate(blocks):
        if b not in block_ids:
            raise ValueError(
                f"objective {objective!r} found no records of role {'/'.join(roles)} in a batch: "
                + ("it trains on rollouts: run `kdcache rollout`, then `kdcache precompute` on them"
                   if any("rollout" in r for r in roles) else
                   "the store needs groups with " + " and ".join("/".join(x) for x in blocks))
            )


def next_batches(groups: Iterator[list[dict]], cfg: TrainConfig, pad_id: int,
                 betas: tuple[float, ...], device: torch.device,
                 vocab: int | None = None, translate=None, teacher_weights: tuple[float, ...] = (),
                 teacher_betas: list[tuple[float, ...]] | None = None) -> tuple[list[SeqBatch], int]:
    """The `grad_accum` micro-batches of one step (each `batch_groups` groups), on `device`,
    and their response-token count (counted on the host: no device sync). `vocab`: the ids
    the store's teachers scored (`SeqBatch.vocab`). `translate`: a student with another
    tokenizer (train/xtok): each record is re-tokenized and aligned here, before collate.
    `teacher_weights` / `teacher_betas`: an ensemble's weights and each store's β list
    (groups from `teachers.EnsembleGroups`)."""
    batches, tokens = [], 0
    for _ in range(cfg.grad_accum):
        records, block_ids = select_records(cfg.objective, [next(groups) for _ in range(cfg.batch_groups)])
        check_blocks(cfg.objective, block_ids)
        if translate is not None:
            records = [translate(r) for r in records]
        batch = collate(records, pad_id=pad_id, packed=cfg.packing)
        batch.block_ids, batch.betas, batch.vocab = block_ids, betas, vocab
        batch.own_topk = 0 if translate is None else translate.own_topk
        if batch.teachers:
            batch.teacher_weights = tuple(teacher_weights)
            batch.teacher_betas = list(teacher_betas or [betas] * len(batch.teachers))
        tokens += batch.num_tokens
        batches.append(batch.to(device))
    return batches, tokens
