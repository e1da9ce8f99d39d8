"""The pipelines read `datasets` data like the stage commands: `--data-config`, `--split`
and `--columns` (and adpa-plus's `--prompts-*` for its rollout prompts) reach the stages'
configs, so a named split with renamed columns is read end to end, a different split is a
different store, and a bad split or column is one `error:` line before any stage runs.
Data: a local `DatasetDict.save_to_disk` folder built here (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import open_store
from kdcache.train.tasks import make_demo_data
from kdcache.train.tiny import build_tokenizer, save_tiny

runner = CliRunner()
RENAMED = {"id": "uid", "prompt": "question", "chosen": "good", "rejected": "bad", "context": "ctx"}
COLUMNS = "prompt=question,chosen=good,rejected=bad,id=uid"
SPLITS = {"train": 5, "held": 3}  # rows per split


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    import datasets

    d = tmp_path_factory.mktemp("pipe-data")
    tok = build_tokenizer()
    data = make_demo_data(d / "data", n_sft=4, n_pref=4, n_rollout_prompts=8, n_eval=2)
    rows = [json.loads(line) for line in Path(data["prompts"]).read_text().splitlines()]
    assert len(rows) == sum(SPLITS.values()) and all(r.get("context") for r in rows)
    splits, start = {}, 0
    for name, count in SPLITS.items():  # the same rows under other names; ids say the split
        part = [{RENAMED[k]: (f"{name}-{i}" if k == "id" else v) for k, v in r.items()}
                for i, r in enumerate(rows[start:start + count])]
        splits[name], start = datasets.Dataset.from_list(part), start + count
    saved = d / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    return {
        "dir": d, "saved": str(saved), "jsonl": str(data["prompts"]),
        "teacher": str(save_tiny(d / "teacher", tok, hidden=32, layers=1, heads=2, seed=1)),
        "ref": str(save_tiny(d / "ref", tok, hidden=32, layers=1, heads=2, seed=2)),
        "student": str(save_tiny(d / "student", tok, hidden=16, layers=1, heads=2, seed=3)),
    }


SMALL = ["--max-new-tokens", "4", "--batch-groups", "2"]


def _run(*args: str):
    res = runner.invoke(cli.app, ["pipeline", *args])
    assert res.exit_code == 0, res.output
    return res


def _ids_by_store(out: Path) -> dict[str, tuple[set[str], set[str]]]:
    """store name -> (its example ids, its record roles)."""
    found = {}
    for p in (out / "stores").iterdir():
        groups = list(open_store(str(p)).groups())
        found[p.name] = ({str(g[0]["example_id"]) for g in groups}, {r["role"] for g in groups for r in g})
    return found


def _ids(split: str) -> set[str]:
    return {f"{split}-{i}" for i in range(SPLITS[split])}


def test_adpa_plus_reads_named_splits_with_renamed_columns(work):
    """The preference pairs from split `held`, the rollout prompts from split `train` of the
    same folder (--prompts unset: they inherit --columns), each stage reading its own."""
    out = work["dir"] / "adpa"
    res = _run("adpa-plus", "--student", work["student"], "--teacher", work["teacher"],
               "--reference", work["ref"], "--data", work["saved"], "--split", "held",
               "--columns", COLUMNS, "--prompts-split", "train", "--out", str(out),
               "--dckd-steps", "1", "--adpa-steps", "1", "--k", "4", *SMALL)
    stages = [line for line in res.stderr.splitlines() if line.startswith("[")]
    assert "split held" in stages[0] and f"columns {COLUMNS}" in stages[0], stages
    assert "split train" in stages[2] and f"columns {COLUMNS}" in stages[2], stages
    by_ids = {frozenset(ids): roles for ids, roles in _ids_by_store(out).values()}
    assert set(by_ids) == {frozenset(_ids("held")), frozenset(_ids("train"))}, by_ids
    assert by_ids[frozenset(_ids("held"))] == {"chosen", "rejected"}  # the pairs: split held
    # the rollouts (with the preferred response, from the renamed `good`) and their scores: split train
    assert by_ids[frozenset(_ids("train"))] == {"chosen", "student_rollout"}


def test_tgpo_split_is_part_of_the_store_keys(work):
    out = work["dir"] / "tgpo"
    args = ["tgpo", "--student", work["student"], "--teacher", work["teacher"], "--prompts",
            work["saved"], "--columns", COLUMNS, "--reward", "sort_rule",
            "--steps", "1", "--n", "2", "--k", "4", *SMALL]
    _run(*args, "--split", "held", "--out", str(out / "held"))
    held = _ids_by_store(out / "held")
    assert [ids for ids, _ in held.values()] == [_ids("held")] * 2  # rollout + scored
    _run(*args, "--split", "held", "--out", str(out / "held"))
    assert _ids_by_store(out / "held") == held  # the same options: the same stores, nothing new
    _run(*args, "--out", str(out / "train"))  # unset: train, or its only split
    train = _ids_by_store(out / "train")
    assert [ids for ids, _ in train.values()] == [_ids("train")] * 2
    assert not set(train) & set(held)  # another split: other store keys


def test_pbsd_reads_the_renamed_context(work):
    out = work["dir"] / "pbsd"
    _run("pbsd", "--student", work["student"], "--prompts", work["saved"], "--split", "held",
         "--columns", "prompt=question,context=ctx,id=uid", "--out", str(out), "--steps", "1", *SMALL)
    scored = [s for s in (open_store(str(p)) for p in (out / "stores").iterdir())
              if "token_logprob" in s.fields]
    assert len(scored) == 1
    groups = list(scored[0].groups())
    assert {str(g[0]["example_id"]) for g in groups} == _ids("held")
    assert all(r["teacher_prompt_ids"] is not None for g in groups for r in g)  # the teacher saw ctx


@pytest.mark.parametrize("args, needles", [
    (["tgpo", "--split", "nope"], ["--split", "no split 'nope'", "train, held"]),
    (["tgpo", "--split", "held", "--columns", "prompt=question,id=nope"], ["id=nope", "'nope'", "question"]),
    (["pbsd", "--columns", "bogus=question"], ["--columns", "bogus", "prompt, chosen"]),
    (["pbsd", "--data-config", "other", "--jsonl"], ["--data-config", "data file", "leave them out"]),
    (["adpa-plus", "--split", "held", "--columns", COLUMNS, "--prompts-split", "nope"],
     ["rollout prompts", "--prompts-split", "no split 'nope'"]),
    (["adpa-plus", "--columns", "prompt=nope,chosen=good,rejected=bad"],
     ["preference data", "prompt=nope", "its columns are"]),
])
def test_bad_split_or_column_is_one_error_line_before_any_stage(work, tmp_path, args, needles):
    name, *rest = args
    data = work["jsonl"] if "--jsonl" in rest else work["saved"]
    rest = [a for a in rest if a != "--jsonl"]
    inputs = {"tgpo": ["--teacher", work["teacher"], "--prompts", data, "--reward", "sort_rule"],
              "pbsd": ["--prompts", data],
              "adpa-plus": ["--teacher", work["teacher"], "--reference", work["ref"], "--data", data]}
    out = tmp_path / "o"
    res = runner.invoke(cli.app, ["pipeline", name, "--student", work["student"], *inputs[name],
                                  *rest, "--out", str(out), *SMALL])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not (out / "stores").exists() and not (out / "runs").exists()  # nothing ran


@pytest.mark.parametrize("name", ["adpa-plus", "tgpo", "pbsd"])
def test_data_options_say_their_input_and_default(name):
    import inspect

    command = next(c for c in cli.pipeline_app.registered_commands if c.name == name).callback
    options = {k: p.default for k, p in inspect.signature(command).parameters.items()}
    data_opts = [k for k in options if k.endswith(("config", "split", "columns"))]
    assert set(data_opts) >= {"data_config", "split", "columns"}
    if name == "adpa-plus":
        assert set(data_opts) == {"data_config", "split", "columns", "prompts_config",
                                  "prompts_split", "prompts_columns"}
    for k in data_opts:
        text = options[k].help
        assert "\n" not in text and "unset: " in text, (k, text)
        assert ("--data" if name == "adpa-plus" else "--prompts") in text, (k, text)
    if name == "adpa-plus":  # --split reads the prompts too, unless --prompts is given
        assert "rollout prompts when --prompts is unset" in options["split"].help
