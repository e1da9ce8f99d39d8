"""gather_logprobs against a float64 full-logits reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from kdcache.train.chunked import gather_logprobs


def reference(h: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    logits = h.double() @ w.double().t()
    if b is not None:
        logits = logits + b.double()
    return torch.log_softmax(logits, dim=-1).gather(1, idx)


def make(n: int, v: int, h: int, m: int, dtype: torch.dtype, seed: int = 0, dup: bool = False):
    g = torch.Generator().manual_seed(seed)
    hid = (torch.randn(n, h, generator=g, dtype=torch.float64) * 2).to(dtype)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, v, (n, m), generator=g)
    if dup and m > 1:
        idx[:, 1] = idx[:, 0]  # duplicate ids in every row
    return hid, w, idx


def grads(fn, hid, w, idx, up, b=None):
    hid = hid.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    args = (hid, w, idx) if b is None else (hid, w, idx, b)
    out = fn(*args)
    (out * up).sum().backward()
    return out.detach(), hid.grad, w.grad


SHAPES = [  # (N, V, H, M, chunk)
    (7, 37, 5, 3, 2),  # chunk does not divide N
    (8, 37, 6, 4, 4),
    (5, 37, 4, 6, 64),  # chunk >= N
    (9, 37, 3, 37, 4),  # M = V: the full vocabulary
    (1, 11, 2, 1, 1),
]


@pytest.mark.parametrize("n,v,h,m,chunk", SHAPES)
@pytest.mark.parametrize("dup", [False, True])
def test_float64_exact(n, v, h, m, chunk, dup):
    hid, w, idx = make(n, v, h, m, torch.float64, seed=n * v + m, dup=dup)
    up = torch.randn(n, m, dtype=torch.float64)
    out, gh, gw = grads(lambda a, b, c: gather_logprobs(a, b, c, chunk_size=chunk), hid, w, idx, up)
    ref, rh, rw = grads(reference, hid, w, idx, up)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n,v,h,m,chunk", SHAPES[:3])
def test_float32(n, v, h, m, chunk):
    hid, w, idx = make(n, v, h, m, torch.float32, seed=3, dup=True)
    up = torch.randn(n, m, dtype=torch.float64)
    out, gh, gw = grads(lambda a, b, c: gather_logprobs(a, b, c, chunk_size=chunk), hid, w, idx, up.float())
    ref, rh, rw = grads(reference, hid.double(), w.double(), idx, up)
    assert out.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_give_float32_logits():
    n, v, h, m = 6, 37, 8, 5
    hid, w, idx = make(n, v, h, m, torch.bfloat16, seed=5)
    up = torch.randn(n, m, dtype=torch.float64)
    out, gh, gw = grads(lambda a, b, c: gather_logprobs(a, b, c, chunk_size=4), hid, w, idx, up.float())
    # the reference sees the same bf16-rounded inputs, so only float32 arithmetic differs
    ref, rh, rw = grads(reference, hid.double(), w.double(), idx, up)
    assert out.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    torch.testing.assert_close(gw.double(), rw, rtol=2e-2, atol=2e-2)


def test_under_bf16_autocast_frozen_weight():
    n, v, h, m = 6, 37, 8, 3
    hid, w, idx = make(n, v, h, m, torch.float32, seed=7)
    hid.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gather_logprobs(hid, w, idx, chunk_size=4)  # w frozen (LoRA keeps lm_head fixed)
        out.sum().backward()
    assert out.dtype == torch.float32 and w.grad is None
    torch.testing.assert_close(out.double(), reference(hid.detach(), w, idx), rtol=1e-5, atol=1e-5)
    rh = hid.detach().double().requires_grad_(True)
    reference(rh, w, idx).sum().backward()
    torch.testing.assert_close(hid.grad.double(), rh.grad, rtol=1e-4, atol=1e-4)


def test_bias_and_lse():
    n, v, h, m = 5, 37, 4, 3
    hid, w, idx = make(n, v, h, m, torch.float64, seed=9)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True)
    hid.requires_grad_(True)
    out, lse = gather_logprobs(hid, w, idx, chunk_size=2, bias=b, return_lse=True)
    (out.sum() + (lse * torch.arange(n)).sum()).backward()
    h2 = hid.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    logits = h2 @ w.t() + b2
    ref_lse = torch.logsumexp(logits, -1)
    (reference(h2, w, idx, b2).sum() + (ref_lse * torch.arange(n)).sum()).backward()
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(hid.grad, h2.grad, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-8, atol=1e-8)


def test_gradcheck():
    hid, w, idx = make(4, 7, 3, 3, torch.float64, seed=11, dup=True)
    hid.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: gather_logprobs(a, b, idx, chunk_size=3), (hid, w))


def test_bad_inputs():
    hid, w, idx = make(4, 7, 3, 2, torch.float64)
    with pytest.raises(ValueError, match="hidden must be"):
        gather_logprobs(hid[:, :2], w, idx)
    with pytest.raises(ValueError, match="index must be"):
        gather_logprobs(hid, w, idx[:3])
    with pytest.raises(TypeError, match="int64"):
        gather_logprobs(hid, w, idx.int())
    with pytest.raises(IndexError):
        gather_logprobs(hid, w, idx + 7)


def test_saves_no_full_logits():
    """Autograd keeps only hidden, weight, index and lse: nothing of size N·V (or chunk·V)."""
    n, v, h, m = 40, 500, 3, 4
    hid, w, idx = make(n, v, h, m, torch.float32, seed=13)
    hid.requires_grad_(True)
    w.requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gather_logprobs(hid, w, idx, chunk_size=8)
    assert saved and max(saved) <= v * h  # the weight is the largest thing kept
    assert sum(saved) <= n * h + v * h + n * m + n
    out.sum().backward()
    assert hid.grad is not None and w.grad is not None


@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [1 << 24, 96])  # CPU path: the whole weight, or many vocab blocks
def test_bf16_weight_used_in_its_own_dtype(hidden_dtype, block, monkeypatch):
    """A bf16 lm_head is never copied to float32 (V x H x 4 bytes per call, forward and
    backward): each chunk's GEMM reads it as bf16 with float32 accumulation. The result keeps
    the float64 reference's accuracy for the bf16-rounded inputs."""
    from kdcache.train import chunked
    from kdcache.train.memory import StorageTracker

    monkeypatch.setattr(chunked, "BLOCK_ELEMS", block)
    n, v, h, m = 20, 500, 16, 6
    hid, w, idx = make(n, v, h, m, torch.float32, seed=21, dup=True)
    hid, w = hid.to(hidden_dtype), w.bfloat16()
    up = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    tracker = StorageTracker()
    with tracker:
        out, gh, gw = grads(lambda a, b, c: gather_logprobs(a, b, c, chunk_size=8), hid, w, idx, up.float())
    if block * 4 < v * h * 4:  # no float32 copy of the weight, nor of its gradient
        assert tracker.max_alloc < v * h * 4
    assert out.dtype == torch.float32 and gh.dtype == hidden_dtype and gw.dtype == torch.bfloat16
    # reference: the same bf16-rounded hidden rows and weight, float64 everywhere after that
    ref, rh, rw = grads(reference, hid.bfloat16().double(), w.double(), idx, up)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the logit gradient is rounded to bf16 (8 bits) before the GEMMs, and bf16 grad_w /
    # grad_h round their outputs: errors are a few 2^-9 of the gradients' scale
    for got, want in ((gh, rh), (gw, rw)):
        assert (got.double() - want).abs().max() <= 2**-6 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_gives_zero_weight_grad(dtype):
    """No response rows: the head's gradient is zeros of its shape and dtype (the backward
    writes the first chunk's product instead of adding it to a zero-filled buffer)."""
    hid, w, idx = make(0, 11, 3, 2, dtype)
    out, gh, gw = grads(lambda a, b, c: gather_logprobs(a, b, c, chunk_size=4), hid, w, idx,
                        torch.zeros(0, 2))
    assert out.shape == (0, 2) and gh.shape == (0, 3)
    assert gw.dtype == dtype and gw.shape == w.shape and not gw.any()
