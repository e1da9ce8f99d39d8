"""DCKD, distillation with contrastive-pair KD (seed 001, Eq. 5-7; METHODS §2):

    L = L_SFT(y_w) + α (Σ_t KL_t on y_w + Σ_t KL_t on y_l),

KL_t the top-K KD term of `topk_kd` (teacher = π_dpo), averaged over the pairs of the batch.
Paper sweep α ∈ {0.1, 0.2, 0.5, 1, 2, 5}; best 0.2.
"""

from __future__ import annotations

from torch import Tensor

from ._common import LossOutput, check_mask, check_same, masked, seq_sum, token_mean
from .topk_kd import kd_per_token


def dckd_loss(
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
) -> LossOutput:
    """Pairs p = 1..P; y_w and y_l may have different padded lengths T_w, T_l.

    chosen_token_logprobs [P, T_w]: log π_θ(y_w,t|s_t).
    chosen_student_topk / chosen_teacher_topk [P, T_w, K]: student log-probs at the stored
    `topk_ids` / stored `topk_logprobs`, on y_w; chosen_mask [P, T_w].
    rejected_* : the same on y_l ([P, T_l, K], [P, T_l]).
    Metrics: `sft`, `kd_chosen`, `kd_rejected` (per-sequence sums, batch mean)."""
    cm = check_mask(chosen_mask, chosen_token_logprobs, "chosen_mask")
    rm = check_mask(rejected_mask, rejected_student_topk, "rejected_mask")
    if rm.shape[0] != cm.shape[0]:
        raise ValueError(f"dckd: {cm.shape[0]} chosen vs {rm.shape[0]} rejected sequences; need pairs")
    check_same("chosen_student_topk", chosen_student_topk, (*cm.shape, chosen_student_topk.shape[-1]))
    check_same("chosen_teacher_topk", chosen_teacher_topk, chosen_student_topk.shape)
    check_same("rejected_teacher_topk", rejected_teacher_topk, rejected_student_topk.shape)

    sft = seq_sum(-chosen_token_logprobs, cm)  # [P]
    kl_w = kd_per_token(masked(chosen_student_topk, cm), masked(chosen_teacher_topk, cm), mode, divergence)
    kl_l = kd_per_token(masked(rejected_student_topk, rm), masked(rejected_teacher_topk, rm), mode, divergence)
    kd_w, kd_l = seq_sum(kl_w, cm), seq_sum(kl_l, rm)
    loss = (sft + alpha * (kd_w + kd_l)).mean()
    metrics = {
        "sft": sft.mean().detach(),
        "kd_chosen": kd_w.mean().detach(),
        "kd_rejected": kd_l.mean().detach(),
        "nll_per_token": token_mean(-chosen_token_logprobs, cm),
    }
    return LossOutput(loss, metrics)
