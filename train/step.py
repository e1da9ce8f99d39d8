"""One optimizer step, as a function: the loop, the memory estimate and the benchmarks call
this same code, so what they measure is what trains.

    train_step = zero_grad -> for each micro-batch: forward_loss -> backward(loss / n)
                 -> clip -> optimizer.step -> scheduler.step

Metrics come back as detached tensors (averaged over the micro-batches): reading them with
`float()` forces a device sync, so the caller does it only when it logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batch import SeqBatch
from .config import TrainConfig
from .objectives import objective_loss


@dataclass(frozen=True)
class Precision:
    """Autocast for the student forward. `device_type` is autocast's device ("cuda", "cpu").
    With gradient checkpointing autocast's cache of bf16 weight copies would outlive the
    forward for nothing (the recompute casts again), so it is off then."""

    bf16: bool
    device_type: str
    cache: bool = True

    @classmethod
    def for_run(cls, cfg: TrainConfig, device: torch.device) -> Precision:
        bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
        return cls(bf16=bf16, device_type=device.type, cache=not cfg.grad_checkpointing)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16,
                              cache_enabled=self.cache)


def forward_loss(student: torch.nn.Module, batch: SeqBatch, cfg: TrainConfig, step: int,
                 precision: Precision) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss on one micro-batch. `student` is the student module
    (train/student.py: `StudentForward`, DDP- or FSDP-wrapped in distributed runs), called on
    the batch under autocast; the loss itself is computed in the gathered float32 log-probs."""
    with precision.autocast():
        out = student(batch)
    return objective_loss(cfg.objective, batch)(out, batch, cfg, step)


def train_step(student: torch.nn.Module, optimizer, scheduler, params: Sequence[torch.Tensor],
               batches: Sequence[SeqBatch], cfg: TrainConfig, step: int,
               precision: Precision) -> dict[str, torch.Tensor]:
    """Accumulate gradients over `batches` (one optimizer step), clip, step.

    `student` as in `forward_loss`. Under DDP (`student.no_sync` exists) gradients are
    all-reduced once, after the last micro-batch. Returns the micro-batch mean of the loss and every loss metric, plus
    `grad_norm` (before clipping) when clipping is on."""
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        sync = i == n - 1 or not hasattr(student, "no_sync")
        with contextlib.nullcontext() if sync else student.no_sync():
            loss, metrics = forward_loss(student, batch, cfg, step, precision)
            (loss / n).backward()
        for k, v in {"loss": loss, **metrics}.items():
            v = v.detach() / n
            sums[k] = sums[k] + v if k in sums else v
    if cfg.max_grad_norm > 0:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).detach()
    optimizer.step()
    scheduler.step()
    return sums
