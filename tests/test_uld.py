"""ULD (METHODS §5) against a plain float64 reference: value and gradient, the student's
K largest probabilities found chunk by chunk (no [N, V] logits) and gathered with gradient."""

from __future__ import annotations

import pytest
import torch

from kdcache.train.chunked import gather_logprobs
from kdcache.train.losses import uld_loss
from kdcache.train.xtok.student_topk import student_topk_ids


def _reference(h, w, teacher, mask, k):
    """Full logits, float64, plain loops: Σ_t Σ_i |p_(i) − q_(i)| over masked t, mean over b."""
    B, T = mask.shape
    logp = torch.log_softmax(h.double() @ w.double().t(), dim=-1).reshape(B, T, -1)
    total = 0.0
    for b in range(B):
        seq = 0.0
        for t in range(T):
            if not mask[b, t]:
                continue
            q = torch.sort(torch.exp(logp[b, t]), descending=True).values[:k]
            p = torch.sort(torch.exp(teacher[b, t].double()), descending=True).values
            seq = seq + sum(torch.abs(p[i] - q[i]) for i in range(k))
        total = total + seq
    return total / B


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("B,T,V,H,K,chunk", [(2, 3, 17, 5, 4, 2), (1, 5, 40, 8, 7, 3), (3, 2, 9, 4, 9, 100)])
def test_uld_equals_float64_reference(dtype, tol, B, T, V, H, K, chunk):
    g = torch.Generator().manual_seed(B * 100 + V)
    h = torch.randn(B * T, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    t_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(t_logits, -1).topk(K, dim=-1).values.to(torch.float32)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True

    ids = student_topk_ids(h, w, None, K, chunk)
    full = (h.detach().double() @ w.detach().double().t()).topk(K, dim=-1).indices
    assert torch.equal(torch.sort(ids, -1).values, torch.sort(full, -1).values)
    own = gather_logprobs(h, w, ids, chunk_size=chunk).reshape(B, T, K)
    loss = uld_loss(own, teacher, mask).loss
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()

    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = _reference(h64, w64, teacher, mask, K)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=tol, abs=tol)
    torch.testing.assert_close(gh.double(), h64.grad, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=tol * 10, atol=tol * 10)


def test_uld_is_zero_for_equal_sorted_vectors_and_ignores_order():
    p = torch.log(torch.tensor([[[0.5, 0.3, 0.1]]]))
    q = torch.log(torch.tensor([[[0.1, 0.5, 0.3]]]))
    out = uld_loss(q, p, torch.ones(1, 1, dtype=torch.bool))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    # masked positions contribute nothing, even with garbage values
    bad = torch.full((1, 2, 3), float("nan"))
    bad[0, 0] = q[0, 0]
    out = uld_loss(bad, torch.cat([p, p], 1), torch.tensor([[True, False]]))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
