"""Bad input through `kdcache precompute`: exit code 2, ONE `error:` line naming the problem
and the fix, no traceback, and nothing committed half-written."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
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


def _data(tmp_path: Path, rows: list[dict]) -> str:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return str(p)


def _run(work: Path, tmp_path: Path, *extra: str, data: str | None = None):
    args = ["precompute", "--teacher", str(work / "dpo"), "--data", data or str(work / "prefs.jsonl"),
            "--k", "3", "--out-root", str(tmp_path / "stores"), "--shard-records", "4",
            "--no-progress", *extra]
    return runner.invoke(cli.app, args)


def _one_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _nothing_written(tmp_path: Path) -> None:
    root = tmp_path / "stores"
    assert not root.exists() or not list(root.glob("*/manifest.json"))


def test_missing_column(work, tmp_path):
    data = _data(tmp_path, [ROWS[0], {"prompt": "a", "chosen": "b"}])
    _one_error(_run(work, tmp_path, data=data), "row 1: missing column 'rejected'", "needs")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("col", ["prompt", "chosen"])
def test_empty_prompt_or_response(work, tmp_path, col):
    data = _data(tmp_path, [ROWS[0], {**ROWS[1], col: "  "}])
    _one_error(_run(work, tmp_path, data=data), f"row 1: column '{col}' is empty", "fix")
    _nothing_written(tmp_path)


def test_over_long_truncated_and_reported_or_refused(work, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.precompute"):
        res = _run(work, tmp_path, "--max-length", "9")
    assert res.exit_code == 0, res.output
    report = open_store(res.stdout.strip().splitlines()[-1]).manifest["precompute_report"]
    assert report["truncated"] > 0
    assert f"truncated {report['truncated']} of " in caplog.text  # printed by the CLI's logging
    res = _run(work, tmp_path / "f", "--max-length", "9", "--truncate", "fail")
    _one_error(res, "> max_length 9", "raise max_length")
    _nothing_written(tmp_path / "f")


def test_tokenizer_mismatch(work, tmp_path):
    _one_error(_run(work, tmp_path, "--student", str(work / "other")),
               "teacher vocab 52 != student vocab 9", "share one tokenizer")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("broken", ["empty", "bad_config"])
def test_unreadable_model_directory(work, tmp_path, broken):
    d = tmp_path / broken
    d.mkdir()
    if broken == "bad_config":
        (d / "config.json").write_text("{not json")
    _one_error(_run(work, tmp_path, "--reference", str(d)),
               f"cannot load the reference tokenizer from {str(d)!r}", "pass a local HF model")
    _nothing_written(tmp_path)


def test_non_writable_output(work, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    res = runner.invoke(cli.app, ["precompute", "--teacher", str(work / "dpo"), "--data",
                                  str(work / "prefs.jsonl"), "--out-root",
                                  str(tmp_path / "afile" / "stores"), "--no-progress"])
    _one_error(res, "is not writable", "pass a writable --out")


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
    _one_error(res, "no space left on the device", "free space", "re-run the same command")
    (url,) = (tmp_path / "stores").glob("*/manifest.json")
    url = url.parent
    m = json.loads((url / "manifest.json").read_text())
    assert not m["complete"] and [s["name"] for s in m["shards"]] == ["shard-00000", "shard-00001"]
    assert (url / "shards" / "shard-00002").exists()  # the partial shard: not committed
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
