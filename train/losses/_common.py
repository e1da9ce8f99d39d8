"""Shared plumbing for the losses: the return type, mask checks, masked sequence sums.

Conventions (docs/LOSSES.md): per-token tensors are [B, T] (or [B, T, K]) aligned with the
response tokens, right-padded; `mask` is [B, T] bool or 0/1 float, True on real response
tokens. Padding entries may hold anything finite or not: they are replaced with zeros via
torch.where BEFORE any arithmetic, so they can produce neither NaN values nor NaN grads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LossOutput(NamedTuple):
    """`loss`: scalar to minimise. `metrics`: detached scalar tensors for logging
    (no .item() here, so no device sync; the trainer decides when to read them)."""

    loss: Tensor
    metrics: dict[str, Tensor]


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """Validate `mask` [B, T] against `like` [B, T, ...] and return it as bool."""
    if mask.dim() != 2 or tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(f"{name} must be [B, T] = {tuple(like.shape[:2])}, got {tuple(mask.shape)}")
    return mask.bool()


def check_same(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding positions set to 0 (mask [B, T] broadcast over trailing dims)."""
    m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Σ_t over response tokens: [B, T] -> [B]."""
    return masked(x, mask).sum(-1)


def token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over all response tokens of the batch (a logging metric), detached."""
    return (seq_sum(x, mask).sum() / mask.sum().clamp(min=1)).detach()


def check_pairs(chosen_mask: Tensor, rejected_mask: Tensor, what: str) -> None:
    if chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(
            f"{what}: {chosen_mask.shape[0]} first vs {rejected_mask.shape[0]} second sequences; need pairs"
        )


def logsigmoid_loss(margin: Tensor) -> LossOutput:
    """−log σ(margin) averaged over pairs; logsigmoid is the stable form (no log(0) for
    very negative margins). Metrics: mean margin and the fraction of pairs ranked right."""
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return LossOutput(loss, {"margin": margin.mean().detach(), "accuracy": (margin > 0).to(margin.dtype).mean().detach()})
