"""ULD, universal logit distillation (Boizard et al. 2024, arXiv 2402.12030; METHODS §5).

A student with another tokenizer, no vocabulary map: at an aligned position t,

    d_t = Σ_i |p_(i) − q_(i)|,   i = 1..K,

between the teacher's top-K probabilities sorted descending (`exp(topk_logprobs)`, stored
descending) and the student's K largest probabilities over its FULL vocabulary sorted
descending: the Wasserstein-1 distance with unit cost between the two sorted vectors (the
paper's Eq. 5, restricted to the K largest of each side). Sorting is piecewise constant, so
the gradient flows through the student's selected probabilities. Loss = mean over sequences
of Σ_t d_t over the aligned positions (`mask`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import LossOutput, check_mask, check_same, masked, seq_sum, token_mean


def uld_per_token(student_topk_logprobs: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """[..., K] log-probs (any order) -> [...]: Σ_i |p_(i) − q_(i)| of the sorted probabilities."""
    q = torch.exp(student_topk_logprobs).sort(dim=-1, descending=True).values
    p = torch.exp(teacher_topk_logprobs.to(q.dtype)).sort(dim=-1, descending=True).values
    return (p - q).abs().sum(-1)


def uld_loss(student_topk_logprobs: Tensor, teacher_topk_logprobs: Tensor, mask: Tensor) -> LossOutput:
    """student_topk_logprobs [B, T, K]: the student's K largest log-probs (full-vocab
    normalised); teacher_topk_logprobs [B, T, K]: stored `topk_logprobs` at the aligned
    teacher position; mask [B, T]: aligned response positions.

    Returns mean_b Σ_t d_t; metric `uld_per_token`."""
    mask = check_mask(mask, student_topk_logprobs)
    check_same("teacher_topk_logprobs", teacher_topk_logprobs, student_topk_logprobs.shape)
    d = uld_per_token(masked(student_topk_logprobs, mask), masked(teacher_topk_logprobs, mask))
    return LossOutput(seq_sum(d, mask).mean(), {"uld_per_token": token_mean(d, mask)})
