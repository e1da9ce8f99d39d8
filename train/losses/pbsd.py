"""PBSD, preference-based self-distillation (seed 003, Eq. 8-10; METHODS §2):

    m = β [(log π_θ(y+|x) − log π_teach(y+|x,c)) − (log π_θ(y−|x) − log π_teach(y−|x,c))],
    L = −log σ(m), averaged over pairs.

y+ is sampled from the teacher (the initial student WITH privileged context c), y− from the
student (without c). π_θ is evaluated WITHOUT c, the teacher WITH c: its per-token log-probs
on both responses are precomputed (stored `token_logprob` of the teacher-side records).
Sequence log-probs are Σ_t over response tokens. Same form as DPO with the fixed teacher
in place of the reference.
"""

from __future__ import annotations

from torch import Tensor

from ._common import LossOutput
from .dpo import dpo_loss


def pbsd_loss(
    pos_logprobs: Tensor,
    pos_teacher_logprobs: Tensor,
    pos_mask: Tensor,
    neg_logprobs: Tensor,
    neg_teacher_logprobs: Tensor,
    neg_mask: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """pos_* [P, T+] on y+ and neg_* [P, T−] on y−: student token log-probs log π_θ(y_t|x, y_<t)
    (no context), stored teacher token log-probs log π_teach(y_t|x, c, y_<t), masks.
    Metrics: `margin` (β-scaled), `accuracy`. It is `dpo_loss` with y+ as chosen, y− as
    rejected and the teacher as the reference (the same operations, so the same bits)."""
    return dpo_loss(pos_logprobs, pos_teacher_logprobs, pos_mask, neg_logprobs, neg_teacher_logprobs,
                    neg_mask, beta=beta)
