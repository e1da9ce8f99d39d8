"""Distillation losses: pure functions of gathered student log-probs and stored teacher
tensors (METHODS.md §2; signatures and equations in docs/LOSSES.md). Each returns a
`LossOutput(loss, metrics)`; `loss` is the scalar to minimise."""

from ._common import LossOutput
from .adpa import adpa_loss, advantage_error, exact_advantage, paper_advantage
from .dckd import dckd_loss
from .dpo import dpo_loss
from .ensemble import ensemble_loss, mix_teachers
from .pbsd import pbsd_loss
from .sft import seqkd_loss, sft_loss
from .tgpo import group_advantages, grpo_loss, guidance_loss, guidance_weight, tgpo_loss
from .topk_kd import kd_per_token, tail_logprob, topk_kd_loss
from .tvkd import tvkd_loss, tvkd_rewards, tvkd_shaping
from .uld import uld_loss, uld_per_token

__all__ = [
    "LossOutput",
    "adpa_loss",
    "advantage_error",
    "dckd_loss",
    "dpo_loss",
    "ensemble_loss",
    "exact_advantage",
    "group_advantages",
    "grpo_loss",
    "guidance_loss",
    "guidance_weight",
    "kd_per_token",
    "mix_teachers",
    "paper_advantage",
    "pbsd_loss",
    "seqkd_loss",
    "sft_loss",
    "tail_logprob",
    "tgpo_loss",
    "topk_kd_loss",
    "tvkd_loss",
    "tvkd_rewards",
    "tvkd_shaping",
    "uld_loss",
    "uld_per_token",
]
