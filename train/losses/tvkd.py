"""TVKD, teacher-value-based KD (seed 000, appendix B; METHODS §2).

Soft value of the DPO teacher V(s) = β log Σ_a exp(z_dpo(a|s)/β), stored per state
(`soft_value`, one β column chosen by the caller). Per response token t:

    ψ_t = V(s_{t+1}) − V(s_t),          V(s_{T+1}) := 0 when s_{T+1} is terminal (EOS),
    r_t = β_s log π_θ(a_t|s_t) − α ψ_t   (MaxEnt, Eq. 12: β_s (log π_θ − log π_ref) − α ψ_t),
    M   = Σ_t r_t(y_w) − Σ_t r_t(y_l),    L = −log σ(M), averaged over pairs.

The per-token form of the paper is kept (Σ_t ψ_t telescopes to V(s_{T+1}) − V(s_1), and
V(s_1) is shared by both responses of a pair; the tests check it, the code does not use it).
Paper sweeps α ∈ {0.1 .. 1.5} (best 0.7), β ∈ {0.1 .. 5} (best 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..chunked import has_data
from ._common import LossOutput, check_mask, check_pairs, check_same, logsigmoid_loss, masked


def tvkd_shaping(soft_value: Tensor, mask: Tensor, is_terminal: Tensor) -> Tensor:
    """ψ [B, T] from soft_value [B, T+1] (V(s_1) .. V(s_{T+1}) per row, right-padded),
    mask [B, T] (a prefix: response tokens first, then padding) and is_terminal [B] bool.

    Row b with L_b tokens reads V(s_1..s_{L_b+1}) = soft_value[b, :L_b+1]; its last ψ uses
    soft_value[b, L_b], replaced by 0 when the row is terminal. Padding ψ is 0."""
    if mask.dim() != 2:
        raise ValueError(f"tvkd: mask must be [B, T], got {tuple(mask.shape)}")
    mask = mask.bool()
    b, t = mask.shape
    check_same("soft_value", soft_value, (b, t + 1))
    check_same("is_terminal", is_terminal, (b,))
    lengths = mask.sum(-1)
    pos = torch.arange(t, device=mask.device)[None, :]
    if has_data(mask) and not torch.equal(mask, pos < lengths[:, None]):  # (fake tensors: no values)
        raise ValueError("tvkd: mask must be a prefix per row (response tokens first, right padding)")
    v_now, v_next = soft_value[:, :-1], soft_value[:, 1:]
    last = pos == (lengths - 1)[:, None]  # the token whose next state is s_{T+1}
    v_next = torch.where(last & is_terminal.bool()[:, None], torch.zeros_like(v_next), v_next)
    return masked(v_next - v_now, mask)


def tvkd_rewards(
    logprobs: Tensor,
    soft_value: Tensor,
    mask: Tensor,
    is_terminal: Tensor,
    alpha: float,
    beta_s: float,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token shaped reward r_t and shaping ψ_t, both [B, T] (0 on padding)."""
    mask = check_mask(mask, logprobs)
    psi = tvkd_shaping(soft_value.to(logprobs.dtype), mask, is_terminal)
    policy = masked(logprobs, mask)
    if ref_logprobs is not None:  # MaxEnt variant, Eq. 12
        check_same("ref_logprobs", ref_logprobs, logprobs.shape)
        policy = policy - masked(ref_logprobs.to(logprobs.dtype), mask)
    return masked(beta_s * policy - alpha * psi, mask), psi


def tvkd_loss(
    chosen_logprobs: Tensor,
    chosen_soft_value: Tensor,
    chosen_mask: Tensor,
    chosen_terminal: Tensor,
    rejected_logprobs: Tensor,
    rejected_soft_value: Tensor,
    rejected_mask: Tensor,
    rejected_terminal: Tensor,
    alpha: float = 0.7,
    beta_s: float = 1.0,
    chosen_ref_logprobs: Tensor | None = None,
    rejected_ref_logprobs: Tensor | None = None,
) -> LossOutput:
    """chosen_* on y_w ([P, T_w], soft value [P, T_w+1], terminal [P]); rejected_* on y_l.
    logprobs: student log π_θ(y_t|s_t); soft_value: the stored column for the chosen β.
    Passing both *_ref_logprobs (stored `ref_token_logprob`) selects the MaxEnt variant.
    Metrics: `margin`, `accuracy`, `shaping_chosen`, `shaping_rejected` (Σ_t ψ_t means)."""
    if (chosen_ref_logprobs is None) != (rejected_ref_logprobs is None):
        raise ValueError("tvkd MaxEnt needs ref log-probs for both chosen and rejected")
    check_pairs(chosen_mask, rejected_mask, "tvkd")
    r_w, psi_w = tvkd_rewards(chosen_logprobs, chosen_soft_value, chosen_mask, chosen_terminal, alpha, beta_s, chosen_ref_logprobs)
    r_l, psi_l = tvkd_rewards(rejected_logprobs, rejected_soft_value, rejected_mask, rejected_terminal, alpha, beta_s, rejected_ref_logprobs)
    out = logsigmoid_loss(r_w.sum(-1) - r_l.sum(-1))
    out.metrics["shaping_chosen"] = psi_w.sum(-1).mean().detach()  # ψ is already 0 on padding
    out.metrics["shaping_rejected"] = psi_l.sum(-1).mean().detach()
    return out
