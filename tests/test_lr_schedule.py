"""The learning-rate schedules: after the warm-up they equal transformers' schedulers (the
ones the papers' recipes ran), and the warm-up is given in steps or as a ratio."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from kdcache.train.config import TrainConfig
from kdcache.train.optim import lr_lambda, make_scheduler, warmup_steps

HF = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup,
      "constant": lambda opt, warm, total: get_constant_schedule_with_warmup(opt, warm)}


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total,warm_kw", [(40, {}), (40, {"warmup_steps": 5}), (37, {"warmup_ratio": 0.1})])
def test_schedule_after_warmup_equals_transformers(schedule, total, warm_kw):
    sched = TrainConfig(model="m", store="s", lr_schedule=schedule, **warm_kw).validated().schedule_settings
    warm = warmup_steps(sched, total)
    assert warm == warm_kw.get("warmup_steps", math.ceil(warm_kw.get("warmup_ratio", 0) * total))
    f = lr_lambda(sched, total)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = HF[schedule](opt, warm, total).lr_lambdas[0]
    for step in range(warm, total + 1):
        assert f(step) == pytest.approx(ref(step), abs=1e-12), step
    for step in range(warm):  # warm-up: lr/warm, 2 lr/warm, ..., lr at the first step after it
        assert f(step) == pytest.approx((step + 1) / warm)


def test_scheduler_drives_the_optimizer():
    cfg = TrainConfig(model="m", store="s", lr=0.5, lr_schedule="cosine", warmup_ratio=0.25)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = make_scheduler(cfg.schedule_settings, opt, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.25, 0.5]) and lrs[2] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


@pytest.mark.parametrize("kw,msg", [
    ({"warmup_steps": 3, "warmup_ratio": 0.1}, "both set"),
    ({"warmup_ratio": 1.0}, r"--warmup-ratio 1.0: must be in \[0, 1\)"),
    ({"lr_schedule": "step"}, r"--lr-schedule 'step': use one of linear, cosine, constant"),
])
def test_bad_schedule_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(model="m", store="s", **kw).validated()
