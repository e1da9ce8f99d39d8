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
    meta = StoreMeta(k=K, betas=[1.0], fields=["topk_ids", "topk_logprobs"], options={"codec": "lossless"},
                     tokenizer={"vocab_size": len(tok)})
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


def test_eval_names_its_reward_and_the_real_eos_and_strips_the_prompt(model_and_store, tmp_path, monkeypatch):
    """Issue 23 §3: the reward is called fn(prompt_text, response_text, None) with the prompt
    decoded without special tokens; the result names the reward and the tokenizer's EOS."""
    model_dir, url = model_and_store
    (tmp_path / "spy_reward.py").write_text(
        "SEEN = []\n"
        "def spy(prompt, response, row):\n"
        "    SEEN.append((prompt, response, row))\n"
        "    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    res = evaluate(EvalConfig(model=str(model_dir), store=url, reward="spy_reward:spy", samples=1,
                              max_new_tokens=3, max_groups=2))
    import spy_reward

    assert res["reward"] == "spy_reward:spy" and res["eos_token"] == "</s>" and res["reward_mean"] == 1.0
    assert [p for p, _, _ in spy_reward.SEEN] == ["sort : 3 1 2"] * 2
    assert all(row is None and "</s>" not in resp for _, resp, row in spy_reward.SEEN)


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


def _run(root, name, losses):
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                                               for s, v in enumerate(losses, 1)))
    return run


def test_plot(tmp_path):
    a, b = _run(tmp_path, "a", [1.0, 0.5, 0.3]), _run(tmp_path, "b", [2.0, 1.0])
    (b / "eval.json").write_text(json.dumps({"model": "b/model", "reward_accuracy": 0.8, "kl_topk": 0.25,
                                             "pairs": 12, "config": {"samples": 4}}))
    table = tmp_path / "results.json"
    table.write_text(json.dumps({"rows": [{"method": "sft", "reward_mean": 0.5, "reward_accuracy": 0.9}]}))
    out, text = plot_runs([a, b, table], tmp_path / "p.png", table=True)
    assert out.exists() and out.stat().st_size > 1000
    lines = text.splitlines()
    assert lines[0] == "| run | steps | final loss | pref rate | reward acc | KL top-K |"
    assert lines[2:] == ["| a | 3 | 0.300 | - | - | - |", "| b | 2 | 1.000 | - | 0.800 | 0.250 |",
                         "| sft | - | - | 0.500 | 0.900 | - |"]
    assert plot_runs([a], tmp_path / "q.png") == (tmp_path / "q.png", None)
    assert plot_runs([a, b], tmp_path / "log.png", log_y=True)[0].exists()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "q.png")


def test_plot_styles_many_runs_and_single_points(tmp_path):
    from kdcache.train.plot import draw, run_styles

    runs = [_run(tmp_path, f"r{i:02d}", [1.0] if i == 0 else [1.0, 0.5]) for i in range(23)]
    fig, _ = draw(runs)
    lines = fig.axes[0].get_lines()
    styles = {(line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color()),
               line.get_linestyle()) for line in lines}
    assert len(lines) == 23 and len(styles) == 23  # no two runs look alike past 10 (or 20)
    assert lines[0].get_marker() == "o" and lines[1].get_marker() in ("None", None, "")
    assert len({s["color"] for s in run_styles(10)}) == 10


def test_plot_reads_each_step_once(tmp_path):
    from kdcache.train.plot import read_metrics

    run = _run(tmp_path, "a", [1.0, 0.5])
    with (run / "metrics.jsonl").open("a") as f:  # an older trainer wrote its last row twice
        f.write(json.dumps({"step": 2, "loss": 0.5}) + "\n")
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_eval_results_location_and_files(tmp_path, model_and_store):
    from kdcache.train.eval import results_dir, save_results

    run = tmp_path / "runs" / "x"
    (run / "model").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    assert results_dir(EvalConfig(model=str(run / "model"), store="s")) == run
    assert results_dir(EvalConfig(model=str(run / "model"), store="s", out=str(tmp_path / "o"))) == tmp_path / "o"
    model_dir, _ = model_and_store
    assert results_dir(EvalConfig(model=str(model_dir), store="s")) == model_dir
    with pytest.raises(ValueError, match="--out"):
        results_dir(EvalConfig(model="org/some-hub-model", store="s"))
    path = save_results(EvalConfig(model=str(run / "model"), store="s"), {"pairs": 2, "reward_accuracy": 0.5})
    saved = json.loads(path.read_text())
    assert saved["reward_accuracy"] == 0.5 and saved["store"] == "s" and saved["config"]["samples"] == 4
    assert (run / "eval.csv").read_text().splitlines()[0].startswith("model,store,pairs,reward_accuracy")
    assert sorted(p.name for p in run.iterdir()) == ["eval.csv", "eval.json", "metrics.jsonl", "model"]


def test_eval_refuses_a_student_of_another_vocabulary(tmp_path, model_and_store):
    _, url = model_and_store
    other = save_tiny(tmp_path / "other", build_tokenizer(words=["x", "y"]), hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="vocab"):
        evaluate(EvalConfig(model=str(other), store=url))


def test_plot_merges_a_results_row_into_its_run_and_names_reward_and_eos(tmp_path):
    """Issue 23 §8: `kdcache plot demo/runs/* --table demo/results.json` gives one row per run
    (the run's loss, the results row's eval), a reward column named by the reward, an EOS
    column named by the real EOS token, and Top-K KL among the bars."""
    from kdcache.train.plot import draw

    runs = tmp_path / "runs"
    runs.mkdir()
    sft, dckd, teacher = _run(runs, "sft", [3.0, 2.0]), _run(runs, "dckd", [4.0, 1.0]), _run(runs, "teacher-dpo", [1.0])
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [
        {"method": "teacher (DPO)", "run": "teacher-dpo", "reward_mean": 0.9, "reward": "sort_rule",
         "eos_rate": 1.0, "eos_token": "<|im_end|>", "kl_topk": 0.0},
        {"method": "student init", "reward_mean": 0.3, "reward": "sort_rule", "eos_rate": 1.0,
         "eos_token": "<|im_end|>", "kl_topk": 1.5},
        {"method": "sft", "reward_mean": 0.6, "reward": "sort_rule", "eos_rate": 0.5, "eos_token": "<|im_end|>",
         "kl_topk": 1.2, "reward_accuracy": 0.9},
        {"method": "dckd", "reward_mean": 0.7, "reward": "sort_rule", "eos_rate": 1.0, "eos_token": "<|im_end|>",
         "kl_topk": 0.4}]}))
    out, text = plot_runs([dckd, sft, teacher, results], tmp_path / "p.png", table=True)
    lines = text.splitlines()
    assert lines[0] == ("| run | steps | final loss | reward sort_rule | ends <\\|im_end\\|> | reward acc | KL top-K |")
    assert lines[2:] == ["| dckd | 2 | 1.000 | 0.700 | 1.000 | - | 0.400 |",
                         "| sft | 2 | 2.000 | 0.600 | 0.500 | 0.900 | 1.200 |",
                         "| teacher (DPO) | 1 | 1.000 | 0.900 | 1.000 | - | 0.000 |",
                         "| student init | - | - | 0.300 | 1.000 | - | 1.500 |"]
    fig, _ = draw([dckd, sft, teacher, results], table=True)
    loss_ax, bars, kl = fig.axes
    assert loss_ax.get_legend().get_bbox_to_anchor().x0 > loss_ax.get_window_extent().x1  # outside the axes
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["reward sort_rule", "reward accuracy"]
    assert [round(p.get_height(), 3) for p in kl.patches] == [0.4, 1.2, 0.0, 1.5]
    assert "KL" in kl.get_title()
    # an eval.json of a custom reward, written before `reward` was a result key, names it from its config
    (dckd / "eval.json").write_text(json.dumps({"reward_mean": 0.25, "eos_rate": 1.0, "config": {"reward": "mine:score"}}))
    _, text = plot_runs([dckd], tmp_path / "q.png", table=True)
    assert text.splitlines()[0] == "| run | steps | final loss | reward score | ends EOS |"
