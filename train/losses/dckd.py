"""DCKD, distillation with contrastive-pair KD (seed 001, Eq. 5-7; METHODS §2):

    L = L_SFT(y_w) + α (Σ_t KL_t on y_w + Σ_t KL_t on y_l),

KL_t the top-K KD term of `topk_kd` (teacher = π_dpo), averaged over the pairs of the batch.
Paper sweep α ∈ {0.1, 0.2, 0.5, 1, 2, 5}; best 0.2.

`released_code=True` is the released-code variant (the authors' public trainer, METHODS §2):

    L = w_sft · mean_tokens(−log π_θ(y_w,t)) + w_w · mean_tokens(KL_t on y_w) + w_l · mean_tokens(KL_t on y_l),

each term a token mean over its own tokens; KL_t = Σ_{j=1..K+1} p_j (log p_j − log q_j) over
K + 1 buckets (the teacher's top-K probabilities, then the residual 1 − Σ_k p_k as a tail
bucket against the student's residual 1 − Σ_k π_θ(id_k)). Both sides' buckets are clamped to
[1e-8, 1 − 1e-8] (`prob_stabilize`) and the student's then floored at 1e-7 (`get_kl_loss`; a
floored bucket gets no gradient). Released recipe weights: w_sft 1, w_w = w_l = 1 × 0.1.
The KD mode/divergence options apply to the paper form only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _released as released
from ._common import LossOutput, check_mask, check_same, masked, seq_sum, token_mean
from .topk_kd import kd_per_token


def released_kl(student_topk: Tensor, teacher_topk: Tensor) -> Tensor:
    """Per-token (K+1)-bucket forward KL of the released code, [..., K] -> [...]."""
    p = released.buckets(teacher_topk)
    q = released.buckets(student_topk)
    # the in-place floor `q[q < 1e-7] = 1e-7` of get_kl_loss: a constant, hence no gradient
    q = torch.where(q < released.FLOOR, torch.full_like(q, released.FLOOR), q)
    return (p * (p.log() - q.log())).sum(-1)


def dckd_loss(
    *,
    chosen_token_logprobs: Tensor,
    chosen_student_topk: Tensor,
    chosen_teacher_topk: Tensor,
    chosen_mask: Tensor,
    rejected_student_topk: Tensor,
    rejected_teacher_topk: Tensor,
    rejected_mask: Tensor,
    alpha: float = 0.2,
    mode: str = "renorm",
    divergence: str = "forward",
    released_code: bool = False,
    weights: tuple[float, float, float] = (1.0, 0.1, 0.1),
) -> LossOutput:
    """Pairs p = 1..P; y_w and y_l may have different padded lengths T_w, T_l.

    chosen_token_logprobs [P, T_w]: log π_θ(y_w,t|s_t).
    chosen_student_topk / chosen_teacher_topk [P, T_w, K]: student log-probs at the stored
    `topk_ids` / stored `topk_logprobs`, on y_w; chosen_mask [P, T_w].
    rejected_* : the same on y_l ([P, T_l, K], [P, T_l]).
    alpha, mode, divergence: the paper form. released_code, weights = (w_sft, w_w, w_l):
    the released-code variant. Metrics: `sft`, `kd_chosen`, `kd_rejected` (each term as the
    variant reduces it: per-sequence sums averaged over pairs, or token means), `nll_per_token`."""
    cm = check_mask(chosen_mask, chosen_token_logprobs, "chosen_mask")
    rm = check_mask(rejected_mask, rejected_student_topk, "rejected_mask")
    if rm.shape[0] != cm.shape[0]:
        raise ValueError(f"dckd: {cm.shape[0]} chosen vs {rm.shape[0]} rejected sequences; need pairs")
    check_same("chosen_student_topk", chosen_student_topk, (*cm.shape, chosen_student_topk.shape[-1]))
    check_same("chosen_teacher_topk", chosen_teacher_topk, chosen_student_topk.shape)
    check_same("rejected_teacher_topk", rejected_teacher_topk, rejected_student_topk.shape)

    s_w, t_w = masked(chosen_student_topk, cm), masked(chosen_teacher_topk, cm)
    s_l, t_l = masked(rejected_student_topk, rm), masked(rejected_teacher_topk, rm)
    if released_code:
        w_sft, w_w, w_l = weights
        sft = released.token_average(-chosen_token_logprobs, cm)
        kd_w = released.token_average(released_kl(s_w, t_w), cm)
        kd_l = released.token_average(released_kl(s_l, t_l), rm)
        loss = w_sft * sft + w_w * kd_w + w_l * kd_l
    else:
        sft = seq_sum(-chosen_token_logprobs, cm).mean()
        kd_w = seq_sum(kd_per_token(s_w, t_w, mode, divergence), cm).mean()
        kd_l = seq_sum(kd_per_token(s_l, t_l, mode, divergence), rm).mean()
        loss = sft + alpha * (kd_w + kd_l)
    metrics = {
        "sft": sft.detach(),
        "kd_chosen": kd_w.detach(),
        "kd_rejected": kd_l.detach(),
        "nll_per_token": token_mean(-chosen_token_logprobs, cm),
    }
    return LossOutput(loss, metrics)
