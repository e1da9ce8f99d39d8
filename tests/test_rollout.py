"""Rollouts: behavior log-probs equal a recomputation under the same sampling processing."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from reference_checks import processed_logprobs

from kdcache.precompute.data import DataError
from kdcache.precompute.rollout import RolloutConfig, run_rollout, sample_hf
from kdcache.rewards import resolve_reward
from kdcache.store import open_store
from kdcache.train.tiny import build_model, build_tokenizer, save_tiny

TOK = build_tokenizer()
V = len(TOK)
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 10, 1.0)])
def test_behavior_logprobs_match_recomputation(arch, temperature, top_k, top_p):
    model = build_model(V, arch=arch, seed=3).eval()
    prompts = [[1, 7, 8, 9], [1, 10], [1, 11, 12, 13, 14, 15, 16]]  # left padding in the batch
    out = sample_hf(model, prompts, PAD, EOS, temperature, top_p, top_k, max_new_tokens=8, seed=0)
    n_checked = 0
    for p, (resp, lps) in zip(prompts, out, strict=True):
        assert 1 <= len(resp) <= 8 and len(lps) == len(resp)
        assert EOS not in resp[:-1]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([p + resp])).logits[0, len(p) - 1: -1]
        want = processed_logprobs(z, temperature, top_k, top_p)
        want = want.gather(1, torch.tensor(resp)[:, None])[:, 0]
        assert torch.isfinite(want).all(), "a sampled token lies outside the recomputed support"
        np.testing.assert_allclose(np.array(lps), want.numpy(), atol=1e-4)
        n_checked += len(resp)
    assert n_checked > 3


def test_sampling_is_seeded():
    model = build_model(V, seed=4).eval()
    a = sample_hf(model, [[1, 7, 8]] * 2, PAD, EOS, 1.0, 1.0, 0, 6, seed=5)
    b = sample_hf(model, [[1, 7, 8]] * 2, PAD, EOS, 1.0, 1.0, 0, 6, seed=5)
    assert a == b


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    save_tiny(d / "student", seed=5)
    rows = [
        {"id": "p0", "prompt": "sort 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1",
         "context": "the answer is 1 2 3"},
        {"id": "p1", "prompt": [{"role": "user", "content": "a b"}], "chosen": "b a",
         "rejected": "a"},
    ]
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "kd_test_reward.py").write_text(
        "def n_words(prompt, response, row):\n    return float(len(response.split()))\n")
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def test_run_rollout_store(workdir):
    cfg = RolloutConfig(model=str(workdir / "student"), data=str(workdir / "data.jsonl"), n=3,
                        max_new_tokens=5, temperature=0.9, top_p=0.95, include_chosen=True,
                        reward="kd_test_reward:n_words", use_context=True, role="teacher_rollout",
                        out_root=str(workdir / "stores"), progress=False, codec="lossless")
    url = run_rollout(cfg)
    store = open_store(url)
    assert store.complete and store.fields == ["behavior_logprob"]
    assert store.meta.options["sampling"]["temperature"] == 0.9
    groups = {g[0]["example_id"]: g for g in store.groups()}
    assert set(groups) == {"p0", "p1"}
    for eid, g in groups.items():
        assert [r["role"] for r in g] == ["chosen"] + ["teacher_rollout"] * 3
        assert [r["group"] for r in g] == [0, 0, 1, 2]
        for r in g:
            assert len(r["behavior_logprob"]) == len(r["response_ids"]) == r["n_tokens"]
            assert np.all(r["behavior_logprob"] <= 0)
            assert r["is_terminal"] == (r["response_ids"][-1] == EOS)
            assert r["reward"] == len(TOK.decode(r["response_ids"], skip_special_tokens=True).split())
        has_ctx = eid == "p0"
        assert (g[0]["teacher_prompt_ids"] is not None) == has_ctx
    # PBSD: the teacher sampled with the context, prompt_ids stay context-free
    p0 = groups["p0"][1]
    assert len(p0["teacher_prompt_ids"]) > len(p0["prompt_ids"])
    assert run_rollout(cfg) == url  # identical inputs: a no-op on the same content address
    # the progress bar renders (rows = prompts, samples, generated tokens)
    again = dataclasses.replace(cfg, out=str(workdir / "with-progress"), progress=True, n=1)
    assert open_store(run_rollout(again)).complete


def test_reward_resolution_errors():
    """One resolver for rollout, train and eval: built-in names and module:function."""
    assert resolve_reward("math:sqrt")(4.0) == 2.0
    assert resolve_reward("sort_rule")("sort : 2 1", "1 2") == 1.0
    with pytest.raises(ValueError, match="module:function"):
        resolve_reward("nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        resolve_reward("math:nope")


def test_include_chosen_needs_a_response_column(workdir):
    (workdir / "prompts.jsonl").write_text(json.dumps({"prompt": "a b"}))
    cfg = RolloutConfig(model=str(workdir / "student"), data=str(workdir / "prompts.jsonl"),
                        include_chosen=True, out_root=str(workdir / "s2"), progress=False)
    with pytest.raises(DataError, match="prompts.jsonl line 1: --include-chosen needs"):
        run_rollout(cfg)

