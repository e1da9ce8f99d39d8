"""ADPA, advantage-guided distillation (seed 001, Eq. 10; METHODS §2):

    L = L_SFT(x, y) − γ Σ_t Σ_{a ∈ topK} π_θ(a|ŝ_t) · adv(ŝ_t, a),

on the student's own rollout ŷ (states ŝ_t), y the ground-truth/preferred response and
adv = log π_dpo − log π_ref at the DPO teacher's top-K (`A_dpo/β`). The gradient of the
second term is the advantage-weighted policy gradient of Eq. 12: −γ Σ π_θ ∇log π_θ · adv.
Both sums are per sequence and averaged over the sequences of their own batch.
Paper sweep γ ∈ {0.5, 1, 1.5, 2, 3, 5}; best ≈ 3.

Advantages: `exact_advantage` (default; the reference gathered at the DPO ids) or
`paper_advantage` (the paper's approximation, METHODS §1), `advantage_error` compares them.
`reference_code=True` reproduces the authors' released code instead of Eq. 10 (off by
default): advantages are clamped to [0, 1] and the student's top-K probabilities to
[1e-8, 1 − 1e-8] (their `prob_stabilize`, which also stops the gradient of a token the
student gives < 1e-8), and the term is a mean over rollout tokens, not a per-sequence sum.
Negative advantages then no longer push tokens down.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import LossOutput, check_mask, check_same, masked, seq_sum, token_mean


def exact_advantage(topk_logprobs: Tensor, ref_topk_logprobs: Tensor) -> Tensor:
    """adv[t, k] = log π_dpo(id_k|s_t) − log π_ref(id_k|s_t), both stored at the DPO top-K ids."""
    check_same("ref_topk_logprobs", ref_topk_logprobs, topk_logprobs.shape)
    return topk_logprobs - ref_topk_logprobs


def paper_advantage(
    dpo_topk_ids: Tensor,
    dpo_topk_logprobs: Tensor,
    ref_topk_ids: Tensor,
    ref_topk_logprobs: Tensor,
) -> Tensor:
    """The ADPA paper's approximate advantage (METHODS §1, "Exact vs paper advantage").

    dpo_topk_ids / dpo_topk_logprobs [..., K]: the DPO teacher's own top-K.
    ref_topk_ids / ref_topk_logprobs [..., K_ref]: the REFERENCE's OWN top-K (its ids and
    log-probs; not the store's `ref_topk_logprobs`, which is gathered at the DPO ids).
    A DPO top-K token found in the reference's top-K uses the reference's log-prob; a
    missing one gets the reference's lowest top-K log-prob; reference-only tokens are
    dropped (they have no slot). Returns adv [..., K].
    """
    check_same("dpo_topk_logprobs", dpo_topk_logprobs, dpo_topk_ids.shape)
    check_same("ref_topk_logprobs", ref_topk_logprobs, ref_topk_ids.shape)
    if dpo_topk_ids.shape[:-1] != ref_topk_ids.shape[:-1]:
        raise ValueError(f"paper_advantage: leading dims differ: {dpo_topk_ids.shape} vs {ref_topk_ids.shape}")
    match = dpo_topk_ids[..., :, None] == ref_topk_ids[..., None, :]  # [..., K, K_ref]
    ref_lp = ref_topk_logprobs.to(dpo_topk_logprobs.dtype)
    neg_inf = torch.tensor(float("-inf"), dtype=ref_lp.dtype, device=ref_lp.device)
    found = torch.where(match, ref_lp[..., None, :], neg_inf).amax(-1)  # ids are unique per row
    floor = ref_lp.amin(-1, keepdim=True).expand_as(found)
    return dpo_topk_logprobs - torch.where(match.any(-1), found, floor)


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
    reference_code: bool = False,
) -> LossOutput:
    """sft_token_logprobs [B, T], sft_mask [B, T]: log π_θ(y_t|s_t) on the preferred response.
    rollout_student_topk [R, T̂, K]: log π_θ(topk_ids|ŝ_t) on the rollout (full-vocab normalised).
    advantage [R, T̂, K]: from `exact_advantage` / `paper_advantage`; rollout_mask [R, T̂].

    Returns mean_b L_SFT − γ · mean_r Σ_t Σ_k π_θ(a_k|ŝ_t) adv_k.
    Metrics: `sft`, `adv_reward` (the γ-free advantage sum), `adv_per_token`."""
    sm = check_mask(sft_mask, sft_token_logprobs, "sft_mask")
    rm = check_mask(rollout_mask, rollout_student_topk, "rollout_mask")
    check_same("advantage", advantage, rollout_student_topk.shape)
    adv = masked(advantage.to(rollout_student_topk.dtype), rm)
    # π_θ(a|ŝ_t) = exp(log-prob); the gradient flows through π_θ itself (Eq. 10 -> Eq. 12).
    pi = torch.exp(masked(rollout_student_topk, rm))
    if reference_code:  # the released code's prob_stabilize, applied to both tensors
        adv, pi = adv.clamp(1e-8, 1 - 1e-8), pi.clamp(1e-8, 1 - 1e-8)
    per_token = masked((pi * adv).sum(-1), rm)  # [R, T̂]
    sft = seq_sum(-sft_token_logprobs, sm)  # [B]
    reward = seq_sum(per_token, rm)  # [R]
    term = per_token.sum() / rm.sum().clamp(min=1) if reference_code else reward.mean()
    loss = sft.mean() - gamma * term
    metrics = {
        "sft": sft.mean().detach(),
        "adv_reward": reward.mean().detach(),
        "adv_per_token": token_mean(per_token, rm),
    }
    return LossOutput(loss, metrics)
