"""SFT (METHODS §2): L_SFT = −Σ_t log π_θ(y_t|s_t), summed over response tokens and
averaged over the sequences of the batch. SeqKD is this loss on `role = teacher_rollout`."""

from __future__ import annotations

from torch import Tensor

from ._common import LossOutput, check_mask, seq_sum, token_mean


def sft_loss(token_logprobs: Tensor, mask: Tensor) -> LossOutput:
    """token_logprobs [B, T]: log π_θ(y_t|s_t) (full-vocab normalised); mask [B, T].

    Returns mean_b(−Σ_t log π_θ(y_t|s_t)); metric `nll_per_token`."""
    mask = check_mask(mask, token_logprobs)
    nll = -token_logprobs
    return LossOutput(seq_sum(nll, mask).mean(), {"nll_per_token": token_mean(nll, mask)})


# SeqKD (baseline): SFT on teacher rollouts; only the data differs.
seqkd_loss = sft_loss
