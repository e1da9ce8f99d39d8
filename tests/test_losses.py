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

    def __init__(self, b: int, t: int, v: int, k: int, seed: int, min_len: int = 1, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.v, self.k = v, k
        # scale > 1 sharpens both distributions, so the released code's clamps and floors bite
        self.student = (torch.randn(b, t, v, generator=g, dtype=F64) * 2 * scale).requires_grad_(True)
        self.teacher = torch.randn(b, t, v, generator=g, dtype=F64) * 3 * scale
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
    out = dckd_loss(**dckd_inputs(w, l_), alpha=alpha, mode=mode)
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
        dckd_loss(**dckd_inputs(w, l_))
    with pytest.raises(ValueError, match="pairs"):
        dckd_loss(**dckd_inputs(w, l_), released_code=True)


# ---------------------------------------------------------------- released-code DCKD


def clamp_const(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """One scalar clamped to [lo, hi]; outside the range it is a constant (no gradient)."""
    v = float(x.detach())
    return x if lo <= v <= hi else torch.tensor(min(max(v, lo), hi), dtype=F64)


def ref_buckets(p: list[torch.Tensor]) -> list[torch.Tensor]:
    """METHODS §2 released variant: the K probabilities plus the residual mass as a tail
    bucket, each clamped to [1e-8, 1 − 1e-8] (the released code's prob_stabilize)."""
    tail = 1 - sum(p)
    return [clamp_const(x, 1e-8, 1 - 1e-8) for x in [*p, tail]]


def ref_released_kl_token(bt: Batch, b: int, t: int) -> torch.Tensor:
    q_full = torch.softmax(bt.student[b, t], -1)
    ids = bt.topk_ids[b, t].tolist()
    p = ref_buckets([bt.topk_logprobs[b, t, k].exp() for k in range(bt.k)])
    q = ref_buckets([q_full[a] for a in ids])
    q = [x if float(x.detach()) >= 1e-7 else torch.tensor(1e-7, dtype=F64) for x in q]  # student floor
    return sum(pj * (pj.log() - qj.log()) for pj, qj in zip(p, q, strict=True))


def ref_dckd_code(w: Batch, l_: Batch, weights) -> torch.Tensor:
    """METHODS §2 "Released-code variant of DCKD": three token means over their own tokens."""
    w_sft, w_w, w_l = weights
    nll = [-torch.log_softmax(w.student[b, i], -1)[w.tokens[b, i]] for b, n in w.rows() for i in range(n)]
    kl_w = [ref_released_kl_token(w, b, i) for b, n in w.rows() for i in range(n)]
    kl_l = [ref_released_kl_token(l_, b, i) for b, n in l_.rows() for i in range(n)]
    return w_sft * sum(nll) / len(nll) + w_w * sum(kl_w) / len(kl_w) + w_l * sum(kl_l) / len(kl_l)


def authors_buckets(probs: torch.Tensor, ids: torch.Tensor, target: torch.Tensor,
                    target_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From-scratch float64 transcription of gaoshiping/ADPA `utils/compress_logits.py`
    `load_input_and_target_probs_fast` (from_chosen_or_rejected=None, prob_stabilize=True):
    the student's full-vocab probs [B, T, V] gathered at the stored ids plus 1 − their sum,
    the stored values plus their remaining mass, both clamped to [1e-8, 1 − 1e-8]."""
    out = torch.gather(probs, -1, ids)
    out = torch.cat([out, (1 - out.sum(-1)).unsqueeze(-1)], -1)
    tgt = torch.cat([target, target_tail.unsqueeze(-1)], -1)
    return torch.clamp(out, min=1e-8, max=1 - 1e-8), torch.clamp(tgt, min=1e-8, max=1 - 1e-8)


def authors_nll(bt: Batch) -> torch.Tensor:
    """`concatenated_forward`'s nll_loss: F.cross_entropy over the flattened chosen labels."""
    labels = bt.tokens.masked_fill(~bt.mask, -100)
    return torch.nn.functional.cross_entropy(bt.student.flatten(0, 1), labels.flatten(), ignore_index=-100)


def authors_kl(bt: Batch) -> torch.Tensor:
    """`run_distill_dpo.py` `get_kl_loss` on `load_input_and_target_probs_fast`'s buckets."""
    p = bt.topk_logprobs.masked_fill(~bt.mask[..., None], 0).exp()
    q, t = authors_buckets(torch.softmax(bt.student, -1), bt.topk_ids, p, 1 - p.sum(-1))
    q = q.clone()
    q[q < 1e-7] = 1e-7
    kl = torch.nn.functional.kl_div(input=q[bt.mask].log(), target=t[bt.mask], reduction="none")
    return kl.sum(-1).mean()


def dckd_inputs(w: Batch, l_: Batch) -> dict:
    return dict(
        chosen_token_logprobs=w.token_lp(), chosen_student_topk=w.student_logprobs(w.topk_ids),
        chosen_teacher_topk=w.topk_logprobs, chosen_mask=w.mask,
        rejected_student_topk=l_.student_logprobs(l_.topk_ids), rejected_teacher_topk=l_.topk_logprobs,
        rejected_mask=l_.mask,
    )


@pytest.mark.parametrize("b,t,v,k", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 0.1, 0.1), (0.5, 2.0, 0.0)])
def test_dckd_released_code(b, t, v, k, scale, weights):
    w, l_ = Batch(b, t, v, k, seed=17 + b, scale=scale), Batch(b, t + 2, v, k, seed=71 + b, scale=scale)
    out = dckd_loss(**dckd_inputs(w, l_), released_code=True, weights=weights)
    ref = ref_dckd_code(w, l_, weights)
    authors = weights[0] * authors_nll(w) + weights[1] * authors_kl(w) + weights[2] * authors_kl(l_)
    for want in (ref, authors):
        torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-8)
        for x in (w.student, l_.student):
            torch.testing.assert_close(grad_of(out.loss, x), grad_of(want, x), rtol=1e-6, atol=1e-9)


def test_dckd_released_code_clamps_bite():
    """A sharp case that exercises every clamp of the released variant: student buckets below
    1e-7 (floored, no gradient), above 1 − 1e-8 (clamped), teacher tails below 1e-8."""
    w, l_ = Batch(4, 5, 11, 10, seed=6, scale=4.0), Batch(4, 5, 11, 10, seed=7, scale=4.0)
    q = torch.softmax(w.student, -1).gather(-1, w.topk_ids)[w.mask]
    p = w.topk_logprobs.exp()[w.mask]
    assert (q < 1e-7).any() and (q > 1 - 1e-8).any() and (1 - p.sum(-1) < 1e-8).any()
    out = dckd_loss(**dckd_inputs(w, l_), released_code=True)
    for want in (ref_dckd_code(w, l_, (1.0, 0.1, 0.1)), authors_nll(w) + 0.1 * authors_kl(w) + 0.1 * authors_kl(l_)):
        torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-8)
        for x in (w.student, l_.student):
            torch.testing.assert_close(grad_of(out.loss, x), grad_of(want, x), rtol=1e-6, atol=1e-9)


def test_dckd_released_code_is_token_means():
    """Token means, not per-sequence sums: doubling every sequence's tokens (by repeating
    them) leaves the released variant's loss unchanged and doubles the paper form's."""
    w, l_ = Batch(2, 3, 11, 4, seed=3, min_len=3), Batch(2, 3, 11, 4, seed=4, min_len=3)
    inp = dckd_inputs(w, l_)
    twice = {k: torch.cat([x, x], dim=1) for k, x in inp.items()}
    code = [dckd_loss(**i, released_code=True).loss for i in (inp, twice)]
    paper = [dckd_loss(**i).loss for i in (inp, twice)]
    torch.testing.assert_close(code[0], code[1])
    torch.testing.assert_close(2 * paper[0], paper[1])


# ---------------------------------------------------------------- ADPA


def ref_adpa(y: Batch, roll: Batch, gamma: float, full_vocab: bool = False) -> torch.Tensor:
    """Eq. 10 summed per sequence, averaged over the sequences of each side."""
    sft = ref_sft(y)
    total = 0.0
    for b, n in roll.rows():
        for t in range(n):
            pi = torch.softmax(roll.student[b, t], -1)
            adv_full = torch.log_softmax(roll.teacher[b, t], -1) - torch.log_softmax(roll.ref[b, t], -1)
            if full_vocab:  # Σ over the whole action space (Eq. 10 literally)
                total = total + (pi * adv_full).sum()
                continue
            for k in range(roll.k):
                a = roll.topk_ids[b, t, k]
                total = total + pi[a] * adv_full[a]
    return sft - gamma * total / len(roll.rows())


def ref_adpa_code(y: Batch, roll: Batch, w: float) -> torch.Tensor:
    """METHODS §2 "Released-code variant of ADPA": token-mean SFT on y minus w times the token
    mean over rollout tokens of Σ_k c(π_θ(a_k)) c(adv_k), c = clamp to [1e-8, 1 − 1e-8], plus
    the released code's tail bucket c(1 − Σ_k π_θ(a_k)) · c(0) (see train/losses/adpa.py)."""
    nll = [-torch.log_softmax(y.student[b, i], -1)[y.tokens[b, i]] for b, n in y.rows() for i in range(n)]
    terms = []
    for b, n in roll.rows():
        for t in range(n):
            pi = torch.softmax(roll.student[b, t], -1)
            adv_full = torch.log_softmax(roll.teacher[b, t], -1) - torch.log_softmax(roll.ref[b, t], -1)
            ids = roll.topk_ids[b, t].tolist()
            q = ref_buckets([pi[a] for a in ids])  # K clamped probabilities, then the clamped tail
            adv = [clamp_const(adv_full[a], 1e-8, 1 - 1e-8) for a in ids] + [torch.tensor(1e-8, dtype=F64)]
            terms.append(sum(qj * aj for qj, aj in zip(q, adv, strict=True)))
    return sum(nll) / len(nll) - w * sum(terms) / len(terms)


def authors_adpa(y: Batch, roll: Batch, w: float) -> torch.Tensor:
    """gaoshiping/ADPA `scripts/run_distill_dpo.py` `get_batch_loss_metrics` with sft_on_chosen 1
    and adpa_weight w: nll_loss + w · `get_reverse_ce` on `load_input_and_target_probs_fast`'s
    buckets, the advantages ("rejected_margin_logp_every") stored without a remaining mass."""
    adv = exact_advantage(roll.topk_logprobs, roll.ref_topk_logprobs).masked_fill(~roll.mask[..., None], 0)
    q, t = authors_buckets(torch.softmax(roll.student, -1), roll.topk_ids, adv, torch.zeros_like(adv[..., 0]))
    reverse_ce = -(q[roll.mask] * t[roll.mask]).sum(-1).mean()
    return authors_nll(y) + w * reverse_ce


def adpa_inputs(y: Batch, roll: Batch):
    adv = exact_advantage(roll.topk_logprobs, roll.ref_topk_logprobs)
    return y.token_lp(), y.mask, roll.student_logprobs(roll.topk_ids), adv, roll.mask


@pytest.mark.parametrize("b,t,v,k", SHAPES)
@pytest.mark.parametrize("gamma", [3.0, 0.5])
def test_adpa(b, t, v, k, gamma):
    y, roll = Batch(b, t, v, k, seed=11 * b + t), Batch(b, t + 1, v, k, seed=13 * b + t)
    out = adpa_loss(*adpa_inputs(y, roll), gamma=gamma)
    ref = ref_adpa(y, roll, gamma)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-8)
    for x in (y.student, roll.student):
        torch.testing.assert_close(grad_of(out.loss, x), grad_of(ref, x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("b,t,v,k", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("w", [1.6, 3.0])
def test_adpa_released_code(b, t, v, k, scale, w):
    y, roll = Batch(b, t, v, k, seed=11 * b + t, scale=scale), Batch(b, t + 1, v, k, seed=13 * b + t, scale=scale)
    out = adpa_loss(*adpa_inputs(y, roll), gamma=w, released_code=True)
    for want in (ref_adpa_code(y, roll, w), authors_adpa(y, roll, w)):
        torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-8)
        for x in (y.student, roll.student):
            torch.testing.assert_close(grad_of(out.loss, x), grad_of(want, x), rtol=1e-6, atol=1e-9)


def test_adpa_released_code_both_terms_are_token_means():
    """Repeating every sequence's tokens leaves both released-variant terms unchanged (token
    means; the old variant summed the SFT term per sequence) and doubles Eq. 10's."""
    y, roll = Batch(2, 3, 11, 4, seed=5, min_len=3), Batch(2, 3, 11, 4, seed=6, min_len=3)
    inp = adpa_inputs(y, roll)
    twice = tuple(torch.cat([x, x], dim=1) for x in inp)
    code = [adpa_loss(*i, gamma=1.6, released_code=True) for i in (inp, twice)]
    paper = [adpa_loss(*i, gamma=3.0) for i in (inp, twice)]
    torch.testing.assert_close(code[0].loss, code[1].loss)
    torch.testing.assert_close(code[0].metrics["sft"], code[1].metrics["sft"])
    torch.testing.assert_close(2 * paper[0].loss, paper[1].loss)


def test_adpa_released_code_ignores_negative_advantages():
    """In the released code's variant a token with negative advantage is clamped to 1e-8, and
    the tail bucket's −1e-8 cancels that: it gets no push at all (Eq. 10 would push it down)."""
    y, roll = Batch(2, 3, 11, 4, seed=5), Batch(2, 3, 11, 4, seed=6)
    _, _, st, adv, m = adpa_inputs(y, roll)
    st = st.detach().requires_grad_(True)
    adpa_loss(y.token_lp(), y.mask, st, adv, m, gamma=1.0, released_code=True).loss.backward()
    neg = (adv < 0) & m[..., None]
    assert neg.any() and st.grad[neg].abs().max() < 1e-12 < st.grad[~neg & m[..., None]].abs().max()


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


def test_adpa_released_code_clamps_bite():
    """A sharp case where every clamp of the released ADPA variant acts: student probabilities
    below 1e-8 and above 1 − 1e-8, negative advantages and advantages above 1."""
    y, roll = Batch(4, 5, 11, 10, seed=7, scale=4.0), Batch(4, 5, 11, 10, seed=6, scale=4.0)
    _, _, st, adv, m = adpa_inputs(y, roll)
    q, a = st.exp()[m], adv[m]
    assert (q < 1e-8).any() and (q > 1 - 1e-8).any() and (a < 0).any() and (a > 1).any()
    out = adpa_loss(*adpa_inputs(y, roll), gamma=1.6, released_code=True)
    for want in (ref_adpa_code(y, roll, 1.6), authors_adpa(y, roll, 1.6)):
        torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-8)
        for x in (y.student, roll.student):
            torch.testing.assert_close(grad_of(out.loss, x), grad_of(want, x), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- paper advantage, both floors


def authors_margin(pa_ids: list[int], pa_vals: list[float], pb_ids: list[int], pb_vals: list[float]) -> dict:
    """From-scratch transcription of gaoshiping/ADPA `utils/merge_logits_adpa_dataset.py`
    `get_margin_logp_token` on top-K probabilities: pa the DPO teacher's, pb the reference's.
    Every id defaults to max(min(pa), 1e-7) on BOTH sides, listed values are floored at 1e-7,
    and the margin log(pa/pb) is kept for the DPO ids."""
    default = max(min(pa_vals), 1e-7)
    a = dict.fromkeys(set(pa_ids) | set(pb_ids), default)
    b = dict(a)
    a.update({i: max(v, 1e-7) for i, v in zip(pa_ids, pa_vals, strict=True)})
    b.update({i: max(v, 1e-7) for i, v in zip(pb_ids, pb_vals, strict=True)})
    return {i: math.log(a[i] / b[i]) for i in pa_ids}


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_paper_advantage_dpo_floor_is_the_released_pipeline(scale):
    roll = Batch(3, 6, 37, 8, seed=9, scale=scale)
    ref_lp_full = torch.log_softmax(roll.ref, -1)
    ref_own_lp, ref_own_ids = ref_lp_full.topk(8, dim=-1)
    dpo_lp = roll.topk_logprobs.nan_to_num(0.0)  # padding rows: any finite values
    adv = paper_advantage(roll.topk_ids, dpo_lp, ref_own_ids, ref_own_lp, floor="dpo")
    floored = 0
    for b in range(3):
        for t in range(6):
            pa_ids, pb_ids = roll.topk_ids[b, t].tolist(), ref_own_ids[b, t].tolist()
            pa, pb = dpo_lp[b, t].exp().tolist(), ref_own_lp[b, t].exp().tolist()
            want = authors_margin(pa_ids, pa, pb_ids, pb)
            floored += sum(v < 1e-7 for v in pa + pb)
            for k, a in enumerate(pa_ids):
                assert math.isclose(float(adv[b, t, k]), want[a], rel_tol=1e-12, abs_tol=1e-12)
    assert (floored > 0) == (scale > 1)  # the sharp case exercises the 1e-7 floor


@pytest.mark.parametrize("floor", ["reference", "dpo"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_paper_advantage_equals_the_precompute_approximation(floor, scale):
    """precompute stores ref_topk_logprobs such that topk_logprobs − it is the approximate
    advantage; train's paper_advantage must give the same advantage on identical inputs."""
    from kdcache.precompute.scoring import _paper_ref_approx

    g = torch.Generator().manual_seed(1)
    n, v, k = 40, 37, 8
    z_dpo = torch.randn(n, v, generator=g, dtype=F64) * 3 * scale
    z_ref = z_dpo + torch.randn(n, v, generator=g, dtype=F64) * scale
    dpo_lp, dpo_ids = torch.log_softmax(z_dpo, -1).topk(k, -1)
    ref_lp, ref_ids = torch.log_softmax(z_ref, -1).topk(k, -1)
    approx = _paper_ref_approx(z_ref, torch.logsumexp(z_ref, -1), dpo_ids, k, floor, dpo_lp)
    stored_adv = exact_advantage(dpo_lp, approx)  # what the trainer computes from the store
    want = paper_advantage(dpo_ids, dpo_lp, ref_ids, ref_lp, floor=floor)
    torch.testing.assert_close(stored_adv, want, rtol=0, atol=1e-12)
    assert (dpo_lp < math.log(1e-7)).any() == (scale > 1)


def test_paper_advantage_bad_floor():
    ids, lp = torch.tensor([[1, 2]]), torch.tensor([[-0.5, -1.0]], dtype=F64)
    with pytest.raises(ValueError, match="floor"):
        paper_advantage(ids, lp, ids, lp, floor="teacher")
