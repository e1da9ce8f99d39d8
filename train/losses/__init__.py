"""Distillation losses: pure functions of gathered student log-probs and stored teacher
tensors (METHODS.md §2; signatures and equations in docs/LOSSES.md). Each returns a
`LossOutput(loss, metrics)`; `loss` is the scalar to minimise."""

from ._common import LossOutput
from .adpa import adpa_loss, advantage_error, exact_advantage, paper_advantage
from .dckd import dckd_loss
from .sft import seqkd_loss, sft_loss
from .topk_kd import kd_per_token, tail_logprob, topk_kd_loss

__all__ = [
    "LossOutput",
    "adpa_loss",
    "advantage_error",
    "dckd_loss",
    "exact_advantage",
    "kd_per_token",
    "paper_advantage",
    "seqkd_loss",
    "sft_loss",
    "tail_logprob",
    "topk_kd_loss",
]
