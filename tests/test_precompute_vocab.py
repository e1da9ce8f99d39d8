"""Models of one family that differ only in padded vocabulary rows (Qwen2.5-7B: 152,064 output
rows; 0.5B-3B: 151,936; one tokenizer of 151,665 ids) are accepted when their tokenizers are
identical: the padded rows' logits are dropped before log_softmax, top-K and soft values,
and the manifest says so. Different tokenizers stay an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.precompute import PrecomputeConfig, run_precompute
from kdcache.store import open_store
from kdcache.train.tiny import build_model, build_tokenizer, save_tiny

TOK = build_tokenizer()
V = len(TOK)  # 52 token ids


def _save(path: Path, rows: int, seed: int) -> Path:
    """A tiny model with `rows` output rows (>= V: padding) and the shared tokenizer."""
    model = build_model(rows, seed=seed)
    with torch.no_grad():  # padded rows a tokenizer never emits, made large on purpose: if
        model.lm_head.weight[V:] *= 8.0  # they leaked into the normaliser, it would show
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vocab")
    _save(d / "teacher", 64, seed=1)
    _save(d / "reference", 60, seed=2)
    save_tiny(d / "student", seed=3)  # V rows
    rows = [{"id": f"e{i}", "prompt": f"sort {i} 1", "chosen": "1 2 " + "3 " * i,
             "rejected": "3 2 1 a"} for i in range(5)]
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def _cfg(work: Path, **kw) -> PrecomputeConfig:
    base = dict(teacher=str(work / "teacher"), reference=str(work / "reference"),
                student=str(work / "student"), data=str(work / "prefs.jsonl"), k=5,
                betas=[1.0, 0.5], out_root=str(work / "stores"), codec="lossless", progress=False)
    return PrecomputeConfig(**{**base, **kw})


def _logprobs64(path: Path, ids: list[int], p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log_softmax over the tokenizer's ids only, at the states s_1..s_{T+1}."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).double().eval()
    with torch.no_grad():
        z = m(input_ids=torch.tensor([ids])).logits[0, p - 1:, :V]
    return torch.log_softmax(z, -1), z


def test_padded_rows_are_dropped_and_recorded(work):
    store = open_store(run_precompute(_cfg(work)))
    assert store.meta.options["vocab"] == {"scored": V, "model_rows": {"dpo": 64, "ref": 60}}
    assert store.meta.tokenizer["vocab_size"] == V  # what a student's tokenizer must match
    for rec in store:
        ids = [*map(int, rec["prompt_ids"]), *map(int, rec["response_ids"])]
        p, t = len(rec["prompt_ids"]), len(rec["response_ids"])
        lp, z = _logprobs64(work / "teacher", ids, p)
        rlp, _ = _logprobs64(work / "reference", ids, p)
        resp = torch.tensor(rec["response_ids"]).long()
        assert rec["topk_ids"].max() < V
        want = lp[:t].topk(5, -1).values.numpy()
        np.testing.assert_allclose(rec["topk_logprobs"], want, atol=1e-5)
        np.testing.assert_allclose(rec["token_logprob"], lp[:t].gather(1, resp[:, None])[:, 0],
                                   atol=1e-5)
        sv = torch.stack([torch.logsumexp(z, -1), 0.5 * torch.logsumexp(z / 0.5, -1)], -1)
        np.testing.assert_allclose(rec["soft_value"], sv.numpy(), rtol=1e-6, atol=1e-5)
        top = torch.from_numpy(rec["topk_ids"]).long()
        np.testing.assert_allclose(rec["ref_topk_logprobs"], rlp[:t].gather(1, top), atol=1e-5)
        np.testing.assert_allclose(rec["ref_token_logprob"],
                                   rlp[:t].gather(1, resp[:, None])[:, 0], atol=1e-5)


def test_a_student_with_the_shared_tokenizer_trains_from_it(work, tmp_path):
    from kdcache.train.config import TrainConfig
    from kdcache.train.trainer import train

    url = run_precompute(_cfg(work))  # a cache hit by now
    res = train(TrainConfig(model=str(work / "student"), store=url, out=str(tmp_path / "run"),
                            objective="kd", max_steps=1, batch_groups=2, progress=False))
    assert res.steps == 1


def test_different_tokenizers_stay_an_error(work, tmp_path):
    other = build_tokenizer(words=[str(d) for d in range(10)] + list("zyxwvutsrqponmlkjihgfedcba")
                            + ["sort", ":", "=", "?", ".", ",", "!", "the", "is", "answer"])
    save_tiny(tmp_path / "other", tokenizer=other)  # same size, other ids
    with pytest.raises(ValueError, match="teacher and reference tokenizers differ"):
        run_precompute(_cfg(work, reference=str(tmp_path / "other")))
    small = build_model(V - 2, seed=4)  # fewer rows than the tokenizer has ids
    small.save_pretrained(tmp_path / "small")
    TOK.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="has 50 output rows .* tokenizer has 52 token ids"):
        run_precompute(_cfg(work, reference=str(tmp_path / "small")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_padded_student_normalises_over_the_scored_ids(work, tmp_path, dtype):
    """A student whose lm_head has padding rows (Qwen2.5-0.5B: 151,936 rows, 151,665 ids)
    is scored over the store's ids only, as the teachers were: its log-probs equal a float64
    log_softmax over [0, V), and the padded rows (made large here) change nothing."""
    from kdcache.train.batch import collate
    from kdcache.train.config import TrainConfig
    from kdcache.train.data import next_batches
    from kdcache.train.student import student_forward
    from kdcache.train.trainer import train

    student = _save(tmp_path / "student", 64, seed=5)
    store = open_store(run_precompute(_cfg(work)))
    assert store.meta.scored_vocab == V
    records = list(store)[:3]
    cfg = TrainConfig(model=str(student), store=store.url, objective="kd", batch_groups=1)
    groups = iter([[r] for r in records])
    (batch,), _ = next_batches(groups, cfg, 0, tuple(store.meta.betas), torch.device("cpu"), V)
    assert batch.vocab == V
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(student).to(dtype).eval()
    with torch.no_grad():
        got = student_forward(m, batch, chunk_size=3)
        full = student_forward(m, collate([records[0]]), chunk_size=3)  # vocab unset: 64 rows
        for s, rec in enumerate(records[:1]):
            ids = [*map(int, rec["prompt_ids"]), *map(int, rec["response_ids"])]
            p, t = len(rec["prompt_ids"]), len(rec["response_ids"])
            lp, _ = _logprobs64(student, ids, p)
            want = lp[:t].gather(1, torch.from_numpy(rec["topk_ids"]).long())
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(got.topk_logprobs[s, :t].double(), want, atol=tol, rtol=0)
            # over all 64 rows the (large) padded rows would take mass: visibly different
            assert (full.topk_logprobs[0, :t].double() - want).abs().max() > 1e-2
    res = train(TrainConfig(model=str(student), store=store.url, out=str(tmp_path / "run"),
                            objective="kd", max_steps=1, batch_groups=2, progress=False))
    assert res.steps == 1
