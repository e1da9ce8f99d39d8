"""score_chunked against a float64 full-logits reference (pure tensors, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.precompute.scoring import LMHead, auto_chunk, reference_fields_float64, score_chunked

TOL = dict(rtol=0, atol=2e-5)


def _case(n=37, h=16, v=101, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.7
    b = torch.randn(v, generator=g) if bias else None
    tgt = torch.randint(0, v, (n,), generator=g)
    tgt[-1] = -1  # the s_{T+1} state has no target
    return hid, w, b, tgt


def _check_topk(out, ref64, k):
    # ids may differ only among exact ties: their float64 logprobs must equal the sorted values
    lp = ref64["logprobs"]
    got = lp.gather(1, out["topk_ids"])
    torch.testing.assert_close(got, ref64["topk_logprobs"], **TOL)
    torch.testing.assert_close(out["topk_logprobs"].double(), ref64["topk_logprobs"], **TOL)
    assert out["topk_ids"].shape[1] == k


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("k", [1, 7, 101])
@pytest.mark.parametrize("betas", [[1.0], [0.5, 1.0, 2.0]])
def test_matches_float64(chunk, k, betas):
    hid, w, b, tgt = _case(bias=True)
    head = LMHead(weight=w, bias=b)
    out = score_chunked(hid, head, tgt, k=k, betas=betas, chunk=chunk)
    ref = reference_fields_float64(hid.double() @ w.double().T + b.double(), tgt, k, betas)
    _check_topk(out, ref, k)
    torch.testing.assert_close(out["token_logprob"][:-1].double(), ref["token_logprob"][:-1], **TOL)
    assert math.isnan(out["token_logprob"][-1].item())
    torch.testing.assert_close(out["soft_value"].double(), ref["soft_value"], rtol=1e-6, atol=5e-5)
    mass = ref["topk_logprobs"].exp().sum(-1)
    torch.testing.assert_close(out["topk_mass"].double(), mass, **TOL)
    if k == 101:  # the full vocabulary holds all the mass
        torch.testing.assert_close(out["topk_mass"], torch.ones(37), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 64])
def test_reference_gathered_at_teacher_ids(chunk):
    hid, w, _, tgt = _case(seed=1)
    rhid, rw, _, _ = _case(seed=2)
    out = score_chunked(hid, w, tgt, k=9, betas=[1.0], chunk=chunk, ref_hidden=rhid, ref_lm_head=rw)
    lp_ref = torch.log_softmax(rhid.double() @ rw.double().T, -1)
    torch.testing.assert_close(out["ref_topk_logprobs"].double(),
                               lp_ref.gather(1, out["topk_ids"]), **TOL)
    tok = lp_ref.gather(1, tgt.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(out["ref_token_logprob"][:-1].double(), tok[:-1], **TOL)
    assert math.isnan(out["ref_token_logprob"][-1].item())
    torch.testing.assert_close(out["ref_lse"].double(), torch.logsumexp(rhid.double() @ rw.double().T, -1),
                               rtol=1e-6, atol=5e-5)


def test_paper_mode_approximation():
    hid, w, _, tgt = _case(seed=3)
    rhid, rw, _, _ = _case(seed=4)
    k = 5
    out = score_chunked(hid, w, tgt, k=k, chunk=4, ref_hidden=rhid, ref_lm_head=rw, ref_mode="paper")
    lp_ref = torch.log_softmax(rhid.double() @ rw.double().T, -1)
    rv, ri = lp_ref.topk(k, -1)
    for i in range(hid.shape[0]):
        for j, a in enumerate(out["topk_ids"][i].tolist()):
            pos = (ri[i] == a).nonzero()
            want = rv[i, pos[0, 0]] if len(pos) else rv[i, -1]
            assert abs(out["ref_topk_logprobs"][i, j].item() - want.item()) < 2e-5
    exact = lp_ref.gather(1, out["topk_ids"])
    err = (out["ref_topk_logprobs"].double() - exact).abs().mean(-1)
    torch.testing.assert_close(out["ref_paper_abs_err"].double(), err, **TOL)


def test_scale_and_softcap():
    hid, w, _, tgt = _case(seed=5)
    head = LMHead(weight=w, scale=0.5, softcap=3.0)
    out = score_chunked(hid, head, tgt, k=4, betas=[1.0, 2.0], chunk=8)
    z = torch.tanh((hid.double() @ w.double().T) * 0.5 / 3.0) * 3.0
    ref = reference_fields_float64(z, tgt, 4, [1.0, 2.0])
    _check_topk(out, ref, 4)
    torch.testing.assert_close(out["soft_value"].double(), ref["soft_value"], rtol=1e-6, atol=5e-5)


def test_low_precision_hidden_uses_float32_logits():
    hid, w, _, tgt = _case(seed=6)
    hb, wb = hid.bfloat16(), w.bfloat16()
    out = score_chunked(hb, LMHead(weight=wb), tgt, k=3, chunk=10)
    ref = reference_fields_float64(hb.double() @ wb.double().T, tgt, 3, [1.0])
    _check_topk(out, ref, 3)


def test_sequence_logprobs_only():
    """k=0 and no betas: lse and the target's log-prob only (a DPO store), no top-K."""
    hid, w, _, tgt = _case(seed=7)
    rhid, rw, _, _ = _case(seed=8)
    out = score_chunked(hid, w, tgt, k=0, betas=[], chunk=6, ref_hidden=rhid, ref_lm_head=rw)
    assert set(out) == {"lse", "token_logprob", "ref_lse", "ref_token_logprob"}
    ref = reference_fields_float64(hid.double() @ w.double().T, tgt, 1, [1.0])
    torch.testing.assert_close(out["token_logprob"][:-1].double(), ref["token_logprob"][:-1], **TOL)
    lp_ref = torch.log_softmax(rhid.double() @ rw.double().T, -1)
    torch.testing.assert_close(out["ref_token_logprob"][:-1].double(),
                               lp_ref.gather(1, tgt[:-1, None])[:, 0], **TOL)


@pytest.mark.parametrize("ref_mode", ["exact", "paper"])
def test_reference_that_is_the_teacher_reuses_its_logits(ref_mode):
    """One model as teacher and reference: the reference's fields are the teacher's own, and
    equal what a second, separate head (the two-forward path) gives."""
    hid, w, _, tgt = _case(seed=9)
    head = LMHead(weight=w)
    once = score_chunked(hid, head, tgt, k=6, betas=[1.0], chunk=5, ref_hidden=hid,
                         ref_lm_head=head, ref_mode=ref_mode)
    twice = score_chunked(hid, head, tgt, k=6, betas=[1.0], chunk=5, ref_hidden=hid.clone(),
                          ref_lm_head=LMHead(weight=w.clone()), ref_mode=ref_mode)
    assert torch.equal(once["ref_topk_logprobs"], once["topk_logprobs"])
    assert torch.equal(once["ref_token_logprob"][:-1], once["token_logprob"][:-1])
    for key in ("ref_topk_logprobs", "ref_token_logprob", "ref_lse"):
        torch.testing.assert_close(once[key], twice[key], rtol=0, atol=1e-6, equal_nan=True)


def test_bad_arguments():
    hid, w, _, tgt = _case()
    with pytest.raises(ValueError, match="k=-1"):
        score_chunked(hid, w, tgt, k=-1)
    with pytest.raises(ValueError, match="betas"):
        score_chunked(hid, w, tgt, k=2, betas=[0.0])
    with pytest.raises(ValueError, match="share one tokenizer"):
        score_chunked(hid, w, tgt, k=2, ref_hidden=hid, ref_lm_head=w[:50])
    assert auto_chunk(128256) >= 256


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("shape", [(1, 5), (7, 4096), (3, 151936)])
@pytest.mark.parametrize("given_max", [False, True])
def test_lse_rows_equals_float64_logsumexp(shape, overwrite, given_max):
    """The in-place log-sum-exp of the scoring loop (CPU fast path) against float64, with
    rows of large, tiny and -inf logits; it returns torch.logsumexp's bits on ordinary rows."""
    from kdcache.precompute.scoring import _lse_rows

    g = torch.Generator().manual_seed(shape[1])
    z = torch.randn(shape, generator=g) * 30
    z[0, : shape[1] // 2] = float("-inf")  # masked ids
    if shape[0] > 2:
        z[1] = float("-inf")  # an all -inf row: -inf, not nan
        z[2] += 1e4  # large logits: no overflow
    want = torch.logsumexp(z.double(), -1)
    plain = torch.logsumexp(z, -1)
    top = z.amax(-1, keepdim=True) if given_max else None
    got = _lse_rows(z.clone(), top, overwrite=overwrite)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite) and (got[~finite] == want[~finite].float()).all()
    assert torch.allclose(got[finite].double(), want[finite], rtol=1e-6, atol=1e-4)
    assert torch.equal(got[finite], plain[finite])
