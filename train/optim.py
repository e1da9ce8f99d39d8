"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import torch

from .config import TrainConfig


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warm-up over `warmup_steps`, then linear decay to 0 at step `total`."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))

    return f


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optim == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("--optim adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim != "adamw":
        raise ValueError(f"unknown --optim {cfg.optim!r}: use adamw or adamw8bit")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
