"""`kdcache pipeline adpa-plus | tgpo | pbsd` end to end through the CLI on tiny models:
each produces an HF-loadable student, reuses its cached stores when re-run, and TGPO rounds
continue the guidance schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.train.tasks import make_demo_data
from kdcache.train.tiny import build_tokenizer, save_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pipe")
    tok = build_tokenizer()
    data = make_demo_data(d / "data", n_sft=10, n_pref=12, n_rollout_prompts=8, n_eval=4)
    return {
        "dir": d,
        "data": data,
        "teacher": str(save_tiny(d / "teacher", tok, hidden=32, layers=1, heads=2, seed=1)),
        "ref": str(save_tiny(d / "ref", tok, hidden=32, layers=1, heads=2, seed=2)),
        "student": str(save_tiny(d / "student", tok, hidden=16, layers=1, heads=2, seed=3)),
    }


def _run(*args: str, stages: int | None = None) -> str:
    res = runner.invoke(cli.app, ["pipeline", *args])
    assert res.exit_code == 0, res.output
    if stages:  # one `[n/k] stage` line per stage on stderr, none on stdout
        lines = [line for line in res.stderr.splitlines() if line.startswith("[")]
        assert [line.split("]")[0] for line in lines] == [f"[{i}/{stages}" for i in range(1, stages + 1)], lines
        assert "[1/" not in res.stdout
    return res.stdout.strip().splitlines()[-1]


def _stores(out: Path) -> set[str]:
    return {p.name for p in (out / "stores").iterdir()}


def test_adpa_plus(work):
    out = work["dir"] / "adpa-plus"
    args = ["adpa-plus", "--student", work["student"], "--teacher", work["teacher"],
            "--reference", work["ref"], "--data", str(work["data"]["pref"]),
            "--prompts", str(work["data"]["prompts"]), "--out", str(out), "--dckd-steps", "2",
            "--adpa-steps", "2", "--k", "4", "--max-new-tokens", "6", "--batch-groups", "2"]
    model = _run(*args, stages=5)
    AutoModelForCausalLM.from_pretrained(model)
    assert {p.name for p in (out / "runs").iterdir()} == {"dckd", "adpa+"}
    stores = _stores(out)
    assert _run(*args) == model and _stores(out) == stores  # cached: nothing new is computed


def test_tgpo_rounds(work):
    out = work["dir"] / "tgpo"
    model = _run("tgpo", "--student", work["student"], "--teacher", work["teacher"],
                 "--prompts", str(work["data"]["prompts"]), "--reward", "sort_rule",
                 "--out", str(out), "--rounds", "2", "--steps", "2", "--n", "2", "--k", "4",
                 "--max-new-tokens", "6", "--batch-groups", "2", stages=6)
    AutoModelForCausalLM.from_pretrained(model)
    rows = [json.loads(line) for line in (out / "runs" / "tgpo-round1" / "metrics.jsonl").read_text().splitlines()]
    # the logged row is round 2's last step: local step 1 after an offset of 2 -> global step 3
    assert rows[-1]["w"] == pytest.approx(2e-3 - 1e-5 * 3)
    assert len(_stores(out)) == 4  # rollout + scored store per round


def test_pbsd(work):
    out = work["dir"] / "pbsd"
    model = _run("pbsd", "--student", work["student"], "--prompts", str(work["data"]["prompts"]),
                 "--out", str(out), "--steps", "2", "--max-new-tokens", "6", "--batch-groups", "2",
                 stages=4)
    AutoModelForCausalLM.from_pretrained(model)
    from kdcache.store import open_store

    scored = [open_store(str(out / "stores" / s)) for s in _stores(out)]
    scored = [s for s in scored if "token_logprob" in s.fields]
    assert len(scored) == 1
    group = next(scored[0].groups())
    assert {r["role"] for r in group} == {"teacher_rollout", "student_rollout"}
    assert all(r["teacher_prompt_ids"] is not None for r in group)  # the teacher saw the context


def test_pipeline_bad_input_is_one_line(work, tmp_path):
    res = runner.invoke(cli.app, ["pipeline", "pbsd", "--student", str(tmp_path / "missing"),
                                  "--prompts", str(work["data"]["prompts"]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
