"""Top-K knowledge distillation (VanillaKD, METHODS §2).

Default (mode="renorm", divergence="forward"), per response token t:
    KL_t = Σ_k p̂_k (log p̂_k − log π_θ(id_k|s_t)),   p̂ = softmax_k(topk_logprobs[t]),
where log π_θ(id_k|s_t) is normalised over the FULL student vocabulary (so the term also
pushes student mass into the teacher's top-K). With K = |V| this is the exact KL.

mode="tail": keep the teacher's raw top-K mass p_k = exp(topk_logprobs) and add a tail
bucket holding the rest: teacher 1 − Σ_k p_k, student 1 − Σ_k π_θ(id_k|s_t); divergences
are then taken between these two (K+1)-bucket distributions.

divergence="reverse" / "jsd": reverse KL Σ q (log q − log p) / Jensen-Shannon
½KL(p‖m) + ½KL(q‖m), m = ½(p + q), on the renormalised top-K distributions (renorm) or on
the (K+1)-bucket distributions (tail). Loss = mean over sequences of Σ_t div_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import LossOutput, check_mask, check_same, masked, seq_sum, token_mean

MODES = ("renorm", "tail")
DIVERGENCES = ("forward", "reverse", "jsd")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate everywhere (Mächler 2012): log(−expm1(x)) near
    0 where 1 − exp(x) cancels, log1p(−exp(x)) for x < −log 2 where exp(x) is small."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_logprob(topk_logprobs: Tensor) -> Tensor:
    """log(1 − Σ_k exp(topk_logprobs[..., k])) -> [...].

    logsumexp is clamped to ≤ −eps: when the top-K holds (up to rounding) all the mass, as
    at K = |V|, the tail becomes a tiny eps-bucket instead of log(0) = −inf, which would turn
    a zero-mass tail into 0·∞ = NaN. The error this introduces is O(eps·log eps)."""
    eps = torch.finfo(topk_logprobs.dtype).eps
    return log1mexp(torch.logsumexp(topk_logprobs, dim=-1).clamp(max=-eps))


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_last p (log p − log q); entries with p = 0 contribute 0 (not 0·∞)."""
    term = torch.exp(logp) * (logp - logq)
    return torch.where(logp > float("-inf"), term, torch.zeros_like(term)).sum(-1)


def kd_per_token(
    student_topk_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    mode: str = "renorm",
    divergence: str = "forward",
) -> Tensor:
    """Per-token divergence [...] from student/teacher log-probs [..., K] at the teacher's ids."""
    if mode not in MODES:
        raise ValueError(f"kd mode must be one of {MODES}, got {mode!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"kd divergence must be one of {DIVERGENCES}, got {divergence!r}")
    s, t = student_topk_logprobs, teacher_topk_logprobs.to(student_topk_logprobs.dtype)
    if mode == "tail":
        logp = torch.cat([t, tail_logprob(t)[..., None]], dim=-1)
        logq = torch.cat([s, tail_logprob(s)[..., None]], dim=-1)
    else:
        logp = torch.log_softmax(t, dim=-1)
        # forward KL keeps the full-vocab student log-probs (METHODS §2); the reverse KL
        # and JSD need a proper student distribution, so it is renormalised over K.
        logq = s if divergence == "forward" else torch.log_softmax(s, dim=-1)
    if divergence == "forward":
        return _kl(logp, logq)
    if divergence == "reverse":
        return _kl(logq, logp)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * _kl(logp, logm) + 0.5 * _kl(logq, logm)


def topk_kd_loss(
    student_topk_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    mode: str = "renorm",
    divergence: str = "forward",
) -> LossOutput:
    """student_topk_logprobs [B, T, K]: log π_θ(topk_ids|s_t) (full-vocab normalised);
    teacher_topk_logprobs [B, T, K]: stored `topk_logprobs`; mask [B, T].

    Returns mean_b Σ_t div_t; metric `kd_per_token`."""
    mask = check_mask(mask, student_topk_logprobs)
    check_same("teacher_topk_logprobs", teacher_topk_logprobs, student_topk_logprobs.shape)
    # padding rows are zeroed first: a garbage (e.g. −inf) padded teacher row must not NaN.
    div = kd_per_token(masked(student_topk_logprobs, mask), masked(teacher_topk_logprobs, mask), mode, divergence)
    return LossOutput(seq_sum(div, mask).mean(), {"kd_per_token": token_mean(div, mask)})
