"""`kdcache eval` against direct computations from the model's full logits, the demo
task's rule, and `kdcache plot`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.store import StoreMeta, StoreWriter
from kdcache.train.eval import EvalConfig, evaluate
from kdcache.train.plot import plot_runs
from kdcache.train.rewards import numeric_exact_match, resolve_reward
from kdcache.train.tasks import make_demo_data, sort_rule
from kdcache.train.tiny import build_tokenizer, save_tiny

K = 3


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = build_tokenizer()
    model_dir = save_tiny(root / "m", tok, hidden=32, layers=1, heads=2, seed=3)
    rng = np.random.default_rng(0)
    meta = StoreMeta(k=K, betas=[1.0], fields=["topk_ids", "topk_logprobs"], options={"codec": "lossless"})
    url = str(root / "store")
    prompt = tok("sort : 3 1 2", add_special_tokens=False).input_ids
    with StoreWriter(url, meta) as w:
        for e in range(12):
            group = []
            for role in ("chosen", "rejected"):
                T = int(rng.integers(2, 5))
                resp = rng.integers(6, len(tok), size=T).astype(np.int32)
                lp = np.log(rng.dirichlet(np.ones(len(tok)), size=T))
                ids = np.argsort(-lp, -1)[:, :K].astype(np.int32)
                group.append({"example_id": f"e{e}", "role": role, "group": 0,
                              "prompt_ids": np.array(prompt, np.int32), "response_ids": resp,
                              "is_terminal": False, "topk_ids": ids,
                              "topk_logprobs": np.take_along_axis(lp, ids, -1).astype(np.float32)})
            w.add_group(group)
    return model_dir, url


def test_reward_accuracy_and_kl_match_direct_computation(model_and_store):
    from kdcache.store import open_store

    model_dir, url = model_and_store
    res = evaluate(EvalConfig(model=str(model_dir), store=url))
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    wins, kl, n = 0, 0.0, 0
    for group in open_store(url).groups():
        avg = []
        for r in group:
            P = len(r["prompt_ids"])
            ids = torch.tensor(np.concatenate([r["prompt_ids"], r["response_ids"]]), dtype=torch.long)[None]
            lp = model(ids).logits[0].log_softmax(-1)[P - 1 : -1]
            y = torch.tensor(np.array(r["response_ids"]), dtype=torch.long)
            avg.append(lp.gather(-1, y[:, None]).mean().item())
            p = torch.tensor(np.array(r["topk_logprobs"]), dtype=torch.float64).softmax(-1)
            s = lp.gather(-1, torch.tensor(np.array(r["topk_ids"]), dtype=torch.long))
            kl += (p * (p.log() - s)).sum().item()
            n += len(y)
        wins += avg[0] > avg[1]
    assert res["pairs"] == 12
    assert res["reward_accuracy"] == pytest.approx(wins / 12)
    assert res["kl_topk"] == pytest.approx(kl / n, rel=1e-4)


def test_rule_reward_on_samples(model_and_store):
    model_dir, url = model_and_store
    res = evaluate(EvalConfig(model=str(model_dir), store=url, reward="sort_rule", samples=2, max_new_tokens=4))
    assert res["samples"] == 24 and 0.0 <= res["reward_mean"] <= 1.0 and 0.0 <= res["eos_rate"] <= 1.0


def test_sort_rule_and_rewards():
    assert sort_rule("sort : 3 1 2", "1 2 3") == 1.0
    assert sort_rule("sort : 3 1 2", "1 3 2") == 0.0
    assert sort_rule("sort : 3 1 2", "1 2") == 0.0
    assert sort_rule("answer : 1 2 3 sort : 3 1 2", "1 2 3") == 1.0  # a context hint is not the task
    assert numeric_exact_match("q", "so it is 42", {"answer": "#### 42"}) == 1.0
    assert numeric_exact_match("q", "41", {"answer": "42"}) == 0.0
    assert resolve_reward("kdcache.train.tasks:sort_rule") is sort_rule
    with pytest.raises(ValueError, match="module:function"):
        resolve_reward("nonsense")


def test_demo_data_poses_a_preference(tmp_path):
    paths = make_demo_data(tmp_path, n_sft=200, n_pref=300, n_rollout_prompts=10, n_eval=10)
    rows = [json.loads(line) for line in paths["pref"].read_text().splitlines()]
    chosen = np.mean([sort_rule(r["prompt"], r["chosen"]) for r in rows])
    rejected = np.mean([sort_rule(r["prompt"], r["rejected"]) for r in rows])
    assert 0.3 < chosen < 0.9 and rejected < 0.05  # chosen is only the better answer
    assert all("context" in json.loads(line) for line in paths["prompts"].read_text().splitlines())
    clean = [json.loads(line) for line in paths["teacher_pref"].read_text().splitlines()]
    assert np.mean([sort_rule(r["prompt"], r["chosen"]) for r in clean]) == 1.0


def test_plot(tmp_path):
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 5)))
    table = tmp_path / "results.json"
    table.write_text(json.dumps({"rows": [{"method": "sft", "reward_mean": 0.5, "reward_accuracy": 0.9}]}))
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "p.png", table)
    assert out.exists() and out.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "q.png")
