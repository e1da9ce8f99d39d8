"""TVKD, DPO, PBSD and TGPO against slow float64 references written from METHODS.md §2.

As in test_losses.py: references start from full-vocabulary logits, take log_softmax over
the whole vocabulary and loop over sequences/tokens; kdcache only sees gathered log-probs.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kdcache.train.losses import (
    dpo_loss,
    group_advantages,
    guidance_weight,
    pbsd_loss,
    tgpo_loss,
    tvkd_loss,
    tvkd_shaping,
)

F64 = torch.float64


class Seqs:
    """B right-padded responses with student/teacher/reference logits and stored fields."""

    def __init__(self, b: int, t: int, v: int, seed: int, beta: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.student = (torch.randn(b, t, v, generator=g, dtype=F64) * 2).requires_grad_(True)
        self.teacher = torch.randn(b, t + 1, v, generator=g, dtype=F64) * 3  # states s_1..s_{T+1}
        self.ref = torch.randn(b, t, v, generator=g, dtype=F64) * 2
        self.lengths = torch.randint(1, t + 1, (b,), generator=g)
        self.lengths[0] = t
        self.mask = torch.arange(t)[None, :] < self.lengths[:, None]
        self.tokens = torch.randint(0, v, (b, t), generator=g)
        self.beta = beta
        # stored fields; padding holds garbage the losses must ignore
        sv = beta * torch.logsumexp(self.teacher / beta, -1)  # [b, t+1]
        state_mask = torch.arange(t + 1)[None, :] <= self.lengths[:, None]
        self.soft_value = sv.masked_fill(~state_mask, float("nan"))
        ref_lp = torch.log_softmax(self.ref, -1).gather(-1, self.tokens[..., None])[..., 0]
        self.ref_token_logprob = ref_lp.masked_fill(~self.mask, float("nan"))

    def token_lp(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.tokens if ids is None else ids
        return torch.log_softmax(self.student, -1).gather(-1, ids[..., None])[..., 0]

    def rows(self):
        return [(i, int(n)) for i, n in enumerate(self.lengths)]

    # slow per-token pieces for the references
    def lp(self, b: int, t: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.tokens if ids is None else ids
        return torch.log_softmax(self.student[b, t], -1)[ids[b, t]]

    def ref_lp(self, b: int, t: int) -> torch.Tensor:
        return torch.log_softmax(self.ref[b, t], -1)[self.tokens[b, t]]

    def value(self, b: int, t: int) -> torch.Tensor:
        """V(s_{t+1}) (0-based t) straight from the teacher logits."""
        return self.beta * torch.logsumexp(self.teacher[b, t] / self.beta, -1)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def check(out: torch.Tensor, ref: torch.Tensor, *xs: torch.Tensor) -> None:
    assert torch.isfinite(out), out
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-6, atol=1e-8)
    for x in xs:
        torch.testing.assert_close(grad_of(out, x), grad_of(ref, x), rtol=1e-6, atol=1e-9)


def neg_log_sigmoid(m: torch.Tensor) -> torch.Tensor:
    return -torch.log(1 / (1 + torch.exp(-m)))


SHAPES = [(3, 5, 37), (2, 7, 11), (1, 1, 5), (4, 3, 37)]  # (pairs, T, V)


# ---------------------------------------------------------------- TVKD


def ref_tvkd_sum(s: Seqs, b: int, n: int, alpha: float, beta_s: float, maxent: bool,
                 gamma: float = 1.0) -> torch.Tensor:
    """METHODS §2 TVKD, revision 2: ψ_t = γ V(s_{t+1}) − V(s_t) with the teacher's V read at
    every state, s_{T+1} included, whether or not the response ended with EOS."""
    total = torch.zeros((), dtype=F64)
    for t in range(n):
        psi = gamma * s.value(b, t + 1) - s.value(b, t)
        pol = s.lp(b, t) - (s.ref_lp(b, t) if maxent else 0.0)
        total = total + beta_s * pol - alpha * psi
    return total


def tvkd(w: Seqs, l_: Seqs, **kw):
    return tvkd_loss(w.token_lp(), w.soft_value, w.mask, l_.token_lp(), l_.soft_value, l_.mask, **kw)


@pytest.mark.parametrize("p,t,v", SHAPES)
@pytest.mark.parametrize("alpha,beta_s,gamma", [(0.7, 1.0, 1.0), (0.1, 2.5, 1.0), (0.7, 1.0, 0.7)])
@pytest.mark.parametrize("maxent", [False, True])
def test_tvkd(p, t, v, alpha, beta_s, gamma, maxent):
    w, l_ = Seqs(p, t, v, seed=p + t), Seqs(p, t + 2, v, seed=100 + p + t)
    out = tvkd(w, l_, alpha=alpha, beta_s=beta_s, gamma=gamma,
               chosen_ref_logprobs=w.ref_token_logprob if maxent else None,
               rejected_ref_logprobs=l_.ref_token_logprob if maxent else None)
    ref = 0.0
    for (bw, nw), (bl, nl) in zip(w.rows(), l_.rows(), strict=True):
        m = (ref_tvkd_sum(w, bw, nw, alpha, beta_s, maxent, gamma)
             - ref_tvkd_sum(l_, bl, nl, alpha, beta_s, maxent, gamma))
        ref = ref + neg_log_sigmoid(m)
    check(out.loss, ref / p, w.student, l_.student)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_tvkd_shaping_closed_form_exactly(seed, gamma):
    """Σ_t ψ_t = γ V(s_{T+1}) − V(s_1) − (1 − γ) Σ_{t=2..T} V(s_t) (at γ = 1 the telescoped
    V(s_{T+1}) − V(s_1)), bit for bit: values on a dyadic grid make every product, difference
    and partial sum exact in float64, so any off-by-one or mask slip shows."""
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 9
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    sv = torch.randint(-4096, 4096, (b, t + 1), generator=g).to(F64) / 64
    sv = sv.masked_fill(torch.arange(t + 1)[None, :] > lengths[:, None], float("nan"))
    psi = tvkd_shaping(sv, mask, gamma)
    assert torch.isfinite(psi).all() and (psi[~mask] == 0).all()
    for i in range(b):
        n = int(lengths[i])
        middle = sum(float(sv[i, j]) for j in range(1, n))
        assert float(psi[i].sum()) == gamma * float(sv[i, n]) - float(sv[i, 0]) - (1 - gamma) * middle


@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_tvkd_per_token_equals_closed_form(gamma):
    """The loss equals −log σ(M) with M written in closed form from the stored values: at
    γ = 1, Σ β_s log π(y_w) − Σ β_s log π(y_l) − α[(V_w(s_{T+1}) − V_w(s_1)) − (V_l(s_{T+1}) − V_l(s_1))]."""
    w, l_ = Seqs(3, 4, 11, seed=1), Seqs(3, 6, 11, seed=2)
    lw, ll = w.token_lp(), l_.token_lp()
    out = tvkd(w, l_, alpha=0.7, beta_s=2.0, gamma=gamma)

    def shaping_sum(s: Seqs) -> torch.Tensor:
        v = s.soft_value.nan_to_num(0.0)
        end = v.gather(1, s.lengths[:, None])[:, 0]
        middle = (v[:, 1:-1] * s.mask[:, 1:]).sum(-1)  # V(s_2) .. V(s_T) of each row
        return gamma * end - v[:, 0] - (1 - gamma) * middle

    margin = 2.0 * ((lw * w.mask).sum(-1) - (ll * l_.mask).sum(-1)) - 0.7 * (shaping_sum(w) - shaping_sum(l_))
    torch.testing.assert_close(out.metrics["margin"], margin.mean().detach(), rtol=1e-12, atol=1e-12)
    check(out.loss, -torch.nn.functional.logsigmoid(margin).mean(), w.student, l_.student)


def test_tvkd_shaping_acts_on_terminal_pairs():
    """Every response ends with EOS, both sides share V(s_1): α ≠ 0 must change the loss and
    its gradient (revision 1 zeroed V(s_{T+1}) there, which made α a no-op)."""
    w, l_ = Seqs(4, 5, 11, seed=3), Seqs(4, 7, 11, seed=4)  # read as EOS-ended: the loss no longer asks
    l_.soft_value[:, 0] = w.soft_value[:, 0]  # same prompt, same V(s_1)
    on, off = tvkd(w, l_, alpha=0.7), tvkd(w, l_, alpha=0.0)
    assert abs(on.loss.item() - off.loss.item()) > 1e-3
    for x in (w.student, l_.student):
        assert (grad_of(on.loss, x) - grad_of(off.loss, x)).abs().max() > 1e-4
    # the whole effect is −α[V(s^w_{T+1}) − V(s^l_{T+1})] on the margin
    end = [s.soft_value.gather(1, s.lengths[:, None])[:, 0] for s in (w, l_)]
    torch.testing.assert_close(on.metrics["margin"] - off.metrics["margin"],
                               -0.7 * (end[0] - end[1]).mean(), rtol=1e-12, atol=1e-12)


def test_tvkd_bad_inputs():
    w = Seqs(2, 4, 11, seed=0)
    with pytest.raises(ValueError, match="soft_value"):
        tvkd_shaping(w.soft_value[:, :-1], w.mask)
    holes = w.mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="prefix"):
        tvkd_shaping(w.soft_value, holes)
    with pytest.raises(ValueError, match="both"):
        tvkd(w, w, chosen_ref_logprobs=w.ref_token_logprob)


# ---------------------------------------------------------------- DPO / PBSD


@pytest.mark.parametrize("p,t,v", SHAPES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo(p, t, v, beta):
    w, l_ = Seqs(p, t, v, seed=7 * p + t), Seqs(p, t + 1, v, seed=70 * p + t)
    out = dpo_loss(w.token_lp(), w.ref_token_logprob, w.mask, l_.token_lp(), l_.ref_token_logprob, l_.mask, beta=beta)
    ref = 0.0
    for (bw, nw), (bl, nl) in zip(w.rows(), l_.rows(), strict=True):
        lw = sum(w.lp(bw, i) - w.ref_lp(bw, i) for i in range(nw))
        ll = sum(l_.lp(bl, i) - l_.ref_lp(bl, i) for i in range(nl))
        ref = ref + neg_log_sigmoid(beta * (lw - ll))
    check(out.loss, ref / p, w.student, l_.student)
    assert set(out.metrics) == {"margin", "accuracy"}


@pytest.mark.parametrize("p,t,v", SHAPES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_pbsd(p, t, v, beta):
    # y+ from the teacher (WITH context c), y- from the student; the student scores both
    # WITHOUT c; the teacher-side token log-probs come from the store (here: `ref` logits
    # play the teacher-with-context).
    pos, neg = Seqs(p, t, v, seed=3 * p + t), Seqs(p, t + 3, v, seed=30 * p + t)
    out = pbsd_loss(pos.token_lp(), pos.ref_token_logprob, pos.mask, neg.token_lp(), neg.ref_token_logprob, neg.mask, beta=beta)
    ref = 0.0
    for (bp, n_p), (bn, n_n) in zip(pos.rows(), neg.rows(), strict=True):
        m = sum(pos.lp(bp, i) - pos.ref_lp(bp, i) for i in range(n_p)) - sum(
            neg.lp(bn, i) - neg.ref_lp(bn, i) for i in range(n_n)
        )
        ref = ref + neg_log_sigmoid(beta * m)
    check(out.loss, ref / p, pos.student, neg.student)


def test_pairs_required():
    a, b = Seqs(2, 3, 11, seed=0), Seqs(3, 3, 11, seed=1)
    with pytest.raises(ValueError, match="pairs"):
        dpo_loss(a.token_lp(), a.ref_token_logprob, a.mask, b.token_lp(), b.ref_token_logprob, b.mask)
    with pytest.raises(ValueError, match="pairs"):
        pbsd_loss(a.token_lp(), a.ref_token_logprob, a.mask, b.token_lp(), b.ref_token_logprob, b.mask)


# ---------------------------------------------------------------- TGPO


def test_guidance_weight_schedule():
    assert guidance_weight(0) == 2e-3
    assert math.isclose(guidance_weight(100), 1e-3)
    assert guidance_weight(199) > 0
    assert guidance_weight(200) == 0.0 and guidance_weight(10_000) == 0.0
    assert guidance_weight(5, w_init=1.0, delta=0.0) == 1.0


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 2.0], dtype=F64)
    gid = torch.tensor([7, 7, 7, 7, 2, 2, 9])
    a = group_advantages(r, gid, eps=0.0 + 1e-12)
    for g in (7, 2):
        idx = [i for i in range(7) if int(gid[i]) == g]
        vals = [float(r[i]) for i in idx]
        mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
        for i in idx:
            assert math.isclose(float(a[i]), (float(r[i]) - mu) / (sd + 1e-12), rel_tol=1e-9)
    assert float(a[6]) == 0.0  # a group of one rollout has no relative signal


def ref_tgpo(s: Seqs, behavior, guide_ids, rewards, gid, step, clip, shaping, lam, eps=1e-6):
    groups: dict[int, list[int]] = {}
    for i in range(len(rewards)):
        groups.setdefault(int(gid[i]), []).append(i)
    j_grpo, guide_terms = 0.0, []
    for members in groups.values():
        rs = [float(rewards[i]) for i in members]
        mu, sd = statistics.fmean(rs), statistics.pstdev(rs)
        num, z = 0.0, 0
        for i in members:
            a_i = (float(rewards[i]) - mu) / (sd + eps)
            n = int(s.lengths[i])
            for t in range(n):
                lp = s.lp(i, t)
                ratio = torch.exp(lp - behavior[i, t])
                a = a_i + lam * float(s.lp(i, t, guide_ids).detach()) if shaping else a_i
                num = num + torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
            z += n
        j_grpo = j_grpo + num / z
    loss = -j_grpo / len(groups)
    for i, n in s.rows():
        guide_terms.append(-sum(s.lp(i, t, guide_ids) for t in range(n)) / n)
    w = 0.0 if shaping else max(2e-3 - 1e-5 * step, 0.0)
    return loss + w * sum(guide_terms) / len(guide_terms)


@pytest.mark.parametrize("n,t,v,groups", [(6, 5, 37, 2), (4, 3, 11, 1), (5, 4, 37, 3)])
@pytest.mark.parametrize("shaping", [False, True])
@pytest.mark.parametrize("step", [0, 150, 400])
def test_tgpo(n, t, v, groups, shaping, step):
    s = Seqs(n, t, v, seed=n * 10 + t + groups)
    g = torch.Generator().manual_seed(n)
    gid = torch.arange(n) % groups
    rewards = torch.randint(0, 2, (n,), generator=g).to(F64) + 0.1 * torch.arange(n)
    # the behaviour policy is a perturbed student, so ratios straddle the clip range
    behavior = torch.log_softmax(s.student.detach() + 0.3 * torch.randn(s.student.shape, generator=g, dtype=F64), -1)
    behavior = behavior.gather(-1, s.tokens[..., None])[..., 0].masked_fill(~s.mask, float("inf"))
    guide_ids = s.teacher[:, :t].argmax(-1)  # the teacher's greedy token, topk_ids[..., 0]
    out = tgpo_loss(s.token_lp(), behavior, s.token_lp(guide_ids), rewards, gid, s.mask, step=step,
                    clip=0.2, shaping=shaping, lam=0.1)
    ref = ref_tgpo(s, behavior, guide_ids, rewards, gid, step, 0.2, shaping, 0.1)
    check(out.loss, ref, s.student)
    assert 0 < float(out.metrics["clip_frac"]) < 1
    assert float(out.metrics["w"]) == (0.0 if shaping else guidance_weight(step))
