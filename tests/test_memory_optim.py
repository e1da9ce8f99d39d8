"""The optimizers the memory options choose: the bf16-weights AdamW keeps small updates
(stochastic rounding, checked against a float64 AdamW), equals torch's fused AdamW on fp32
weights, and resumes bitwise; make_optimizer picks fused / SR / 8-bit as documented."""

from __future__ import annotations

import io
import math

import pytest
import torch

from kdcache.train.config import OptimSettings, TrainConfig
from kdcache.train.optim import AdamW, make_optimizer, stochastic_round_


def _cfg(**kw) -> OptimSettings:
    """What make_optimizer reads, as a run's config slices it."""
    return TrainConfig(**{"model": "m", "store": "s", "lr": 1e-4, "weight_decay": 0.0, **kw}).optim_settings


def _adamw64(w0: torch.Tensor, grads, lr: float, betas=(0.9, 0.999), eps=1e-8, wd=0.0) -> torch.Tensor:
    """Plain AdamW in float64, the reference trajectory."""
    w, m, v = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64), torch.zeros_like(w0, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        w.mul_(1 - lr * wd)
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        w.sub_(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
    return w


def test_stochastic_rounding_is_unbiased_and_bf16_exact():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # a quarter ulp above 1.0
    r = stochastic_round_(x.clone())
    assert torch.equal(r, r.bfloat16().float())  # representable in bf16
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    neg = stochastic_round_(-x.clone())
    assert neg.mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)


@pytest.mark.parametrize("states", ["fp32", "bf16"])
def test_small_updates_are_kept_with_bf16_weights(states):
    """lr 1e-4 moves |w| ~ 1 by 1e-4 per step: far below bf16's half-ulp (2^-9). Round-to-nearest
    keeps w at its start; stochastic rounding follows the float64 AdamW trajectory."""
    torch.manual_seed(0)
    n, steps, lr = 4096, 100, 1e-4
    w0 = (1 + 0.1 * torch.rand(n)).bfloat16()
    grads = [torch.randn(n) * 0.1 + 1.0 for _ in range(steps)]  # a steady push downwards
    ref = _adamw64(w0, grads, lr)
    out = {}
    for sr in (True, False):
        p = torch.nn.Parameter(w0.clone())
        opt = make_optimizer(_cfg(lr=lr, optim_states=states, stochastic_rounding=sr), [p])
        assert isinstance(opt, AdamW if (sr or states == "fp32") else torch.optim.AdamW)
        for g in grads:
            p.grad = g.bfloat16()
            opt.step()
        out[sr] = p.detach().double()
    moved = (w0.double() - ref).mean().item()  # ~ steps * lr = 1e-2
    assert moved == pytest.approx(steps * lr, rel=0.05)
    assert (w0.double() - out[True]).mean().item() == pytest.approx(moved, rel=0.03)
    err = out[True] - ref
    assert abs(err.mean().item()) < 0.05 * moved  # unbiased: the float64 trajectory on average
    # each weight random-walks around it: ~sqrt(steps * lr / ulp) ulps, ~1 ulp (2^-7) here
    assert err.pow(2).mean().sqrt().item() <= 2 * 2**-7
    if states == "fp32":  # round-to-nearest: nearly every update is lost
        assert (w0.double() - out[False]).mean().item() < 0.2 * moved


def test_fp32_weights_match_torch_fused_adamw_bitwise():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(300, 7))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(5):
        g = torch.randn(300, 7)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)


def test_slices_do_not_change_the_result(monkeypatch):
    from kdcache.train import optim

    torch.manual_seed(2)
    w0, g = torch.randn(1000).bfloat16(), torch.randn(1000).bfloat16()
    outs = []
    for slice_ in (1 << 23, 64):
        monkeypatch.setattr(optim, "SLICE", slice_)
        torch.manual_seed(3)
        p = torch.nn.Parameter(w0.clone())
        opt = AdamW([p], lr=1e-3)
        p.grad = g.clone()
        opt.step()
        outs.append((p.detach().clone(), opt.state[p]["exp_avg"].clone()))
    assert torch.equal(outs[0][1], outs[1][1])  # fp32 moments: identical
    # the weights differ only by where the random bits fell: both within one bf16 ulp
    assert (outs[0][0].float() - outs[1][0].float()).abs().max() <= 2**-7 * outs[0][0].float().abs().max()


def test_state_dict_keeps_fp32_moments_and_resumes_bitwise():
    torch.manual_seed(4)
    w0 = torch.randn(64, 8).bfloat16()
    grads = [torch.randn(64, 8).bfloat16() for _ in range(4)]

    def run(split: bool):
        torch.manual_seed(5)
        p = torch.nn.Parameter(w0.clone())
        opt = AdamW([p], lr=1e-3)
        for i, g in enumerate(grads):
            if split and i == 2:  # save, rebuild, load (through bytes, weights_only)
                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "w": p.detach(), "rng": torch.get_rng_state()}, buf)
                buf.seek(0)
                st = torch.load(buf, weights_only=True)
                p = torch.nn.Parameter(st["w"].clone())
                opt = AdamW([p], lr=1e-3)
                opt.load_state_dict(st["opt"])
                torch.set_rng_state(st["rng"])
                assert opt.state[p]["exp_avg"].dtype == torch.float32
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(False), run(True))


def test_make_optimizer_choices():
    f32 = [torch.nn.Parameter(torch.zeros(4))]
    bf = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    assert make_optimizer(_cfg(), f32, device_type="cuda").defaults["fused"] is True
    assert make_optimizer(_cfg(), f32, device_type="cpu").defaults["fused"] is True  # fused on CPU too: 4-6x faster step
    sr = make_optimizer(_cfg(), bf)
    assert isinstance(sr, AdamW) and sr.state_dtype == torch.float32 and sr.stochastic
    assert make_optimizer(_cfg(optim_states="bf16"), bf).state_dtype == torch.bfloat16
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="torchao"):
            make_optimizer(_cfg(optim="adamw8bit"), bf)
    assert math.isfinite(make_optimizer(_cfg(), bf).defaults["lr"])


@pytest.mark.slow  # torchao compiles its update with torch.compile: minutes on a CPU
def test_torchao_8bit_adamw_runs_and_keeps_small_bf16_updates():
    pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    n, lr = 4096, 1e-4
    p = torch.nn.Parameter((1 + 0.1 * torch.rand(n)).bfloat16())
    w0 = p.detach().double().clone()
    opt = make_optimizer(_cfg(optim="adamw8bit", lr=lr), [p])
    assert type(opt).__name__ == "AdamW8bit" and opt.bf16_stochastic_round
    for _ in range(20):
        p.grad = (torch.randn(n) * 0.1 + 1.0).bfloat16()
        opt.step()
    assert opt.state[p]["exp_avg"].codes.dtype == torch.uint8  # 1-byte moments
    moved = (w0 - p.detach().double()).mean().item()
    assert moved == pytest.approx(20 * lr, rel=0.15)  # kept in expectation, not rounded away
