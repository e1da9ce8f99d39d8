"""ADPA, advantage-guided distillation (seed 001, Eq. 10; METHODS §2):

    L = L_SFT(x, y) − γ Σ_t Σ_{a ∈ topK} π_θ(a|ŝ_t) · adv(ŝ_t, a),

on the student's own rollout ŷ (states ŝ_t), y the ground-truth/preferred response and
adv = log π_dpo − log π_ref at the DPO teacher's top-K (`A_dpo/β`). The gradient of the
second term is the advantage-weighted policy gradient of Eq. 12: −γ Σ π_θ ∇log π_θ · adv.
Both sums are per sequence and averaged over the sequences of their own batch.
Paper sweep γ ∈ {0.5, 1, 1.5, 2, 3, 5}; best ≈ 3.

Advantages: `exact_advantage` (default; the reference gathered at the DPO ids) or
`paper_advantage` (the paper's approximation, METHODS §1; `floor="dpo"` is the released data
pipeline's version of it), `advantage_error` compares them.

`released_code=True` is the released-code variant (the authors' public trainer, METHODS §2),
not Eq. 10:

    L = mean_tokens(−log π_θ(y_t|s_t)) on y
        − w · mean_rollout_tokens(Σ_k c(π_θ(a_k|ŝ_t)) · c(adv_k) + c(1 − Σ_k π_θ(a_k|ŝ_t)) · c(0)),

c(x) = clamp(x, 1e-8, 1 − 1e-8) (their `prob_stabilize`): negative advantages become 1e-8, so
they push nothing down, advantages above 1 saturate, and a student probability outside the
range gets no gradient. Both terms are token means over their own tokens. The last product
is the released code's (K+1)-th bucket: the student's remaining mass times the clamped empty
target tail (1e-8); it moves the value by < 1e-8 per token and is kept so that the variant
equals their code exactly (for a token with negative advantage it cancels the 1e-8 gradient
of the clamped advantage). Recipe weight w = 1.6 (`adpa_weight`), SFT weight 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _released as released
from ._common import LossOutput, check_mask, check_same, masked, seq_sum, token_mean

FLOORS = ("reference", "dpo")


def exact_advantage(topk_logprobs: Tensor, ref_topk_logprobs: Tensor) -> Tensor:
    """adv[t, k] = log π_dpo(id_k|s_t) − log π_ref(id_k|s_t), both stored at the DPO top-K ids."""
    check_same("ref_topk_logprobs", ref_topk_logprobs, topk_logprobs.shape)
    return topk_logprobs - ref_topk_logprobs


def paper_advantage(
    dpo_topk_ids: Tensor,
    dpo_topk_logprobs: Tensor,
    ref_topk_ids: Tensor,
    ref_topk_logprobs: Tensor,
    floor: str = "reference",
) -> Tensor:
    """The ADPA paper's approximate advantage (METHODS §1, "Exact vs paper advantage").

    dpo_topk_ids / dpo_topk_logprobs [..., K]: the DPO teacher's own top-K.
    ref_topk_ids / ref_topk_logprobs [..., K_ref]: the REFERENCE's OWN top-K (its ids and
    log-probs; not the store's `ref_topk_logprobs`, which is gathered at the DPO ids).
    A DPO top-K token found in the reference's top-K uses the reference's log-prob;
    reference-only tokens are dropped (they have no slot). A missing one gets:
    - floor="reference" (the paper's text): the reference's lowest top-K log-prob;
    - floor="dpo" (the released data pipeline, `merge_logits_adpa_dataset.py`): the DPO
      teacher's lowest top-K probability, and every probability (DPO and reference) is
      floored at 1e-7 before the log.
    Returns adv [..., K]."""
    if floor not in FLOORS:
        raise ValueError(f"paper_advantage: floor must be one of {FLOORS}, got {floor!r}")
    check_same("dpo_topk_logprobs", dpo_topk_logprobs, dpo_topk_ids.shape)
    check_same("ref_topk_logprobs", ref_topk_logprobs, ref_topk_ids.shape)
    if dpo_topk_ids.shape[:-1] != ref_topk_ids.shape[:-1]:
        raise ValueError(f"paper_advantage: leading dims differ: {dpo_topk_ids.shape} vs {ref_topk_ids.shape}")
    match = dpo_topk_ids[..., :, None] == ref_topk_ids[..., None, :]  # [..., K, K_ref]
    dpo_lp = dpo_topk_logprobs
    ref_lp = ref_topk_logprobs.to(dpo_lp.dtype)
    neg_inf = torch.tensor(float("-inf"), dtype=ref_lp.dtype, device=ref_lp.device)
    found = torch.where(match, ref_lp[..., None, :], neg_inf).amax(-1)  # ids are unique per row
    if floor == "dpo":
        lo = math.log(released.FLOOR)
        dpo_lp, found = dpo_lp.clamp(min=lo), found.clamp(min=lo)
        missing = dpo_lp.amin(-1, keepdim=True)  # max(min_k p_dpo, 1e-7), in log space
    else:
        missing = ref_lp.amin(-1, keepdim=True)
    return dpo_lp - torch.where(match.any(-1), found, missing.expand_as(found))


def advantage_error(exact: Tensor, approx: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far an approximate advantage [B, T, K] is from the exact one on masked tokens:
    mean / max absolute error, error relative to mean |exact|, fraction of entries differing."""
    mask = check_mask(mask, exact)
    check_same("approx", approx, exact.shape)
    m = mask[..., None].expand_as(exact)
    err = (approx - exact).abs()[m]
    ex = exact.abs()[m]
    if err.numel() == 0:
        zero = exact.new_zeros(())
        return {"mean_abs": zero, "max_abs": zero, "rel": zero, "frac_diff": zero}
    return {
        "mean_abs": err.mean(),
        "max_abs": err.max(),
        "rel": err.mean() / ex.mean().clamp(min=torch.finfo(ex.dtype).tiny),
        "frac_diff": (err > 0).to(exact.dtype).mean(),
    }


def adpa_loss(
    sft_token_logprobs: Tensor,
    sft_mask: Tensor,
    rollout_student_topk: Tensor,
    advantage: Tensor,
    rollout_mask: Tensor,
    gamma: float = 3.0,
    released_code: bool = False,
) -> LossOutput:
    """sft_token_logprobs [B, T], sft_mask [B, T]: log π_θ(y_t|s_t) on the preferred response.
    rollout_student_topk [R, T̂, K]: log π_θ(topk_ids|ŝ_t) on the rollout (full-vocab normalised).
    advantage [R, T̂, K]: from `exact_advantage` / `paper_advantage`; rollout_mask [R, T̂].
    gamma: Eq. 10's γ, or the released variant's weight w when released_code=True.

    Eq. 10: mean_b L_SFT − γ · mean_r Σ_t Σ_k π_θ(a_k|ŝ_t) adv_k (per-sequence sums).
    released_code: the released-code variant of the module docstring (token means, clamps).
    Metrics: `sft` (the SFT term as the variant reduces it), `adv_reward` (the per-token
    advantage term summed per rollout, rollout mean), `adv_per_token`."""
    sm = check_mask(sft_mask, sft_token_logprobs, "sft_mask")
    rm = check_mask(rollout_mask, rollout_student_topk, "rollout_mask")
    check_same("advantage", advantage, rollout_student_topk.shape)
    adv = masked(advantage.to(rollout_student_topk.dtype), rm)
    student = masked(rollout_student_topk, rm)
    if released_code:
        q = released.buckets(student)  # [R, T̂, K+1]: clamped π_θ at the ids, then the clamped tail
        target = released.stabilize(torch.cat([adv, torch.zeros_like(adv[..., :1])], dim=-1))
        per_token = masked((q * target).sum(-1), rm)
        sft = released.token_average(-sft_token_logprobs, sm)
        term = released.token_average(per_token, rm)
    else:
        # π_θ(a|ŝ_t) = exp(log-prob); the gradient flows through π_θ itself (Eq. 10 -> Eq. 12).
        per_token = masked((torch.exp(student) * adv).sum(-1), rm)  # [R, T̂]
        sft = seq_sum(-sft_token_logprobs, sm).mean()
        term = seq_sum(per_token, rm).mean()
    loss = sft - gamma * term
    metrics = {
        "sft": sft.detach(),
        "adv_reward": seq_sum(per_token, rm).mean().detach(),
        "adv_per_token": token_mean(per_token, rm),
    }
    return LossOutput(loss, metrics)
