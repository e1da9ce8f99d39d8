"""TVKD, teacher-value-based KD (seed 000, appendix B; METHODS §2, revision 2).

Soft value of the DPO teacher V(s) = β log Σ_a exp(z_dpo(a|s)/β), stored per state
(`soft_value`, one β column chosen by the caller) for s_1 .. s_{T+1}. Per response token t:

    ψ_t = γ·V(s_{t+1}) − V(s_t)          (Eq. 3's potential-based shaping; γ = 1 by default)
    r_t = β_s log π_θ(a_t|s_t) − α ψ_t   (MaxEnt, Eq. 12: β_s (log π_θ − log π_ref) − α ψ_t),
    M   = Σ_t r_t(y_w) − Σ_t r_t(y_l),    L = −log σ(M), averaged over pairs.

V is the TEACHER's value V_φ, read from the store at EVERY state, s_{T+1} included, whether
or not the response ended with EOS (METHODS revision 2: the paper's "V*(s_T) = 0 at terminal
states" concerns the optimal value inside its derivation, not V_φ; zeroing V_φ(s_{T+1}) made
the shaping cancel out of every EOS-ended pair). At γ = 1 Σ_t ψ_t telescopes to
V(s_{T+1}) − V(s_1), V(s_1) is shared by a pair, so the shaping adds −α[V(s^w_{T+1}) −
V(s^l_{T+1})] to the margin; γ < 1 (the discount the authors' code exposes) also weighs every
intermediate state: −Σ_t ψ_t = V(s_1) − γV(s_{T+1}) + (1 − γ) Σ_{t=2..T} V(s_t). The code
keeps the per-token form; the tests check both closed forms.
Paper sweeps α ∈ {0.1 .. 1.5} (best 0.7), β ∈ {0.1 .. 5} (best 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..chunked import has_data
from ._common import LossOutput, check_mask, check_pairs, check_same, logsigmoid_loss, masked


def tvkd_shaping(soft_value: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """ψ [B, T] from soft_value [B, T+1] (V(s_1) .. V(s_{T+1}) per row, right-padded) and
    mask [B, T] (a prefix: response tokens first, then padding).

    Row b with L_b tokens reads V(s_1..s_{L_b+1}) = soft_value[b, :L_b+1]; ψ_t =
    γ·soft_value[b, t+1] − soft_value[b, t]. Padding ψ is 0 (garbage beyond L_b+1 is ignored)."""
    if mask.dim() != 2:
        raise ValueError(f"tvkd: mask must be [B, T], got {tuple(mask.shape)}")
    mask = mask.bool()
    b, t = mask.shape
    check_same("soft_value", soft_value, (b, t + 1))
    pos = torch.arange(t, device=mask.device)[None, :]
    if has_data(mask) and not torch.equal(mask, pos < mask.sum(-1, keepdim=True)):  # (fake tensors: no values)
        raise ValueError("tvkd: mask must be a prefix per row (response tokens first, right padding)")
    # both reads are masked first: soft_value[b, t+1] for the last real token is V(s_{T+1}),
    # a real state; anything further right is padding and must not reach the arithmetic.
    v_now, v_next = masked(soft_value[:, :-1], mask), masked(soft_value[:, 1:], mask)
    return masked(gamma * v_next - v_now, mask)


def tvkd_rewards(
    logprobs: Tensor,
    soft_value: Tensor,
    mask: Tensor,
    alpha: float,
    beta_s: float,
    gamma: float = 1.0,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token shaped reward r_t and shaping ψ_t, both [B, T] (0 on padding)."""
    mask = check_mask(mask, logprobs)
    psi = tvkd_shaping(soft_value.to(logprobs.dtype), mask, gamma)
    policy = masked(logprobs, mask)
    if ref_logprobs is not None:  # MaxEnt variant, Eq. 12
        check_same("ref_logprobs", ref_logprobs, logprobs.shape)
        policy = policy - masked(ref_logprobs.to(logprobs.dtype), mask)
    return masked(beta_s * policy - alpha * psi, mask), psi


def tvkd_loss(
    chosen_logprobs: Tensor,
    chosen_soft_value: Tensor,
    chosen_mask: Tensor,
    rejected_logprobs: Tensor,
    rejected_soft_value: Tensor,
    rejected_mask: Tensor,
    *,
    alpha: float = 0.7,
    beta_s: float = 1.0,
    gamma: float = 1.0,
    chosen_ref_logprobs: Tensor | None = None,
    rejected_ref_logprobs: Tensor | None = None,
) -> LossOutput:
    """chosen_* on y_w ([P, T_w], soft value [P, T_w+1]); rejected_* on y_l.
    logprobs: student log π_θ(y_t|s_t); soft_value: the stored column for the chosen β.
    Passing both *_ref_logprobs (stored `ref_token_logprob`) selects the MaxEnt variant.
    Metrics: `margin`, `accuracy`, `shaping_chosen`, `shaping_rejected` (Σ_t ψ_t means)."""
    if (chosen_ref_logprobs is None) != (rejected_ref_logprobs is None):
        raise ValueError("tvkd MaxEnt needs ref log-probs for both chosen and rejected")
    check_pairs(chosen_mask, rejected_mask, "tvkd")
    r_w, psi_w = tvkd_rewards(chosen_logprobs, chosen_soft_value, chosen_mask, alpha, beta_s, gamma, chosen_ref_logprobs)
    r_l, psi_l = tvkd_rewards(rejected_logprobs, rejected_soft_value, rejected_mask, alpha, beta_s, gamma, rejected_ref_logprobs)
    out = logsigmoid_loss(r_w.sum(-1) - r_l.sum(-1))
    out.metrics["shaping_chosen"] = psi_w.sum(-1).mean().detach()  # ψ is already 0 on padding
    out.metrics["shaping_rejected"] = psi_l.sum(-1).mean().detach()
    return out
