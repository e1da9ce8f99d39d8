"""TGPO, teacher-guided policy optimisation (seed 002, Eq. 3-6; METHODS §2).

All functions return a LOSS TO MINIMISE (the paper writes objectives J to maximise, except
the guidance term, which it writes as an NLL). On the G rollouts y_i of each prompt:

    A_i      = (r_i − mean_g r) / (std_g r + eps)        group-normalised reward (std: ddof=0)
    ρ_{i,t}  = exp(log π_θ(y_{i,t}|s) − behavior_logprob_{i,t})
    L_GRPO   = −(1/Z) Σ_i Σ_t min(ρ A, clip(ρ, 1−ε, 1+ε) A),  Z = Σ_i |y_i| per prompt (Eq. 4),
               then the mean over the prompts of the batch
    L_G      = −(1/|y_i|) Σ_t log π_θ(y^T_t|s_t),  y^T_t = topk_ids[t, 0] (Eq. 3), mean over rollouts
    TGPO     = L_GRPO + w_step · L_G,   w_step = max(w_init − δ·step, 0)     (Eq. 6)
    TGPO_R   = L_GRPO with A_{i,t} = A_i + λ·sg[log π_θ(y^T_t|s_t)]           (Eq. 5)

So minimising L_G raises the student's probability of the teacher's greedy token, and
minimising L_GRPO raises the probability of rollouts with above-average reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import LossOutput, check_mask, check_same, masked, seq_sum


def guidance_weight(step: int, w_init: float = 2e-3, delta: float = 1e-5) -> float:
    """Linear decay of the guidance weight; the paper defaults reach 0 at step 200."""
    return max(w_init - delta * step, 0.0)


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i − mean) / (std + eps) within each group of equal `group_ids` ([N] each).
    std is the population std (ddof=0): a single-rollout group gets A = 0, not NaN."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)}, {tuple(group_ids.shape)}")
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inv, rewards) / count
    centred = rewards - mean[inv]
    var = torch.zeros_like(count).index_add_(0, inv, centred**2) / count
    return centred / (var.sqrt()[inv] + eps)


def grpo_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    clip: float = 0.2,
) -> LossOutput:
    """logprobs / behavior_logprobs [N, T]: student now / when sampling (stored
    `behavior_logprob`); advantages [N] or per-token [N, T]; group_ids [N]; mask [N, T].
    Metrics: `ratio` (per-token mean), `clip_frac` (tokens whose ratio was clipped)."""
    mask = check_mask(mask, logprobs)
    check_same("behavior_logprobs", behavior_logprobs, logprobs.shape)
    check_same("group_ids", group_ids, logprobs.shape[:1])
    adv = advantages.to(logprobs.dtype)
    adv = adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv
    check_same("advantages", adv, logprobs.shape)
    # log-ratio zeroed on padding before exp: a garbage behavior log-prob must not overflow
    ratio = torch.exp(masked(logprobs - behavior_logprobs.to(logprobs.dtype), mask))
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip)
    obj = torch.minimum(ratio * adv, clipped * adv)  # PPO's pessimistic bound
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    per_seq = seq_sum(obj, mask)
    z = torch.zeros(n_groups, dtype=obj.dtype, device=obj.device).index_add_(0, inv, mask.sum(-1).to(obj.dtype))
    j = torch.zeros_like(z).index_add_(0, inv, per_seq) / z.clamp(min=1)  # Eq. 4 per prompt
    n_tok = mask.sum().clamp(min=1)
    metrics = {
        "ratio": (seq_sum(ratio, mask).sum() / n_tok).detach(),
        "clip_frac": (seq_sum((ratio != clipped).to(obj.dtype), mask).sum() / n_tok).detach(),
    }
    return LossOutput(-j.mean(), metrics)


def guidance_loss(guide_logprobs: Tensor, mask: Tensor) -> Tensor:
    """L_G = mean over rollouts of −(1/|y|) Σ_t log π_θ(y^T_t|s_t); guide_logprobs [N, T] are
    the student's log-probs at the teacher's greedy ids topk_ids[..., 0]."""
    mask = check_mask(mask, guide_logprobs)
    return (seq_sum(-guide_logprobs, mask) / mask.sum(-1).clamp(min=1)).mean()


def tgpo_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    guide_logprobs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    step: int,
    w_init: float = 2e-3,
    delta: float = 1e-5,
    clip: float = 0.2,
    shaping: bool = False,
    lam: float = 0.1,
    eps: float = 1e-6,
) -> LossOutput:
    """TGPO (default) or TGPO_R (`shaping=True`, λ = `lam`) on N rollouts [N, T] grouped by
    prompt (`group_ids` [N], `rewards` [N]). Metrics: `grpo`, `guidance`, `w`, `ratio`, `clip_frac`."""
    check_same("guide_logprobs", guide_logprobs, logprobs.shape)
    adv = group_advantages(rewards.to(logprobs.dtype), group_ids, eps)
    if shaping:  # Eq. 5: guidance as a detached per-token reward, no direct gradient path
        adv = adv[:, None] + lam * guide_logprobs.detach()
    out = grpo_loss(logprobs, behavior_logprobs, adv, group_ids, mask, clip)
    guide = guidance_loss(guide_logprobs, mask)
    w = 0.0 if shaping else guidance_weight(step, w_init, delta)
    loss = out.loss + w * guide if w > 0 else out.loss
    metrics = {"grpo": out.loss.detach(), "guidance": guide.detach(), "w": torch.tensor(w, dtype=logprobs.dtype), **out.metrics}
    return LossOutput(loss, metrics)
