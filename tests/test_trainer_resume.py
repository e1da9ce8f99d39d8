"""Resume at every step: a run stopped after ANY step (epoch boundaries and the last step
included) and resumed ends bitwise equal to an uninterrupted run; a run killed between
checkpoints resumes from the last one and logs each step once; refused and failed runs leave
nothing behind."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdcache.store import StoreMeta, StoreWriter
from kdcache.train import step as step_mod
from kdcache.train import trainer as trainer_mod
from kdcache.train.config import TrainConfig
from kdcache.train.tiny import build_tokenizer, save_tiny
from kdcache.train.trainer import train

K = 3
STEPS = 7  # 3 steps per epoch below: boundaries after steps 3 and 6, the run ends mid-epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = build_tokenizer()
    model_dir = save_tiny(root / "student", tok, hidden=16, layers=1, heads=2)
    rng = np.random.default_rng(0)
    meta = StoreMeta(k=K, fields=["topk_ids", "topk_logprobs"], tokenizer={"vocab_size": len(tok)},
                     options={"codec": "lossless"}, code_version="test")
    url = str(root / "store")
    with StoreWriter(url, meta, shard_records=4) as w:  # 6 groups of 2: several shards
        for e in range(6):
            group = []
            for role in ("chosen", "rejected"):
                T = int(rng.integers(1, 4))
                ids = np.stack([rng.permutation(len(tok))[:K] for _ in range(T)]).astype(np.int32)
                lp = -np.sort(rng.uniform(1.2, 4.0, size=(T, K)), axis=-1).astype(np.float32)  # descending, mass < 1
                group.append({"example_id": f"e{e}", "role": role, "group": 0,
                              "prompt_ids": rng.integers(6, len(tok), size=2).astype(np.int32),
                              "response_ids": rng.integers(6, len(tok), size=T).astype(np.int32),
                              "teacher_prompt_ids": None, "is_terminal": True, "reward": None,
                              "topk_ids": ids, "topk_logprobs": lp})
            w.add_group(group)
    return str(model_dir), url


def _cfg(setup, out, **kw):
    model, url = setup
    return TrainConfig(**{"model": model, "store": url, "out": str(out), "objective": "dckd",
                          "max_steps": STEPS, "batch_groups": 2, "lr": 1e-2, "chunk_size": 4,
                          "progress": False, "log_every": 1, "warmup_steps": 2, **kw})


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def _steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_cfg(setup, out))
    return _weights(out), (out / "metrics.jsonl").read_text().splitlines()


@pytest.mark.parametrize("stop", range(1, STEPS + 1))
def test_stop_and_resume_after_every_step(setup, reference, tmp_path, stop):
    cfg = _cfg(setup, tmp_path / "run")
    first = train(cfg, stop_after=stop)
    assert first.steps == stop
    res = train(cfg)
    assert res.steps == STEPS
    ref_w, ref_log = reference
    got = _weights(tmp_path / "run")
    for k in ref_w:
        assert torch.equal(ref_w[k], got[k]), (stop, k)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [json.loads(x)["loss"] for x in ref_log]


@pytest.mark.parametrize("save_every,kill_at", [(2, 5), (3, 3), (3, 4), (1, 6)])
def test_killed_between_checkpoints_resumes_and_logs_each_step_once(setup, reference, tmp_path,
                                                                    monkeypatch, save_every, kill_at):
    """A crash after step `kill_at` (its log row written, no checkpoint for it) resumes from
    the last save; metrics.jsonl then holds every step exactly once."""
    cfg = _cfg(setup, tmp_path / "run", save_every=save_every)
    real = step_mod.train_step
    calls = {"n": 0}

    def crashing(*a, **kw):
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "train_step", real)
    train(cfg)
    assert _steps_logged(tmp_path / "run") == list(range(1, STEPS + 1))
    ref_w, _ = reference
    got = _weights(tmp_path / "run")
    assert all(torch.equal(ref_w[k], got[k]) for k in ref_w)


def test_finished_run_is_not_rerun(setup, tmp_path):
    cfg = _cfg(setup, tmp_path / "run")
    a = train(cfg)
    mtime = (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns
    b = train(cfg)
    assert (b.steps, b.tokens, b.final_loss) == (a.steps, a.tokens, a.final_loss)
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    assert _steps_logged(tmp_path / "run") == list(range(1, STEPS + 1))


def test_failure_before_the_first_checkpoint_leaves_nothing(setup, tmp_path, monkeypatch):
    out = tmp_path / "new"

    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_mod, "train_step", boom)
    with pytest.raises(RuntimeError):
        train(_cfg(setup, out))
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError):
        train(_cfg(setup, existing))
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("bad,msg", [
    ({"max_steps": -5}, r"--max-steps -5: must be >= 0"),
    ({"max_steps": 0, "epochs": 0}, r"--epochs 0: must be > 0"),
    ({"lora_r": -1}, r"--lora-r -1: must be >= 0"),
    ({"lr": 0}, r"--lr 0: must be > 0"),
    ({"optim": "sgd"}, r"--optim 'sgd': use one of adamw, adamw8bit"),
    ({"chunk_size": 0}, r"--chunk-size 0: must be >= 1"),
])
def test_nonsense_options_are_refused_before_anything_is_written(setup, tmp_path, bad, msg):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=msg):
        train(_cfg(setup, out, **bad))
    assert not out.exists()


def test_train_checks_its_config_once(setup, tmp_path, monkeypatch):
    """validated() runs where the run enters; nothing below it checks again."""
    calls = []
    real = TrainConfig.validated
    monkeypatch.setattr(TrainConfig, "validated", lambda self, **kw: calls.append(kw) or real(self, **kw))
    train(_cfg(setup, tmp_path / "run", max_steps=2))
    assert calls == [{}]


def test_a_run_saved_under_an_old_option_name_resumes(setup, tmp_path):
    """A run directory written before dckd_reference_code was renamed dckd_released_code (its
    config.yaml files hold the old key) resumes, bitwise as an uninterrupted run, and is still
    refused when the option's value differs."""
    ref = tmp_path / "ref"
    train(_cfg(setup, ref, dckd_released_code=True))
    out = tmp_path / "run"
    cfg = _cfg(setup, out, dckd_released_code=True)
    train(cfg, stop_after=3)
    for path in (out / "config.yaml", out / "last" / "config.yaml"):  # as the old version wrote them
        text = path.read_text()
        assert text.count("dckd_released_code: true") == 1
        path.write_text(text.replace("dckd_released_code:", "dckd_reference_code:"))
    with pytest.raises(ValueError, match=r"different settings \(dckd_released_code\)"):
        train(dataclasses.replace(cfg, dckd_released_code=False))
    res = train(cfg)
    assert res.steps == STEPS
    want, got = _weights(ref), _weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "dckd_released_code: true" in (out / "last" / "config.yaml").read_text()  # saved under today's name
