"""Bad input through `kdcache precompute` and `kdcache rollout`: exit code 2, ONE `error:`
line naming the problem (and the file, for data problems) and the fix, no traceback, and
nothing new left behind: a refused command writes nothing, so the corrected command then
runs at the same --out (no "its meta differs")."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
from pathlib import Path

import pytest
from reference_checks import one_error
from typer.testing import CliRunner

import kdcache.cli as cli
import kdcache.store.writer as store_writer
from kdcache.precompute import run as run_mod
from kdcache.store import open_store
from kdcache.train.tiny import build_tokenizer, save_tiny

runner = CliRunner()
ROWS = [{"id": f"e{i}", "prompt": f"sort {i % 10} 1", "chosen": "1 2 " + "3 " * (i % 4),
         "rejected": "3 2 1"} for i in range(12)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("errs")
    save_tiny(d / "dpo", seed=1)
    save_tiny(d / "other", tokenizer=build_tokenizer(words=["x", "y", "z"]))
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return d


def _data(tmp_path: Path, rows: list[dict], name: str = "d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return str(p)


def _run(work: Path, tmp_path: Path, *extra: str, data: str | None = None):
    args = ["precompute", "--teacher", str(work / "dpo"), "--data", data or str(work / "prefs.jsonl"),
            "--k", "3", "--out-root", str(tmp_path / "stores"), "--shard-records", "4",
            "--no-progress", *extra]
    return runner.invoke(cli.app, args)


def _nothing_written(*paths: Path) -> None:
    """No file at all under these paths (a probe's directories are removed again)."""
    for root in paths:
        assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()], \
            sorted(root.rglob("*"))


def test_missing_column(work, tmp_path):
    data = _data(tmp_path, [ROWS[0], {"prompt": "a", "chosen": "b"}])
    one_error(_run(work, tmp_path, data=data), "d.jsonl line 2: missing column 'rejected'", "needs")
    _nothing_written(tmp_path / "stores")


@pytest.mark.parametrize("col", ["prompt", "chosen"])
def test_empty_prompt_or_response(work, tmp_path, col):
    data = _data(tmp_path, [ROWS[0], {**ROWS[1], col: "  "}])
    one_error(_run(work, tmp_path, data=data), f"d.jsonl line 2: column '{col}' is empty", "fix")
    _nothing_written(tmp_path / "stores")


def test_over_long_truncated_and_reported_or_refused(work, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.precompute"):
        res = _run(work, tmp_path, "--max-length", "9")
    assert res.exit_code == 0, res.output
    report = open_store(res.stdout.strip().splitlines()[-1]).manifest["precompute_report"]
    assert report["truncated"] > 0
    assert f"truncated {report['truncated']} of " in caplog.text  # printed by the CLI's logging
    res = _run(work, tmp_path / "f", "--max-length", "9", "--truncate", "fail")
    one_error(res, "prefs.jsonl line ", "> max_length 9", "raise --max-length")
    _nothing_written(tmp_path / "f")


def test_too_long_prompt_is_named_as_the_prompt(work, tmp_path):
    data = _data(tmp_path, [ROWS[0], {**ROWS[1], "prompt": " ".join("abcdefgh")}])
    res = _run(work, tmp_path, "--max-length", "10", "--truncate", "fail", data=data)
    one_error(res, "d.jsonl line 2: the prompt alone is 10 tokens >= max_length 10",
               "no room for a response")
    _nothing_written(tmp_path / "stores")


@pytest.mark.parametrize("max_length,needle", [
    ("0", "--max-length must be >= 1, got 0"),
    ("2", "no rows left to score: all 12 rows were dropped (12 with a prompt of >= max_length 2"),
])
def test_max_length_that_keeps_nothing_is_refused(work, tmp_path, max_length, needle):
    one_error(_run(work, tmp_path, "--max-length", max_length), needle)
    _nothing_written(tmp_path / "stores")


@pytest.mark.parametrize("args,needle", [
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--k", "-3"], "--k must be >= 1"),
    (["--k", "100000"], "--k 100000 > the teacher's vocabulary of 52 tokens"),
    (["--betas", "1,,x"], "--betas '1,,x': expected comma-separated numbers"),
    (["--betas", "1,x"], "--betas '1,x': expected comma-separated numbers"),
    (["--betas", ""], "--betas '': expected comma-separated numbers"),
    (["--betas", "0"], "--betas: every β must be a finite number > 0, got 0.0"),
    (["--betas", "-1,2"], "every β must be a finite number > 0"),
    (["--betas", "nan"], "every β must be a finite number > 0"),
    (["--betas", "1,2,1"], "--betas lists β=1 twice"),
    (["--partition", "2/2"], "--partition 2/2: need 0 <= index < count"),
    (["--partition", "x"], "--partition: cannot read 'x'"),
    (["--merge-parts", "0"], "--merge-parts must be >= 1, got 0"),
    (["--devices", ""], "--devices '': expected comma-separated values, no empty ones"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--shard-records", "0"], "--shard-records must be >= 1"),
    (["--batch-tokens", "0"], "--batch-tokens must be >= 1"),
    (["--max-batch-seqs", "0"], "--max-batch-seqs must be >= 1"),
    (["--chunk-size", "-1"], "--chunk-size must be >= 1"),
    (["--truncate", "cut"], "--truncate must be one of truncate, skip, fail; got 'cut'"),
    (["--kind", "dpo"], "--kind must be one of auto, preference, sft"),
    (["--codec", "zip"], "--codec 'zip'"),
    (["--error-bound", "-1"], "--error-bound must be a finite number > 0"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
    (["--context-template", "{ctx} {prompt}"], "--context-template '{ctx} {prompt}' is not a valid"),
    (["--context-template", "{context}"], "lacks {prompt}"),
    (["--partition", "0/2", "--merge-parts", "2"], "set only one of --partition / --merge-parts"),
])
def test_bad_options_are_refused_before_anything_is_written(work, tmp_path, args, needle):
    if args == ["--device", "cuda"]:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    one_error(_run(work, tmp_path, "--out", str(out), *args), needle)
    _nothing_written(tmp_path / "stores", out)


def test_a_refused_command_leaves_the_out_free_for_the_corrected_one(work, tmp_path):
    out = tmp_path / "out"
    one_error(_run(work, tmp_path, "--out", str(out), "--ref-mode", "papr", "--reference",
                    str(work / "dpo")), "--ref-mode")
    _nothing_written(out)
    one_error(_run(work, tmp_path, "--out", str(out), "--betas", "1,,x"), "--betas")
    res = _run(work, tmp_path, "--out", str(out), "--betas", "1,2")
    assert res.exit_code == 0, res.output
    assert open_store(str(out)).complete


@pytest.mark.parametrize("content,needle", [
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\xff\xfe\x00binary\n',
     "d.jsonl line 2 is not UTF-8 text"),
    (b'[{"prompt": "a", "chosen": "b", "rejected": "c"}]\n', "one JSON array"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n["a", "b"]\n',
     "d.jsonl line 2: a row must be a JSON object"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n', "d.jsonl line 2 is not valid JSON"),
    (b"\n\n", "d.jsonl has no rows"),
])
def test_data_file_problems_name_the_file(work, tmp_path, content, needle):
    (tmp_path / "d.jsonl").write_bytes(content)
    one_error(_run(work, tmp_path, data=str(tmp_path / "d.jsonl")), needle)
    _nothing_written(tmp_path / "stores")


def test_corrupt_gzip_and_parquet_name_the_file(work, tmp_path):
    good = gzip.compress(json.dumps(ROWS[0]).encode() * 50)
    (tmp_path / "d.jsonl.gz").write_bytes(good[: len(good) // 2])
    one_error(_run(work, tmp_path, data=str(tmp_path / "d.jsonl.gz")), "d.jsonl.gz")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really parquet")
    one_error(_run(work, tmp_path, data=str(tmp_path / "d.parquet")), "d.parquet", "Parquet")
    one_error(_run(work, tmp_path, data=str(tmp_path / "nothing-*.jsonl")), "no data file matches")
    (tmp_path / "d.txt").write_text("a,b\n")
    one_error(_run(work, tmp_path, data=str(tmp_path / "d.txt")), "d.txt", "unknown format")
    (tmp_path / "d.csv").write_text("a,b\n")  # csv goes through `datasets`: a header, no rows
    one_error(_run(work, tmp_path, data=str(tmp_path / "d.csv")), "d.csv", "has no rows")
    _nothing_written(tmp_path / "stores")


def test_out_that_holds_other_files_is_refused(work, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / ".manifest.json.tmp-123").write_text("")  # a killed writer's leftover is fine
    one_error(_run(work, tmp_path, "--out", str(out)), "is a directory with other files "
               "(notes.txt) and no kdcache store")
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json.tmp-123", "notes.txt"]
    (out / "notes.txt").unlink()
    assert _run(work, tmp_path, "--out", str(out), "--max-length", "64").exit_code == 0


def test_directory_as_data_and_invisible_devices(work, tmp_path):
    # a folder is read as a `datasets` dataset folder; this one holds models, not a dataset
    one_error(_run(work, tmp_path, data=str(work)), str(work))
    (tmp_path / "empty").mkdir()
    one_error(_run(work, tmp_path, data=str(tmp_path / "empty")), "empty",
               "doesn't contain any data files", "a dataset folder")
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    one_error(_run(work, tmp_path, "--devices", str(n)), f"CUDA device {n} is not visible here")
    _nothing_written(tmp_path / "stores")


def test_tokenized_only_from_the_cli(work, tmp_path):
    res = runner.invoke(cli.app, ["precompute", "--tokenizer", str(work / "dpo"), "--data",
                                  str(work / "prefs.jsonl"), "--out-root", str(tmp_path / "s"),
                                  "--no-progress"])
    assert res.exit_code == 0, res.output
    store = open_store(res.stdout.strip().splitlines()[-1])
    assert store.complete and store.fields == [] and len(store) == 2 * len(ROWS)
    res = runner.invoke(cli.app, ["precompute", "--data", str(work / "prefs.jsonl"),
                                  "--out-root", str(tmp_path / "t")])
    one_error(res, "no --teacher", "--tokenizer DIR for a tokenized-only store")
    _nothing_written(tmp_path / "t")


def test_config_file_problems(work, tmp_path):
    one_error(_run(work, tmp_path, "-c", str(tmp_path / "missing.yaml")), "--config", "no such file")
    (tmp_path / "c.yaml").write_text("k: [unclosed\n")
    one_error(_run(work, tmp_path, "-c", str(tmp_path / "c.yaml")), "--config", "not valid YAML")
    (tmp_path / "c.yaml").write_text(f"k: abc\nteacher: {work / 'dpo'}\ndata: {work / 'prefs.jsonl'}\n")
    res = runner.invoke(cli.app, ["precompute", "-c", str(tmp_path / "c.yaml"),
                                  "--out-root", str(tmp_path / "stores")])
    one_error(res, "c.yaml: k: expected int, got 'abc'")
    res = runner.invoke(cli.app, ["precompute", "--teacher", str(work / "dpo"),
                                  "--out-root", str(tmp_path / "stores")])
    one_error(res, "pass exactly one of --data FILE")
    _nothing_written(tmp_path / "stores")


def test_tokenizer_mismatch(work, tmp_path):
    one_error(_run(work, tmp_path, "--student", str(work / "other")),
               "teacher vocab 52 != student vocab 9", "share one tokenizer")
    _nothing_written(tmp_path / "stores")


@pytest.mark.parametrize("broken", ["empty", "bad_config"])
def test_unreadable_model_directory(work, tmp_path, broken):
    d = tmp_path / broken
    d.mkdir()
    if broken == "bad_config":
        (d / "config.json").write_text("{not json")
    one_error(_run(work, tmp_path, "--reference", str(d)),
               f"cannot load the reference tokenizer from {str(d)!r}", "pass a local HF model")
    _nothing_written(tmp_path / "stores")


def test_non_writable_output(work, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    res = runner.invoke(cli.app, ["precompute", "--teacher", str(work / "dpo"), "--data",
                                  str(work / "prefs.jsonl"), "--out-root",
                                  str(tmp_path / "afile" / "stores"), "--no-progress"])
    one_error(res, "is not writable", "pass a writable --out")


def test_disk_full_mid_run_commits_nothing_partial_and_resumes(work, tmp_path, monkeypatch):
    real = store_writer.write_files
    calls = {"n": 0}

    def full_disk(fs, files):
        calls["n"] += 1
        if calls["n"] == 3:  # the third shard: some files land, then the disk is full
            items = list(files.items())
            real(fs, dict(items[:1]))
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fs, files)

    monkeypatch.setattr(store_writer, "write_files", full_disk)
    res = _run(work, tmp_path, "--codec", "lossless")
    one_error(res, "no space left on the device", "free space", "re-run the same command",
               "store gc", "--min-age 0")
    (url,) = (tmp_path / "stores").glob("*/manifest.json")
    url = url.parent
    m = json.loads((url / "manifest.json").read_text())
    assert not m["complete"] and [s["name"] for s in m["shards"]] == ["shard-00000", "shard-00001"]
    assert not (url / "shards" / "shard-00002").exists()  # the partial shard: removed again
    assert not [n for n in os.listdir(url) if ".tmp-" in n]  # no temp manifest, no probe
    from kdcache.store.verify import verify

    assert verify(str(url)) == []
    monkeypatch.setattr(store_writer, "write_files", real)  # space freed
    res = _run(work, tmp_path, "--codec", "lossless")
    assert res.exit_code == 0, res.output
    done = open_store(str(url))
    assert done.complete and len(done) == 2 * len(ROWS) and verify(str(url)) == []
    clean = _run(work, tmp_path / "clean", "--codec", "lossless")
    ref = open_store(clean.stdout.strip().splitlines()[-1])
    assert ref.manifest["checksum"] == done.manifest["checksum"]


# ------------------------------------------------------------------------------- rollout

def _rollout(work: Path, tmp_path: Path, *extra: str, data: str | None = None):
    args = ["rollout", "--model", str(work / "dpo"), "--data", data or str(work / "prefs.jsonl"),
            "--out-root", str(tmp_path / "stores"), "--no-progress", "--max-new-tokens", "3",
            "--n", "2", *extra]
    return runner.invoke(cli.app, args)


@pytest.mark.parametrize("args,needle", [
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--top-p", "0"], "--top-p must be a finite number > 0 and <= 1"),
    (["--top-p", "1.5"], "--top-p must be a finite number > 0 and <= 1"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--batch-prompts", "0"], "--batch-prompts must be >= 1"),
    (["--max-prompt-length", "0"], "--max-prompt-length must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--role", "teacher"], "--role must be one of student_rollout, teacher_rollout"),
    (["--truncate", "truncate"], "--truncate must be one of skip, fail"),
    (["--backend", "tgi"], "--backend must be one of hf, vllm"),
    (["--codec", "zip"], "--codec 'zip'"),
    (["--max-prompt-length", "2"], "no usable prompts: all 12 were longer than --max-prompt-length 2"),
    (["--max-prompt-length", "2", "--truncate", "fail"], "prefs.jsonl line 1: the prompt has"),
])
def test_rollout_bad_options(work, tmp_path, args, needle):
    out = tmp_path / "out"
    one_error(_rollout(work, tmp_path, "--out", str(out), *args), needle)
    _nothing_written(tmp_path / "stores", out)


def test_rollout_data_problems_name_the_file(work, tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "a"}\n\x80\x81\n')
    one_error(_rollout(work, tmp_path, data=str(tmp_path / "d.jsonl")), "d.jsonl line 2 is not UTF-8")
    data = _data(tmp_path, [{"prompt": "a"}, {"question": "b"}], "q.jsonl")
    one_error(_rollout(work, tmp_path, data=data), "q.jsonl line 2: missing column 'prompt'")
    one_error(_rollout(work, tmp_path, "--include-chosen", data=data),
               "q.jsonl line 1: --include-chosen needs a 'chosen' or 'completion' column")
    res = runner.invoke(cli.app, ["rollout", "--data", data])
    one_error(res, "missing --model")
    _nothing_written(tmp_path / "stores")


def test_rollout_reward_that_fails_is_one_clear_error(work, tmp_path):
    def broken(prompt, response, row):
        raise KeyError("answer")

    from kdcache.precompute.rollout import RolloutConfig, run_rollout

    cfg = RolloutConfig(model=str(work / "dpo"), data=str(work / "prefs.jsonl"), n=1,
                        max_new_tokens=2, reward=broken, out=str(tmp_path / "r"), progress=False)
    with pytest.raises(ValueError, match="the reward function .*broken failed on example 'e"):
        run_rollout(cfg)
    _nothing_written(tmp_path / "r")  # the first group failed: no store was created
