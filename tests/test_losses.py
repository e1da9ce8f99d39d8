"""SFT, top-K KD, DCKD and ADPA against slow float64 references written from METHODS.md §2.

Every reference starts from full-vocabulary logits, takes log_softmax over the whole
vocabulary and loops over sequences and tokens explicitly; the kdcache path only sees
gathered log-probs (as the trainer does). Values must agree to ~1e-6 and so must the
gradients w.r.t. the student logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.train.chunked import gather_logprobs
from kdcache.train.losses import (
    adpa_loss,
    advantage_error,
    dckd_loss,
    exact_advantage,
    paper_advantage,
    seqkd_loss,
    sft_loss,
    topk_kd_loss,
)

F64 = torch.float64


class Batch:
    """Random student/teacher/reference logits and the fields precompute would store."""

    def __init__(self, b: int, t: int, v: int, k: int, seed: int, min_len: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.v, self.k = v, k
        self.student = (torch.randn(b, t, v, generator=g, dtype=F64) * 2).requires_grad_(True)
        self.teacher = torch.randn(b, t, v, generator=g, dtype=F64) * 3
        self.ref = self.teacher + torch.randn(b, t, v, generator=g, dtype=F64)
        self.lengths = torch.randint(min_len, t + 1, (b,), generator=g)
        self.lengths[0] = t  # at least one unpadded row
        self.mask = torch.arange(t)[None, :] < self.lengths[:, None]
        self.tokens = torch.randint(0, v, (b, t), generator=g)
        t_lp = torch.log_softmax(self.teacher, -1)
        self.topk_logprobs, self.topk_ids = t_lp.topk(k, dim=-1)
        self.ref_topk_logprobs = torch.log_softmax(self.ref, -1).gather(-1, self.topk_ids)
        # padding carries garbage in real batches; the losses must ignore it
        pad = ~self.mask[..., None]
        self.topk_logprobs = self.topk_logprobs.masked_fill(pad, float("nan"))
        self.ref_topk_logprobs = self.ref_topk_logprobs.masked_fill(pad, float("-inf"))

    def student_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """What the trainer hands the losses: full-vocab student log-probs gathered at ids."""
        return torch.log_softmax(self.student, -1).gather(-1, ids)

    def token_lp(self) -> torch.Tensor:
        return self.student_logprobs(self.tokens[..., None])[..., 0]

    def rows(self):
        """(b, number of real tokens) for the explicit reference loops."""
        return [(i, int(n)) for i, n in enumerate(self.lengths)]


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def assert_same(out, ref, x):
    """Values to ~1e-6 and gradients w.r.t. x equal."""
    assert torch.isfinite(out), out
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_of(out, x), grad_of(ref, x), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- references (slow, float64)


def ref_sft(bt: Batch) -> torch.Tensor:
    total = 0.0
    for b, n in bt.rows():
        for t in range(n):
            total = total - torch.log_softmax(bt.student[b, t], -1)[bt.tokens[b, t]]
    return total / len(bt.rows())


def ref_kd_token(bt: Batch, b: int, t: int, mode: str, div: str) -> torch.Tensor:
    q_full = torch.softmax(bt.student[b, t], -1)
    ids = bt.topk_ids[b, t]
    p_raw = bt.topk_logprobs[b, t].exp()
    q = q_full[ids]
    if mode == "renorm":
        p = p_raw / p_raw.sum()
        if div == "forward":  # student NOT renormalised (METHODS §2)
            return (p * (p.log() - q.log())).sum()
        q = q / q.sum()
    else:  # tail bucket: the (K+1)-th entry holds the rest of the mass
        p = torch.cat([p_raw, (1 - p_raw.sum())[None]])
        q = torch.cat([q, (1 - q.sum())[None]])

    def kl(a, c):
        return (a * (a.log() - c.log())).sum()

    if div == "forward":
        return kl(p, q)
    if div == "reverse":
        return kl(q, p)
    m = (p + q) / 2
    return kl(p, m) / 2 + kl(q, m) / 2


def ref_kd_sum(bt: Batch, b: int, n: int, mode="renorm", div="forward") -> torch.Tensor:
    return sum((ref_kd_token(bt, b, t, mode, div) for t in range(n)), torch.zeros((), dtype=F64))


def ref_topk_kd(bt: Batch, mode: str, div: str) -> torch.Tensor:
    return sum(ref_kd_sum(bt, b, n, mode, div) for b, n in bt.rows()) / len(bt.rows())


def exact_kl_full(bt: Batch) -> torch.Tensor:
    total = 0.0
    for b, n in bt.rows():
        for t in range(n):
            lp, lq = torch.log_softmax(bt.teacher[b, t], -1), torch.log_softmax(bt.student[b, t], -1)
            total = total + (lp.exp() * (lp - lq)).sum()
    return total / len(bt.rows())


# ---------------------------------------------------------------- SFT / SeqKD

SHAPES = [(3, 5, 37, 4), (2, 7, 37, 1), (4, 3, 11, 11), (1, 1, 5, 2)]  # (B, T, V, K)


@pytest.mark.parametrize("b,t,v,k", SHAPES)
def test_sft(b, t, v, k):
    bt = Batch(b, t, v, k, seed=b * 100 + t)
    out = sft_loss(bt.token_lp(), bt.mask)
    assert_same(out.loss, ref_sft(bt), bt.student)
    assert set(out.metrics) == {"nll_per_token"}
    assert seqkd_loss is sft_loss


def test_sft_float_mask_and_bad_shape():
    bt = Batch(2, 4, 11, 2, seed=1)
    a = sft_loss(bt.token_lp(), bt.mask).loss
    b = sft_loss(bt.token_lp(), bt.mask.double()).loss
    assert a.item() == b.item()
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        sft_loss(bt.token_lp(), bt.mask[:, :2])


# ---------------------------------------------------------------- top-K KD


@pytest.mark.parametrize("b,t,v,k", SHAPES)
@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("div", ["forward", "reverse", "jsd"])
def test_topk_kd(b, t, v, k, mode, div):
    if mode == "tail" and k == v:
        pytest.skip("tail bucket is empty at K=|V|: covered by test_tail_at_full_vocab")
    bt = Batch(b, t, v, k, seed=b + 10 * t + k)
    out = topk_kd_loss(bt.student_logprobs(bt.topk_ids), bt.topk_logprobs, bt.mask, mode=mode, divergence=div)
    assert_same(out.loss, ref_topk_kd(bt, mode, div), bt.student)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_kd_full_vocab_is_exact_kl(seed):
    bt = Batch(3, 4, 37, 37, seed=seed)
    out = topk_kd_loss(bt.student_logprobs(bt.topk_ids), bt.topk_logprobs, bt.mask)
    assert_same(out.loss, exact_kl_full(bt), bt.student)


@pytest.mark.parametrize("div", ["forward", "reverse", "jsd"])
def test_tail_at_full_vocab(div):
    """At K=|V| the tail holds no mass: the tail mode must match renorm (and stay finite)."""
    bt = Batch(3, 4, 37, 37, seed=4)
    s = bt.student_logprobs(bt.topk_ids)
    tail = topk_kd_loss(s, bt.topk_logprobs, bt.mask, mode="tail", divergence=div).loss
    renorm = topk_kd_loss(s, bt.topk_logprobs, bt.mask, mode="renorm", divergence=div).loss
    torch.testing.assert_close(tail, renorm, rtol=1e-9, atol=1e-12)
    g1, g2 = grad_of(tail, bt.student), grad_of(renorm, bt.student)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


def test_tail_float32_near_full_mass_is_finite():
    bt = Batch(2, 3, 37, 36, seed=5)
    s = bt.student_logprobs(bt.topk_ids).float()
    out = topk_kd_loss(s, bt.topk_logprobs.float(), bt.mask, mode="tail")
    assert torch.isfinite(out.loss) and torch.isfinite(grad_of(out.loss, bt.student)).all()


def test_kd_through_gather_logprobs():
    """End to end as the trainer does it: hidden states -> chunked gather -> loss."""
    g = torch.Generator().manual_seed(0)
    b, t, v, k, h = 2, 5, 37, 6, 4
    hid = torch.randn(b * t, h, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=F64)
    bt = Batch(b, t, v, k, seed=3)
    ids = bt.topk_ids.reshape(b * t, k)
    s = gather_logprobs(hid, w, ids, chunk_size=3).reshape(b, t, k)
    out = topk_kd_loss(s, bt.topk_logprobs, bt.mask).loss
    bt.student = (hid @ w.t()).reshape(b, t, v)  # reference on the same logits, full vocab
    ref = ref_topk_kd(bt, "renorm", "forward")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad_of(out, hid), grad_of(ref, hid), rtol=1e-6, atol=1e-9)


def test_kd_bad_options():
    bt = Batch(1, 2, 11, 3, seed=0)
    s = bt.student_logprobs(bt.topk_ids)
    with pytest.raises(ValueError, match="mode"):
        topk_kd_loss(s, bt.topk_logprobs, bt.mask, mode="bucket")
    with pytest.raises(ValueError, match="divergence"):
        topk_kd_loss(s, bt.topk_logprobs, bt.mask, divergence="tv")
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        topk_kd_loss(s, bt.topk_logprobs[..., :2], bt.mask)


# ---------------------------------------------------------------- DCKD


@pytest.mark.parametrize("b,t,v,k", SHAPES[:3])
@pytest.mark.parametrize("alpha", [0.2, 2.0])
@pytest.mark.parametrize("mode", ["renorm", "tail"])
def test_dckd(b, t, v, k, alpha, mode):
    if mode == "tail" and k == v:
        pytest.skip("empty tail")
    w, l_ = Batch(b, t, v, k, seed=7 + b), Batch(b, t + 2, v, k, seed=70 + b)  # y_l longer than y_w
    out = dckd_loss(
        w.token_lp(), w.student_logprobs(w.topk_ids), w.topk_logprobs, w.mask,
        l_.student_logprobs(l_.topk_ids), l_.topk_logprobs, l_.mask, alpha=alpha, mode=mode,
    )
    ref = 0.0
    for (bw, nw), (bl, nl) in zip(w.rows(), l_.rows(), strict=True):
        sft = -sum(torch.log_softmax(w.student[bw, i], -1)[w.tokens[bw, i]] for i in range(nw))
        ref = ref + sft + alpha * (ref_kd_sum(w, bw, nw, mode) + ref_kd_sum(l_, bl, nl, mode))
    ref = ref / b
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-8)
    for x in (w.student, l_.student):
        torch.testing.assert_close(grad_of(out.loss, x), grad_of(ref, x), rtol=1e-6, atol=1e-9)


def test_dckd_needs_pairs():
    w, l_ = Batch(2, 3, 11, 2, seed=0), Batch(3, 3, 11, 2, seed=1)
    with pytest.raises(ValueError, match="pairs"):
        dckd_loss(w.token_lp(), w.student_logprobs(w.topk_ids), w.topk_logprobs, w.mask,
                  l_.student_logprobs(l_.topk_ids), l_.topk_logprobs, l_.mask)


# ---------------------------------------------------------------- ADPA


def ref_adpa(y: Batch, roll: Batch, gamma: float, reference_code: bool = False,
             full_vocab: bool = False) -> torch.Tensor:
    """Eq. 10 summed per sequence, averaged over rollouts; or the authors' released code:
    advantages and student probabilities clamped to [1e-8, 1-1e-8], mean over tokens."""
    sft = ref_sft(y)
    total, tokens = 0.0, 0
    for b, n in roll.rows():
        for t in range(n):
            tokens += 1
            pi = torch.softmax(roll.student[b, t], -1)
            adv_full = torch.log_softmax(roll.teacher[b, t], -1) - torch.log_softmax(roll.ref[b, t], -1)
            if full_vocab:  # Σ over the whole action space (Eq. 10 literally)
                total = total + (pi * adv_full).sum()
                continue
            for k in range(roll.k):
                a = roll.topk_ids[b, t, k]
                p, adv = pi[a], adv_full[a]
                if reference_code:
                    p, adv = torch.clamp(p, 1e-8, 1 - 1e-8), torch.clamp(adv, 1e-8, 1 - 1e-8)
                total = total + p * adv
    return sft - gamma * total / (tokens if reference_code else len(roll.rows()))


def adpa_inputs(y: Batch, roll: Batch):
    adv = exact_advantage(roll.topk_logprobs, roll.ref_topk_logprobs)
    return y.token_lp(), y.mask, roll.student_logprobs(roll.topk_ids), adv, roll.mask


@pytest.mark.parametrize("b,t,v,k", SHAPES)
@pytest.mark.parametrize("gamma,reference_code", [(3.0, False), (0.5, False), (3.0, True)])
def test_adpa(b, t, v, k, gamma, reference_code):
    y, roll = Batch(b, t, v, k, seed=11 * b + t), Batch(b, t + 1, v, k, seed=13 * b + t)
    out = adpa_loss(*adpa_inputs(y, roll), gamma=gamma, reference_code=reference_code)
    ref = ref_adpa(y, roll, gamma, reference_code)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-8)
    for x in (y.student, roll.student):
        torch.testing.assert_close(grad_of(out.loss, x), grad_of(ref, x), rtol=1e-6, atol=1e-9)


def test_adpa_reference_code_ignores_negative_advantages():
    """In the released code's variant a token with negative advantage is floored at 1e-8:
    its gradient is ~1e-8·π instead of a push down."""
    y, roll = Batch(2, 3, 11, 4, seed=5), Batch(2, 3, 11, 4, seed=6)
    _, _, st, adv, m = adpa_inputs(y, roll)
    st = st.detach().requires_grad_(True)
    adpa_loss(y.token_lp(), y.mask, st, adv, m, gamma=1.0, reference_code=True).loss.backward()
    neg = (adv < 0) & m[..., None]
    assert neg.any() and st.grad[neg].abs().max() < 1e-7 < st.grad[~neg & m[..., None]].abs().max()


def test_adpa_full_vocab_equals_full_sum():
    y, roll = Batch(3, 4, 37, 37, seed=1), Batch(3, 5, 37, 37, seed=2)
    out = adpa_loss(*adpa_inputs(y, roll), gamma=3.0)
    assert_same(out.loss, ref_adpa(y, roll, 3.0, full_vocab=True), roll.student)


def test_adpa_gradient_is_advantage_weighted_policy_gradient():
    """Eq. 12: d/dz of −Σ_a π(a) adv(a) = −π ⊙ (adv − Σ_a π adv) at one token, full vocab."""
    y, roll = Batch(1, 1, 11, 11, seed=3), Batch(1, 1, 11, 11, seed=4)
    out = adpa_loss(*adpa_inputs(y, roll), gamma=1.0)
    g = grad_of(out.loss, roll.student)[0, 0]
    pi = torch.softmax(roll.student[0, 0], -1).detach()
    adv = torch.log_softmax(roll.teacher[0, 0], -1) - torch.log_softmax(roll.ref[0, 0], -1)
    torch.testing.assert_close(g, -pi * (adv - (pi * adv).sum()), rtol=1e-9, atol=1e-12)


def test_paper_advantage():
    # one token; DPO top-3 = [5, 2, 9]; reference's own top-3 = [2, 7, 5]
    dpo_ids, dpo_lp = torch.tensor([[5, 2, 9]]), torch.tensor([[-0.5, -1.0, -2.0]], dtype=F64)
    ref_ids, ref_lp = torch.tensor([[2, 7, 5]]), torch.tensor([[-0.7, -1.5, -3.0]], dtype=F64)
    adv = paper_advantage(dpo_ids, dpo_lp, ref_ids, ref_lp)
    # 5 -> ref -3.0; 2 -> ref -0.7; 9 missing -> the reference's lowest top-K, -3.0
    torch.testing.assert_close(adv, torch.tensor([[-0.5 + 3.0, -1.0 + 0.7, -2.0 + 3.0]], dtype=F64))


def test_paper_vs_exact_advantage():
    roll = Batch(2, 6, 37, 5, seed=8)
    ref_lp_full = torch.log_softmax(roll.ref, -1)
    ref_own_lp, ref_own_ids = ref_lp_full.topk(5, dim=-1)
    paper = paper_advantage(roll.topk_ids, roll.topk_logprobs, ref_own_ids, ref_own_lp)
    exact = exact_advantage(roll.topk_logprobs, roll.ref_topk_logprobs)
    # slow check: ids in the reference's top-K are exact, the rest are floored by its K-th log-prob
    for b, n in roll.rows():
        for t in range(n):
            for k in range(5):
                a = int(roll.topk_ids[b, t, k])
                own = ref_own_ids[b, t].tolist()
                r = ref_own_lp[b, t, own.index(a)] if a in own else ref_own_lp[b, t, -1]
                assert math.isclose(float(paper[b, t, k]), float(roll.topk_logprobs[b, t, k] - r), abs_tol=1e-12)
    err = advantage_error(exact, paper, roll.mask)
    assert set(err) == {"mean_abs", "max_abs", "rel", "frac_diff"}
    # a missing token's true ref log-prob is below the floor, so the paper underestimates adv there
    assert float(err["max_abs"]) > 0 and 0 < float(err["frac_diff"]) < 1
    assert float(advantage_error(exact, exact, roll.mask)["max_abs"]) == 0.0
