"""Several stores through the trainer (METHODS §4): a mixture resumes bitwise after every step
and is deterministic for a seed; an ensemble trains end to end (also from the CLI) and
resumes bitwise; stores that cannot be mixed or ensembled are refused up front, naming the
store; one store keeps its checkpoint format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdcache.store import StoreMeta, StoreWriter
from kdcache.train.checkpoint import load_state
from kdcache.train.config import TrainConfig
from kdcache.train.tiny import build_tokenizer, save_tiny
from kdcache.train.trainer import train

K = 3
STEPS = 6


def write_store(url, tok, seed, n_groups, fields=("topk_ids", "topk_logprobs"), vocab=None, k=K, same_as=None):
    """Pairs with random teacher fields; `same_as`: the sequences of another store's seed
    (the same examples scored by another teacher)."""
    rng, seq_rng = np.random.default_rng(seed), np.random.default_rng(seed if same_as is None else same_as)
    meta = StoreMeta(k=k, fields=list(fields), tokenizer={"vocab_size": vocab or len(tok)},
                     options={"codec": "lossless"}, code_version="test")
    with StoreWriter(url, meta, shard_records=4) as w:
        for e in range(n_groups):
            group = []
            for role in ("chosen", "rejected"):
                T = int(seq_rng.integers(1, 4))
                rec = {"example_id": f"e{e}", "role": role, "group": 0,
                       "prompt_ids": seq_rng.integers(6, len(tok), size=2).astype(np.int32),
                       "response_ids": seq_rng.integers(6, len(tok), size=T).astype(np.int32),
                       "teacher_prompt_ids": None, "is_terminal": True, "reward": None}
                rec["topk_ids"] = np.stack([rng.permutation(len(tok))[:k] for _ in range(T)]).astype(np.int32)
                rec["topk_logprobs"] = -np.sort(rng.uniform(1.2, 4.0, size=(T, k)), axis=-1).astype(np.float32)
                group.append({f: v for f, v in rec.items() if f not in ("topk_ids", "topk_logprobs") or f in fields})
            w.add_group(group)
    return url


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    tok = build_tokenizer()
    model = str(save_tiny(root / "student", tok, hidden=16, layers=1, heads=2))
    stores = {"a": write_store(str(root / "a"), tok, 0, 5), "b": write_store(str(root / "b"), tok, 1, 3),
              "a2": write_store(str(root / "a2"), tok, 2, 5, same_as=0),
              "other": write_store(str(root / "other"), tok, 3, 5),
              "nofields": write_store(str(root / "nofields"), tok, 4, 3, fields=()),
              "vocab": write_store(str(root / "vocab"), tok, 5, 3, vocab=len(tok) - 1),
              "k4": write_store(str(root / "k4"), tok, 6, 3, k=4)}
    return model, stores


def _cfg(setup, out, stores, **kw):
    model, urls = setup
    return TrainConfig(**{"model": model, "store": [urls[s] for s in stores], "out": str(out), "objective": "dckd",
                          "max_steps": STEPS, "batch_groups": 2, "lr": 1e-2, "chunk_size": 4, "progress": False,
                          "log_every": 1, "warmup_steps": 2, **kw})


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_ref(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "run"
    train(_cfg(setup, out, ["a", "b"], store_weights=[0.3, 0.7]))
    return _weights(out), _losses(out)


@pytest.mark.parametrize("stop", range(1, STEPS + 1))
def test_mixture_resumes_bitwise_after_every_step(setup, mixed_ref, tmp_path, stop):
    cfg = _cfg(setup, tmp_path / "run", ["a", "b"], store_weights=[0.3, 0.7])
    train(cfg, stop_after=stop)
    state = load_state(tmp_path / "run")["reader"]
    assert state["draws"] == 2 * stop and len(state["stores"]) == 2
    train(cfg)
    ref_w, ref_loss = mixed_ref
    got = _weights(tmp_path / "run")
    assert all(torch.equal(ref_w[k], got[k]) for k in ref_w), stop
    assert _losses(tmp_path / "run") == ref_loss


def test_mixture_is_deterministic_for_a_seed(setup, mixed_ref, tmp_path):
    train(_cfg(setup, tmp_path / "again", ["a", "b"], store_weights=[0.3, 0.7]))
    assert _losses(tmp_path / "again") == mixed_ref[1]
    train(_cfg(setup, tmp_path / "seed1", ["a", "b"], store_weights=[0.3, 0.7], seed=1))
    assert _losses(tmp_path / "seed1") != mixed_ref[1]


def test_one_store_keeps_its_reader_state(setup, tmp_path):
    train(_cfg(setup, tmp_path / "run", ["a"], max_steps=2))
    assert set(load_state(tmp_path / "run")["reader"]) == {"epoch", "seed", "consumed"}


def test_ensemble_trains_and_resumes_bitwise(setup, tmp_path):
    full = tmp_path / "full"
    train(_cfg(setup, full, ["a", "a2"], ensemble=True, store_weights=[0.6, 0.4]))
    part = tmp_path / "part"
    cfg = _cfg(setup, part, ["a", "a2"], ensemble=True, store_weights=[0.6, 0.4])
    train(cfg, stop_after=3)
    train(cfg)
    ref, got = _weights(full), _weights(part)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # weights (1, 0): the first teacher's run, step for step
    one = tmp_path / "one"
    train(_cfg(setup, one, ["a"]))
    first = tmp_path / "first"
    train(_cfg(setup, first, ["a", "a2"], ensemble=True, store_weights=[1, 0]))
    assert np.allclose(_losses(first), _losses(one), rtol=1e-6)


def test_ensemble_from_the_cli(setup, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import app

    model, urls = setup
    res = CliRunner().invoke(app, ["train", "--model", model, "--store", urls["a"], "--store", urls["a2"],
                                   "--ensemble", "--objective", "kd", "--max-steps", "2", "--batch-groups", "2",
                                   "--out", str(tmp_path / "cli"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model").exists()
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "ensemble: true" in saved and urls["a2"] in saved


@pytest.mark.parametrize("stores,kw,msg", [
    (["a", "other"], {"ensemble": True}, r"store '.*other' does not score the same sequences as '.*a': at "
                                         r"example_id 'e\d', role 'chosen', (response|prompt)_ids"),
    (["a", "b"], {"ensemble": True}, r"store '.*b' has 2 shards and '.*a' 3"),
    (["a", "nofields"], {}, r"needs stored fields \['topk_ids', 'topk_logprobs'\], which store '.*nofields' lacks"),
    (["a", "vocab"], {}, r"store '.*vocab' was scored with another tokenizer than '.*a'"),
    (["a", "k4"], {}, r"store '.*k4' holds top-4 and '.*a' top-3"),
    (["a", "a2"], {"ensemble": True, "objective": "dpo"}, r"--ensemble with objective 'dpo': one reference per pair"),
])
def test_refused_up_front_naming_the_store(setup, tmp_path, stores, kw, msg):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=msg):
        train(_cfg(setup, out, stores, **kw))
    assert not out.exists()


def test_estimate_memory_reads_every_store(setup, tmp_path, monkeypatch):
    """`--estimate-memory` with an ensemble of J stores simulates the J x K wide union."""
    from kdcache.train.memory import estimate_for_cli

    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    est = estimate_for_cli(_cfg(setup, tmp_path / "run", ["a", "a2"], ensemble=True, objective="kd",
                                gpu_memory="24GiB"))
    assert est.config["teachers"] == 2 and est.k == K and est.fits
    mix = estimate_for_cli(_cfg(setup, tmp_path / "run", ["a", "k4"], objective="kd", gpu_memory="24GiB"))
    assert "teachers" not in mix.config and mix.k == 4  # a mixture's groups come from one store each
