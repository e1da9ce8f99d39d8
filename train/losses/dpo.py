"""DPO baseline (METHODS §2) with the reference log-probs read from the store:

    L = −log σ(β [(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]),

sequence log-probs = Σ_t over response tokens of the per-token log-probs (`ref_token_logprob`
for π_ref), averaged over pairs. The reference model is never loaded at train time.
"""

from __future__ import annotations

from torch import Tensor

from ._common import LossOutput, check_mask, check_pairs, check_same, logsigmoid_loss, seq_sum


def dpo_loss(
    chosen_logprobs: Tensor,
    chosen_ref_logprobs: Tensor,
    chosen_mask: Tensor,
    rejected_logprobs: Tensor,
    rejected_ref_logprobs: Tensor,
    rejected_mask: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """chosen_* [P, T_w], rejected_* [P, T_l]: student token log-probs log π_θ(y_t|s_t), stored
    `ref_token_logprob`, masks. Metrics: `margin` (β-scaled), `accuracy`."""
    cm = check_mask(chosen_mask, chosen_logprobs, "chosen_mask")
    rm = check_mask(rejected_mask, rejected_logprobs, "rejected_mask")
    check_pairs(cm, rm, "dpo")
    check_same("chosen_ref_logprobs", chosen_ref_logprobs, chosen_logprobs.shape)
    check_same("rejected_ref_logprobs", rejected_ref_logprobs, rejected_logprobs.shape)
    # masked sums of each term separately: padding may be NaN in the stored tensors
    w = seq_sum(chosen_logprobs, cm) - seq_sum(chosen_ref_logprobs.to(chosen_logprobs.dtype), cm)
    l_ = seq_sum(rejected_logprobs, rm) - seq_sum(rejected_ref_logprobs.to(rejected_logprobs.dtype), rm)
    return logsigmoid_loss(beta * (w - l_))
