"""Conventions of the authors' released trainer (gaoshiping/ADPA: `utils/compress_logits.py`
`load_input_and_target_probs_fast`, `scripts/run_distill_dpo.py`), shared by the
released-code variants of DCKD and ADPA (METHODS §2). Written from reading that code.

- Distributions are compared over K + 1 buckets: the K stored ids, then one tail bucket
  holding the rest of the mass, 1 − Σ_k p_k (the student's: 1 − Σ_k π_θ(id_k)).
- `prob_stabilize` clamps the student's AND the target's bucket values to [1e-8, 1 − 1e-8]
  (torch.clamp: no gradient outside the range).
- Each loss term is a token mean over the response tokens of the micro-batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import seq_sum

CLAMP = 1e-8  # prob_stabilize's bound
FLOOR = 1e-7  # get_kl_loss's floor on student bucket probabilities; the ADPA pipeline's floor


def stabilize(p: Tensor) -> Tensor:
    return p.clamp(CLAMP, 1 - CLAMP)


def buckets(topk_logprobs: Tensor) -> Tensor:
    """[..., K] full-vocab log-probs at the stored ids -> [..., K+1] stabilised probabilities,
    the last one the tail 1 − Σ_k p_k. Computed in probability space, as the released code
    does: a tail that rounds below 0 is held at 1e-8 by the clamp."""
    p = topk_logprobs.exp()
    return stabilize(torch.cat([p, (1 - p.sum(-1)).unsqueeze(-1)], dim=-1))


def token_average(x: Tensor, mask: Tensor) -> Tensor:
    """Σ over every response token of the micro-batch / their count (differentiable)."""
    return seq_sum(x, mask).sum() / mask.sum().clamp(min=1)
