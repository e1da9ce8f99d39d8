"""Run the same model once: a teacher that is also the reference (same fingerprint) is loaded
once and runs one forward per batch, and a store of sequence log-probs only (DPO) skips the
top-K, the soft values and every model it does not need."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.precompute import PrecomputeConfig, engine, run_precompute
from kdcache.precompute import run as run_mod
from kdcache.precompute.data import DataOptions, data_files, iter_rows, tokenize_rows
from kdcache.precompute.models import load_model
from kdcache.store import open_store
from kdcache.train.tiny import build_tokenizer, save_tiny

TOK = build_tokenizer()
ROWS = [{"id": f"e{i}", "prompt": f"sort {i % 10} 1 2", "chosen": "1 2 " + "3 " * (i % 4),
         "rejected": "3 2 1 " + "a " * (i % 5)} for i in range(9)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("once")
    save_tiny(d / "sft", seed=2)
    save_tiny(d / "sft-copy", seed=2)  # the same weights in another directory
    save_tiny(d / "dpo", seed=1)
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return d


def _cfg(work: Path, **kw) -> PrecomputeConfig:
    base = dict(teacher=str(work / "sft"), reference=str(work / "sft-copy"),
                data=str(work / "prefs.jsonl"), k=5, betas=[1.0, 2.0], batch_tokens=64,
                out_root=str(work / "stores"), codec="lossless", progress=False)
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = run_mod.load_model

    def counting(path, *a, **kw):
        seen.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(run_mod, "load_model", counting)
    return seen


def _sequences(work: Path):
    rows = iter_rows(data_files(str(work / "prefs.jsonl")))
    return [s for g in tokenize_rows(rows, TOK, DataOptions(max_length=2048)) for s in g]


def test_teacher_that_is_the_reference_runs_once_and_equals_two_forwards(work, loads):
    store = open_store(run_precompute(_cfg(work)))
    assert loads == ["sft"]  # one model loaded for both roles (same fingerprint)
    assert set(store.meta.models) == {"dpo", "ref"}  # the store says what it holds
    # two separately loaded models, two forwards: the same numbers to float tolerance
    a = engine.Scorer.from_model(load_model(str(work / "sft"), device="cpu"))
    b = engine.Scorer.from_model(load_model(str(work / "sft-copy"), device="cpu"))
    seqs = _sequences(work)
    want, _ = engine.score_sequences(seqs, a, b, 5, [1.0, 2.0], 0, 2)
    got = {(r["example_id"], r["role"]): r for r in store}
    for s, w in zip(seqs, want, strict=True):
        r = got[(s.example_id, s.role)]
        for key in ("topk_ids", "topk_logprobs", "token_logprob", "soft_value",
                    "ref_topk_logprobs", "ref_token_logprob"):
            np.testing.assert_allclose(r[key], w[key], atol=2e-5, err_msg=key)
        np.testing.assert_array_equal(r["ref_token_logprob"], r["token_logprob"])


def test_sequence_logprobs_only_store_for_dpo(work, loads, tmp_path):
    cfg = _cfg(work, fields=["ref_token_logprob"])
    store = open_store(run_precompute(cfg))
    assert loads == ["sft-copy"]  # only the reference: the teacher's outputs are not stored
    assert store.fields == ["ref_token_logprob"]
    assert (store.meta.k, store.meta.betas, set(store.meta.models)) == (0, [], {"ref"})
    full = {(r["example_id"], r["role"]): r for r in open_store(run_precompute(_cfg(work)))}
    for r in store:
        np.testing.assert_allclose(r["ref_token_logprob"],
                                   full[(r["example_id"], r["role"])]["ref_token_logprob"],
                                   atol=2e-5)
    from kdcache.train.config import TrainConfig
    from kdcache.train.trainer import train

    res = train(TrainConfig(model=str(work / "dpo"), store=store.url, out=str(tmp_path / "run"),
                            objective="dpo", max_steps=1, batch_groups=2, progress=False))
    assert res.steps == 1
    with pytest.raises(ValueError, match="needs stored fields"):  # the trainer checks at start
        train(TrainConfig(model=str(work / "dpo"), store=store.url, out=str(tmp_path / "kd"),
                          objective="kd", max_steps=1, progress=False))


def test_reference_alone_writes_the_dpo_store(work, loads):
    """Issue 23 §6: `--reference R` without a teacher is the DPO store (ref_token_logprob
    only, the reference alone runs), the very store `--teacher T --reference R --fields
    ref_token_logprob` writes (same content key)."""
    alone = run_precompute(_cfg(work, teacher=None, out_root=str(work / "alone")))
    assert loads == ["sft-copy"]
    store = open_store(alone)
    assert store.fields == ["ref_token_logprob"] and set(store.meta.models) == {"ref"}
    both = run_precompute(_cfg(work, teacher=str(work / "dpo"), fields=["ref_token_logprob"],
                               out_root=str(work / "both")))
    assert Path(both).name == Path(alone).name  # the same content key
    res = CliRunner().invoke(cli.app, ["precompute", "--reference", str(work / "sft-copy"), "--data",
                                       str(work / "prefs.jsonl"), "--fields", "ref_token_logprob,token_logprob",
                                       "--out-root", str(work / "never")])
    assert res.exit_code == 2 and "--fields ['token_logprob'] need the teacher" in res.output
    assert not (work / "never").exists()


@pytest.mark.parametrize("args,needle", [
    (["--fields", "topk_ids"], "topk_ids and topk_logprobs go together"),
    (["--fields", "topk_logprob"], "--fields 'topk_logprob': give per-token fields among"),
    (["--fields", "ref_token_logprob"], "are the reference's: pass --reference"),
    (["--fields", "ref_topk_logprobs,ref_token_logprob", "--reference", "REF"],
     "ref_topk_logprobs is read at the teacher's top-K ids"),
    (["--fields", "token_logprob", "--reference", "REF"], "--reference is not used by --fields"),
])
def test_bad_fields(work, tmp_path, args, needle):
    args = [str(work / "sft") if a == "REF" else a for a in args]
    res = CliRunner().invoke(cli.app, ["precompute", "--teacher", str(work / "dpo"), "--data",
                                       str(work / "prefs.jsonl"), "--out-root",
                                       str(tmp_path / "s"), *args])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert needle in line, line
    assert not (tmp_path / "s").exists()
