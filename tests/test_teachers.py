"""Several teachers (METHODS §4): the ensemble losses against a float64 reference written
from the spec (value and gradient), J copies of one store = the single-store loss, weights
(1, 0) = the first teacher, the union index, refusals, and the mixture's sampler."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.train.batch import scatter_rows, union_index
from kdcache.train.chunked import gather_logprobs
from kdcache.train.config import TrainConfig, store_weights
from kdcache.train.data import next_batches
from kdcache.train.objectives import OBJECTIVE_SPECS, objective_loss
from kdcache.train.student import StudentOut
from kdcache.train.teachers import MixedGroups, merge_teachers

V, H, BETAS = 23, 5, (1.0, 2.0)
ROLES = {"kd": ("chosen", "rejected"), "dckd": ("chosen", "rejected"), "tvkd": ("chosen", "rejected"),
         "adpa": ("chosen", "student_rollout")}


def _teacher(rng, T, K, B=len(BETAS)):
    ids = np.stack([rng.permutation(V)[:K] for _ in range(T)]).astype(np.int32)
    lp = -np.sort(rng.uniform(1.5, 4.0, size=(T, K)), axis=-1).astype(np.float32)  # mass < 1
    return {"topk_ids": ids, "topk_logprobs": lp,
            "ref_topk_logprobs": (lp - rng.uniform(-1, 1, size=(T, K))).astype(np.float32),
            "ref_token_logprob": -rng.uniform(0.5, 3, size=T).astype(np.float32),
            "soft_value": rng.normal(size=(T + 1, B)).astype(np.float32)}


def make_groups(objective, n_groups=3, ks=(4, 3), seed=0, copies=False):
    """Groups whose records carry J teachers (K_j ids each); `copies`: every teacher is teacher 0."""
    rng = np.random.default_rng(seed)
    groups = []
    for e in range(n_groups):
        group = []
        for role in ROLES[objective]:
            T = int(rng.integers(1, 5))
            teachers = [_teacher(rng, T, k) for k in ks]
            if copies:
                teachers = [teachers[0]] * len(ks)
            group.append({"example_id": f"e{e}", "role": role, "group": 0,
                          "prompt_ids": rng.integers(0, V, size=int(rng.integers(1, 4))).astype(np.int32),
                          "response_ids": rng.integers(0, V, size=T).astype(np.int32), "is_terminal": True,
                          "reward": None, **teachers[0], "teachers": teachers})
        groups.append(group)
    return groups


def single(groups, j=0):
    """The same groups with only teacher j's fields (a single-store run)."""
    return [[{**{k: v for k, v in r.items() if k != "teachers"}, **r["teachers"][j]} for r in g] for g in groups]


def cfg_for(objective, **kw):
    return TrainConfig(model="m", store=["a"], objective=objective, batch_groups=3, chunk_size=3,
                       tvkd_alpha=0.7, tvkd_gamma=kw.pop("tvkd_gamma", 1.0), tvkd_beta=2.0, **kw)


def run(objective, groups, weights=(), cfg=None, seed=1):
    """The trainer's path on float64 student parameters: batch, chunked gather at the
    (union) index, the objective's loss. Returns loss, grads, the batch and parameters."""
    cfg = cfg or cfg_for(objective)
    batch = next_batches(iter(groups), cfg, 0, BETAS, torch.device("cpu"), vocab=None,
                         teacher_weights=weights, teacher_betas=[BETAS] * len(weights))[0][0]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch.input_ids.numel(), H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    out = gather_logprobs(hidden.index_select(0, batch.rows), weight, batch.index, chunk_size=cfg.chunk_size)
    out = scatter_rows(out, batch.mask, batch.mask_pos)
    student = StudentOut(out[..., 0], out[..., 1:] if out.shape[-1] > 1 else None)
    loss, _ = objective_loss(objective, batch)(student, batch, cfg, 0)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), (gh, gw), batch, (hidden, weight)


# ---------------------------------------------------------------- the float64 reference
def reference(objective, groups, weights, batch, params, cfg):
    """METHODS §4 by hand: full-vocabulary student log-probs, the teachers' values read
    from the records, per-token loops."""
    hidden, weight = params
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)  # [rows, V] float64
    blocks = OBJECTIVE_SPECS[objective].blocks  # the batch's layout: block by block, groups in order
    records = [r for roles in blocks for g in groups for r in g if r["role"] in roles]
    rows, n = [], 0
    for r in records:  # record -> its response tokens' rows in the flat hidden states
        T = len(r["response_ids"])
        rows.append(batch.rows[n:n + T].tolist())
        n += T

    def kl(r, rr, j, mode):
        """Σ_t KL_t(j) on one record."""
        tch, total = r["teachers"][j], 0.0
        for t, row in enumerate(rr):
            ids = torch.as_tensor(tch["topk_ids"][t], dtype=torch.long)
            tl = torch.as_tensor(tch["topk_logprobs"][t], dtype=torch.float64)
            s = logp[row, ids]
            if mode == "renorm":
                p = torch.softmax(tl, 0)
                total = total + (p * (p.log() - s)).sum()
            else:
                p, q = tl.exp(), s.exp()
                pt, qt = 1 - p.sum(), 1 - q.sum()
                total = total + (p * (p.log() - q.log())).sum() + pt * (pt.log() - qt.log())
        return total

    def nll(r, rr):
        return -sum(logp[row, int(y)] for row, y in zip(rr, r["response_ids"], strict=True))

    J = len(weights)
    if objective == "kd":
        return sum(sum(w * kl(r, rr, j, cfg.kd_mode) for j, w in enumerate(weights))
                   for r, rr in zip(records, rows, strict=True)) / len(records)
    half = len(records) // 2
    firsts, seconds = list(zip(records[:half], rows[:half], strict=True)), list(zip(records[half:], rows[half:], strict=True))
    if objective == "dckd":
        alpha = cfg.dckd_alpha if cfg.dckd_alpha is not None else 0.2
        return sum(nll(w_, wr) + alpha * sum(w * (kl(w_, wr, j, cfg.kd_mode) + kl(l_, lr, j, cfg.kd_mode))
                                             for j, w in enumerate(weights))
                   for (w_, wr), (l_, lr) in zip(firsts, seconds, strict=True)) / half
    if objective == "adpa":
        gamma = cfg.adpa_gamma if cfg.adpa_gamma is not None else 3.0
        sft = sum(nll(r, rr) for r, rr in firsts) / len(firsts)
        adv = 0.0
        for r, rr in seconds:
            for j, w in enumerate(weights):
                tch = r["teachers"][j]
                for t, row in enumerate(rr):
                    ids = torch.as_tensor(tch["topk_ids"][t], dtype=torch.long)
                    a = torch.as_tensor(tch["topk_logprobs"][t] - tch["ref_topk_logprobs"][t], dtype=torch.float64)
                    adv = adv + w * (logp[row, ids].exp() * a).sum()
        return sft - gamma * adv / len(seconds)
    if objective == "tvkd":
        col = BETAS.index(cfg.tvkd_beta)

        def reward(r, rr):
            total = 0.0
            for t, row in enumerate(rr):
                psi = sum(w * (cfg.tvkd_gamma * float(r["teachers"][j]["soft_value"][t + 1, col])
                               - float(r["teachers"][j]["soft_value"][t, col])) for j, w in enumerate(weights))
                total = total + cfg.tvkd_beta_s * logp[row, int(r["response_ids"][t])] - cfg.tvkd_alpha * psi
            return total
        margins = [reward(w_, wr) - reward(l_, lr) for (w_, wr), (l_, lr) in zip(firsts, seconds, strict=True)]
        return sum(-F.logsigmoid(m) for m in margins) / half
    raise AssertionError(J)


CASES = [("kd", {}), ("kd", {"kd_mode": "tail"}), ("dckd", {}), ("dckd", {"kd_mode": "tail", "dckd_alpha": 0.5}),
         ("adpa", {}), ("tvkd", {}), ("tvkd", {"tvkd_gamma": 0.7})]


@pytest.mark.parametrize("objective,kw", CASES)
@pytest.mark.parametrize("ks,weights", [((4, 3), (0.7, 0.3)), ((3, 3, 2), (0.2, 0.5, 0.3))])
def test_ensemble_equals_float64_reference(objective, kw, ks, weights):
    groups = make_groups(objective, ks=ks, seed=len(ks))
    cfg = cfg_for(objective, **kw)
    loss, grads, batch, params = run(objective, groups, weights, cfg)
    ref = reference(objective, groups, weights, batch, params, cfg)
    ref_grads = torch.autograd.grad(ref, params)
    assert torch.allclose(loss, ref.detach(), rtol=1e-9, atol=1e-9), (float(loss), float(ref.detach()))
    for g, rg in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, rg, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("objective,kw", CASES)
@pytest.mark.parametrize("J", [2, 3])
def test_copies_of_one_store_equal_the_single_store(objective, kw, J):
    groups = make_groups(objective, ks=(4,) * J, copies=True)
    cfg = cfg_for(objective, **kw)
    loss, grads, _, _ = run(objective, groups, (1.0 / J,) * J, cfg)
    one, one_grads, batch, _ = run(objective, single(groups), (), cfg)
    assert not batch.teachers  # the single store took the old path
    assert torch.allclose(loss, one, rtol=1e-12, atol=1e-12)
    for g, og in zip(grads, one_grads, strict=True):
        assert torch.allclose(g, og, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective,kw", CASES)
def test_weights_one_zero_equal_the_first_teacher(objective, kw):
    groups = make_groups(objective, ks=(4, 3))
    cfg = cfg_for(objective, **kw)
    loss, grads, _, _ = run(objective, groups, (1.0, 0.0), cfg)
    first, first_grads, _, _ = run(objective, single(groups, 0), (), cfg)
    second, _, _, _ = run(objective, single(groups, 1), (), cfg)
    assert not torch.allclose(first, second)  # the teachers differ: the check means something
    assert torch.allclose(loss, first, rtol=1e-12, atol=1e-12)
    for g, fg in zip(grads, first_grads, strict=True):
        assert torch.allclose(g, fg, rtol=1e-10, atol=1e-12)


def test_union_index_holds_every_teachers_ids_once():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 9, (50, k), generator=g) for k in (4, 6, 1)]
    union, pos = union_index(ids)
    assert union.shape[1] <= 11
    for n in range(50):
        distinct = sorted({int(x) for t in ids for x in t[n]})
        assert union[n, :len(distinct)].tolist() == distinct
        assert set(union[n].tolist()) == set(distinct)  # padding repeats an id of the row
    for t, p in zip(ids, pos, strict=True):
        assert torch.equal(union.gather(1, p), t)
    empty, pos0 = union_index([torch.zeros(0, 3, dtype=torch.long)] * 2)
    assert empty.shape[0] == 0 and pos0[0].shape == (0, 3)


def test_union_is_gathered_once_not_per_teacher():
    """The index the chunked gather reads is the target plus the union (<= Σ K_j, here the
    same ids twice: exactly K), not J x K columns."""
    groups = make_groups("kd", ks=(4, 4), copies=True)
    _, _, batch, _ = run("kd", groups, (0.5, 0.5))
    assert batch.index.shape[1] == 1 + 4
    assert len(batch.teacher_pos) == 2 and batch.teacher_pos[0].shape == (*batch.mask.shape, 4)


def test_ensemble_stores_with_other_sequences_are_refused_naming_the_first_mismatch():
    groups = make_groups("kd", n_groups=1)
    a = single(groups, 0)[0]
    b = [dict(r) for r in single(groups, 1)[0]]
    assert merge_teachers([a, b], ["A", "B"])[0]["teachers"][1]["topk_ids"] is b[0]["topk_ids"]
    b[1]["response_ids"] = b[1]["response_ids"].copy()
    b[1]["response_ids"][0] = (b[1]["response_ids"][0] + 1) % V
    with pytest.raises(ValueError, match=r"store 'B' .* example_id 'e0', role 'rejected', response_ids\[0\]"):
        merge_teachers([a, b], ["A", "B"])
    b[1] = {**b[1], "role": "sft"}
    with pytest.raises(ValueError, match=r"example_id 'e0', role 'rejected', role 'sft' vs 'rejected'"):
        merge_teachers([a, b], ["A", "B"])


@pytest.mark.parametrize("objective", ["dpo", "pbsd", "sft", "tgpo"])
def test_ensembles_without_a_teacher_term_are_refused(objective):
    cfg = TrainConfig(model="m", store=["a", "b"], objective=objective, ensemble=True)
    with pytest.raises(ValueError, match=f"--ensemble with objective '{objective}'") as e:
        cfg.validated()
    assert "\n" not in str(e.value)
    if objective in ("dpo", "pbsd"):
        assert "one reference per pair" in str(e.value)


@pytest.mark.parametrize("kw,msg", [({"store": ["a"], "ensemble": True}, "at least two --store"),
                                    ({"store": ["a", "b"], "store_weights": [1.0]}, "1 weights for 2 --store"),
                                    ({"store": ["a", "b"], "store_weights": [1.0, -1.0]}, "must be >= 0"),
                                    ({"store": ["a", "b"], "store_weights": [0.0, 0.0]}, "positive sum")])
def test_bad_store_options_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(model="m", objective="kd", **kw).validated()


def test_weights_are_normalised_with_the_documented_defaults():
    cfg = TrainConfig(model="m", store=["a", "b"], objective="kd")
    assert store_weights(cfg, [30, 10]) == (0.75, 0.25)  # mixing: by groups
    assert store_weights(dataclasses.replace(cfg, ensemble=True), [30, 10]) == (0.5, 0.5)
    assert store_weights(dataclasses.replace(cfg, store_weights=[7, 3]), [30, 10]) == (0.7, 0.3)
    assert TrainConfig(store="x").store == ["x"]  # one store as a string, as before


class _Reader:
    """A stand-in StreamReader: numbered groups, with a position."""

    def __init__(self, name, n):
        self.name, self.n, self.epoch, self.consumed, self.seed = name, n, 0, 0, 0

    def __iter__(self):
        while self.consumed < self.n:
            self.consumed += 1
            yield [{"store": self.name, "i": self.consumed - 1, "epoch": self.epoch}]

    def set_epoch(self, e):
        self.epoch, self.consumed = e, 0

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, s):
        self.epoch, self.consumed = s["epoch"], s["consumed"]


def _draw(seed, weights, n, state=None):
    mix = MixedGroups([_Reader("a", 5), _Reader("b", 3), _Reader("c", 4)], weights, seed)
    if state is not None:
        mix.load_state_dict(state)
    return [next(mix)[0] for _ in range(n)], mix.state_dict()


def test_mixing_is_deterministic_follows_the_weights_and_resumes_anywhere():
    w = (0.5, 0.3, 0.2)
    got, _ = _draw(0, w, 3000)
    assert got == _draw(0, w, 3000)[0]
    assert got != _draw(1, w, 3000)[0]
    share = [sum(g["store"] == s for g in got) / len(got) for s in "abc"]
    assert np.allclose(share, w, atol=0.03), share
    assert {g["epoch"] for g in got if g["store"] == "b"} >= {0, 1, 2}  # each store runs its own epochs
    for stop in (1, 7, 13, 200):
        head, state = _draw(0, w, stop)
        tail, _ = _draw(0, w, 60, state)
        assert head + tail == got[:stop + 60]
    assert all(g["store"] != "b" for g in _draw(0, (0.5, 0.0, 0.5), 500)[0])  # weight 0: never drawn
