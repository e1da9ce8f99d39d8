"""Precompute on tiny models equals fields from the model's full float64 logits (METHODS.md §3)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from kdcache.precompute.data import Sequence
from kdcache.precompute.engine import Scorer, bucket_batches, score_sequences
from kdcache.train.tiny import build_model, build_tokenizer

TOK = build_tokenizer()
V = len(TOK)
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    dpo = build_model(V, arch=request.param, seed=1).eval()
    ref = build_model(V, arch=request.param, seed=2).eval()
    return dpo, ref


def _seqs(lengths, seed=0, context=False):
    rng = random.Random(seed)
    out = []
    for i, (p, t) in enumerate(lengths):
        prompt = [1] + [rng.randrange(6, V) for _ in range(p - 1)]
        resp = [rng.randrange(6, V) for _ in range(t - 1)] + [EOS if i % 2 == 0 else 7]
        tp = [rng.randrange(6, V) for _ in range(3)] + prompt if context else None
        out.append(Sequence(str(i // 2), "chosen" if i % 2 == 0 else "rejected", 0, prompt, resp, tp))
    return out


_DOUBLE: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}


def _float64_fields(model, seq: Sequence, k: int, betas):
    if id(model) not in _DOUBLE or _DOUBLE[id(model)][0] is not model:
        _DOUBLE[id(model)] = (model, copy.deepcopy(model).double())
    m = _DOUBLE[id(model)][1]
    ids = torch.tensor([seq.scored_prompt + seq.response_ids])
    with torch.no_grad():
        z = m(input_ids=ids).logits[0].double()
    p = len(seq.scored_prompt)
    z = z[p - 1:]  # states s_1 .. s_{T+1}
    lp = torch.log_softmax(z, -1)
    sv = torch.stack([b * torch.logsumexp(z / b, -1) for b in betas], -1)
    return lp, sv


def _check(rec, seq, dpo, ref, k, betas):
    t = len(seq.response_ids)
    lp, sv = _float64_fields(dpo, seq, k, betas)
    rlp, _ = _float64_fields(ref, seq, k, betas)
    ids = torch.from_numpy(rec["topk_ids"]).long()
    assert ids.shape == (t, k) and rec["topk_logprobs"].shape == (t, k)
    want_vals = lp[:t].topk(k, -1).values
    # top-K ids may differ only among exact ties: the float64 logprob at our ids is the sorted top-K
    np.testing.assert_allclose(lp[:t].gather(1, ids).numpy(), want_vals.numpy(), atol=ATOL)
    np.testing.assert_allclose(rec["topk_logprobs"], want_vals.numpy(), atol=ATOL)
    resp = torch.tensor(seq.response_ids)
    np.testing.assert_allclose(rec["token_logprob"], lp[:t].gather(1, resp[:, None])[:, 0], atol=ATOL)
    np.testing.assert_allclose(rec["soft_value"], sv.numpy(), atol=ATOL, rtol=1e-6)
    assert rec["soft_value"].shape == (t + 1, len(betas))
    np.testing.assert_allclose(rec["ref_topk_logprobs"], rlp[:t].gather(1, ids).numpy(), atol=ATOL)
    np.testing.assert_allclose(rec["ref_token_logprob"], rlp[:t].gather(1, resp[:, None])[:, 0],
                               atol=ATOL)
    assert rec["is_terminal"] == (seq.response_ids[-1] == EOS)
    assert rec["n_tokens"] == t and rec["role"] == seq.role
    assert list(rec["prompt_ids"]) == seq.prompt_ids and list(rec["response_ids"]) == seq.response_ids


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k,betas,chunk", [(5, [1.0], 7), (V, [0.5, 1.0, 2.0], 1000), (1, [2.0], 1)])
def test_fields_match_float64(models, k, betas, chunk, packed):
    dpo, ref = models
    # mixed lengths -> right padding inside one batch; chunk 7 does not divide N
    seqs = _seqs([(4, 6), (9, 2), (2, 11), (6, 1), (3, 5)])
    recs, sums = score_sequences(seqs, Scorer.from_model(dpo), Scorer.from_model(ref), k, betas,
                                 PAD, EOS, chunk=chunk, packed=packed)
    for rec, seq in zip(recs, seqs, strict=True):
        _check(rec, seq, dpo, ref, k, betas)
    assert sums["tokens"] == sum(len(s.response_ids) for s in seqs)


def test_batch_composition_does_not_change_results(models):
    dpo, ref = models
    seqs = _seqs([(4, 6), (9, 2), (2, 11), (6, 1)])
    d, r = Scorer.from_model(dpo), Scorer.from_model(ref)
    together, _ = score_sequences(seqs, d, r, 4, [1.0], PAD, EOS)
    for i, s in enumerate(seqs):
        alone, _ = score_sequences([s], d, r, 4, [1.0], PAD, EOS)
        for key in ("topk_logprobs", "token_logprob", "soft_value", "ref_token_logprob"):
            np.testing.assert_allclose(alone[0][key], together[i][key], atol=1e-5)


def test_teacher_prompt_with_context(models):
    dpo, ref = models
    seqs = _seqs([(4, 3), (5, 4)], context=True)
    recs, _ = score_sequences(seqs, Scorer.from_model(dpo), Scorer.from_model(ref), 3, [1.0], PAD, EOS)
    for rec, seq in zip(recs, seqs, strict=True):
        assert list(rec["teacher_prompt_ids"]) == seq.teacher_prompt_ids
        _check(rec, seq, dpo, ref, 3, [1.0])  # scored under the teacher prompt


def test_bucket_batches_keeps_groups_whole():
    seqs = _seqs([(3, 3), (3, 4), (10, 10), (10, 12), (2, 2), (2, 1)])
    groups = [seqs[0:2], seqs[2:4], seqs[4:6]]
    batches = bucket_batches(groups, batch_tokens=20)
    flat = [g for b in batches for g in b]
    assert sorted(id(g) for g in flat) == sorted(id(g) for g in groups)
    assert [max(s.length for s in g) for g in flat] == sorted(max(s.length for s in g) for g in groups)
    assert len(bucket_batches(groups, batch_tokens=10_000)) == 1
