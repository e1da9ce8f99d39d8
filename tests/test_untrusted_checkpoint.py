"""Checkpoints, weights and configs are untrusted input (issue 19): nothing in them runs
code, and a damaged or hostile one is one `error:` line naming the file and the fix.

Every planted pickle's __reduce__ would create a marker file; each test checks it was not
created. The FSDP case reads `last/dcp/` the way `load_sharded` does (the DCP metadata
through the restricted unpickler, byte items weights_only)."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from reference_checks import one_error
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import StoreMeta, StoreWriter
from kdcache.train.checkpoint import load_dcp, read_dcp_metadata
from kdcache.train.tiny import build_tokenizer, save_tiny

runner = CliRunner()


class Planted:
    """Unpickling this runs `touch MARKER` (if anything ever unpickles it unsafely)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_error(res, *needles: str) -> str:
    return one_error(res, *needles, stream="stderr", max_len=2100)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny student, a store, and a run stopped with a checkpoint in RUN/last."""
    root = tmp_path_factory.mktemp("untrusted")
    tok = build_tokenizer()
    model = save_tiny(root / "student", tok, hidden=16, layers=1, heads=2)
    rng = np.random.default_rng(0)
    meta = StoreMeta(k=2, fields=["topk_ids", "topk_logprobs"], tokenizer={"vocab_size": len(tok)},
                     options={"codec": "lossless"}, code_version="test")
    with StoreWriter(str(root / "store"), meta, shard_records=2) as w:
        for e in range(4):
            T = 2
            w.add_group([{"example_id": f"e{e}", "role": role, "group": 0,
                          "prompt_ids": np.array([6, 7], np.int32),
                          "response_ids": rng.integers(6, len(tok), size=T).astype(np.int32),
                          "is_terminal": True,
                          "topk_ids": np.stack([rng.permutation(len(tok))[:2] for _ in range(T)]).astype(np.int32),
                          "topk_logprobs": np.log(np.array([[0.6, 0.3]] * T, np.float32))}
                         for role in ("chosen", "rejected")])
    args = ["--model", str(model), "--store", str(root / "store"), "--objective", "dckd",
            "--max-steps", "2", "--batch-groups", "2", "--chunk-size", "4", "--no-progress"]
    return {"root": root, "args": args, "model": model}


def _copy_run(run, tmp_path) -> Path:
    """A finished run at tmp_path/run (its saved config names its --out, so it is trained
    there); a re-run loads its checkpoint state and config before finding it done."""
    dest = tmp_path / "run"
    res = _train(run, dest)
    assert res.exit_code == 0, res.output
    assert (dest / "last" / "training_state.pt").exists()
    return dest


def _train(run, out: Path, *extra: str):
    return runner.invoke(cli.app, ["train", *run["args"], "--out", str(out), *extra])


@pytest.mark.parametrize("bad", ["planted", "truncated"])
def test_a_hostile_or_damaged_training_state_is_one_line(run, tmp_path, bad):
    out = _copy_run(run, tmp_path)
    marker = tmp_path / "RAN"
    state = out / "last" / "training_state.pt"
    if bad == "planted":
        torch.save({"step": 1, "x": Planted(marker)}, state)
    else:
        state.write_bytes(state.read_bytes()[:100])
    _one_error(_train(run, out), str(state), "--no-resume")
    assert not marker.exists()


@pytest.mark.parametrize("text, needle", [
    ("a: &x [1, 2]\nb: *x\n", "anchors and aliases"),
    ("!!python/object/apply:os.system ['touch RAN']\n", "python/object"),
    ("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested deeper"),
])
def test_a_hostile_saved_config_is_one_line(run, tmp_path, text, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _copy_run(run, tmp_path)
    (out / "last" / "config.yaml").write_text(text)
    _one_error(_train(run, out), str(out / "last" / "config.yaml"), needle, "--no-resume")
    assert not (tmp_path / "RAN").exists()


def test_a_planted_pytorch_model_bin_is_one_line_under_train(run, tmp_path):
    bad = tmp_path / "bin-model"
    shutil.copytree(run["model"], bad)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "RAN"
    torch.save({"model.embed_tokens.weight": Planted(marker)}, bad / "pytorch_model.bin")
    args = [a if a != str(run["model"]) else str(bad) for a in run["args"]]
    res = runner.invoke(cli.app, ["train", *args, "--out", str(tmp_path / "new")])
    _one_error(res, str(bad), "holds code", "model.safetensors")
    assert not marker.exists() and not (tmp_path / "new").exists()
    # the same file as the resumed weights in RUN/last
    out = _copy_run(run, tmp_path)
    shutil.rmtree(out / "model")  # not finished: the run loads its weights from last/
    (out / "last" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Planted(marker)}, out / "last" / "pytorch_model.bin")
    _one_error(_train(run, out), str(out / "last"), "holds code")
    assert not marker.exists()


# ------------------------------------------------------------------ FSDP: last/dcp
def _dcp_checkpoint(path: Path, extra: dict | None = None) -> dict:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    sd = {"w": torch.randn(3, 4), "opt": {"lr": 0.01, "betas": (0.9, 0.99), "step": torch.tensor(3.0)},
          **(extra or {})}
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def _load(path: Path, like: dict) -> dict:
    """As load_sharded reads last/dcp (one process here)."""
    sd = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in like.items()}
    load_dcp(path, sd, no_dist=True)
    return sd


def test_an_honest_dcp_checkpoint_loads_through_the_safe_reader(tmp_path):
    saved = _dcp_checkpoint(tmp_path / "dcp")
    got = _load(tmp_path / "dcp", {"w": saved["w"], "opt": {"lr": 0.0, "betas": (0.0, 0.0),
                                                             "step": torch.tensor(0.0)}})
    assert torch.equal(got["w"], saved["w"])
    assert got["opt"]["lr"] == 0.01 and tuple(got["opt"]["betas"]) == (0.9, 0.99)
    assert float(got["opt"]["step"]) == 3.0


def _friendly_line(capsys, fn) -> str:
    with pytest.raises(typer.Exit):
        cli._friendly(fn)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_planted_dcp_metadata_is_refused_before_anything_runs(tmp_path, capsys):
    _dcp_checkpoint(tmp_path / "last" / "dcp")
    marker = tmp_path / "RAN"
    with open(tmp_path / "last" / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Planted(marker), f)
    line = _friendly_line(capsys, lambda: read_dcp_metadata(tmp_path / "last" / "dcp"))
    assert ".metadata" in line and "not a checkpoint metadata class" in line
    assert "--no-resume" in line and str(tmp_path / "last") in line
    assert not marker.exists()
    line = _friendly_line(capsys, lambda: _load(tmp_path / "last" / "dcp", {"w": torch.zeros(3, 4)}))
    assert not marker.exists() and "refused, not run" in line


def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, capsys):
    _dcp_checkpoint(tmp_path / "dcp")
    (tmp_path / "secret").write_bytes(b"s" * 64)
    with open(tmp_path / "dcp" / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own, honest file
    for info in md.storage_data.values():
        info.relative_path = "../secret"
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    line = _friendly_line(capsys, lambda: read_dcp_metadata(tmp_path / "dcp"))
    assert "'../secret'" in line and "not a plain file name" in line


def test_a_planted_dcp_byte_item_is_refused(tmp_path, capsys):
    marker = tmp_path / "RAN"
    _dcp_checkpoint(tmp_path / "dcp", {"obj": Planted(marker)})
    assert not marker.exists()
    line = _friendly_line(capsys, lambda: _load(tmp_path / "dcp", {"w": torch.zeros(3, 4), "obj": None}))
    assert "UnpicklingError" in line and not marker.exists()


def test_a_fifo_as_dcp_metadata_is_refused_without_blocking(tmp_path, capsys):
    (tmp_path / "dcp").mkdir()
    os.mkfifo(tmp_path / "dcp" / ".metadata")
    line = _friendly_line(capsys, lambda: read_dcp_metadata(tmp_path / "dcp"))
    assert "not a regular file" in line


# ------------------------------------------------------------------ _friendly, via the CLI
BILLION_LAUGHS = "\n".join(
    [f'{n}: &{n} [{", ".join(["*" + p] * 9)}]' for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
)


def test_billion_laughs_config_is_one_line_at_once(tmp_path):
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + BILLION_LAUGHS \
        + "\nteacher: *i\n"
    cfg = tmp_path / "laughs.yaml"
    cfg.write_text(text)
    assert len(text.encode()) < 600
    t0 = time.monotonic()
    res = runner.invoke(cli.app, ["precompute", "--config", str(cfg)])
    _one_error(res, str(cfg), "anchors and aliases", "line 1")
    assert time.monotonic() - t0 < 30


def test_deep_yaml_config_is_one_line(tmp_path):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("teacher: " + "[" * 100_000 + "]" * 100_000 + "\n")
    _one_error(runner.invoke(cli.app, ["precompute", "--config", str(cfg)]), str(cfg), "nested deeper")


def test_a_long_config_value_is_never_echoed_whole(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text("k: [" + ", ".join(["x" * 1000] * 200) + "]\n")
    line = _one_error(runner.invoke(cli.app, ["precompute", "--config", str(cfg)]), "--config")
    assert len(line) < 400


def test_deep_manifest_is_one_line(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    res = runner.invoke(cli.app, ["inspect", str(tmp_path / "s")])
    _one_error(res, str(tmp_path / "s" / "manifest.json"))


@pytest.mark.parametrize("exc, needles", [
    (MemoryError(), ["out of memory", "store verify"]),
    (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                  "file data/3: file write failed"), ["disk is full", "re-run the same command"]),
    (pickle.UnpicklingError("Weights only load failed. Re-running with weights_only=False will "
                            "likely succeed"), ["never run", "delete or replace"]),
])
def test_friendly_turns_input_failures_into_one_line(tmp_path, monkeypatch, exc, needles):
    import kdcache.store.admin as admin

    def fail(root):
        raise exc

    monkeypatch.setattr(admin, "list_stores", fail)
    line = _one_error(runner.invoke(cli.app, ["store", "ls", str(tmp_path)]), *needles)
    assert "weights_only=False" not in line  # never advise unsafe loading


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    import kdcache.store.admin as admin

    def fail(root):
        raise RuntimeError("a bug")

    monkeypatch.setattr(admin, "list_stores", fail)
    res = runner.invoke(cli.app, ["store", "ls", str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
