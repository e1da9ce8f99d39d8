"""Trainer: every objective runs from a store, checkpoints load with from_pretrained, the
chunked student forward equals full-logits log-probs, and stop+resume is bitwise exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.cli import make_config
from kdcache.store import StoreMeta, StoreWriter
from kdcache.train.batch import collate
from kdcache.train.config import OBJECTIVES, TrainConfig
from kdcache.train.student import StudentForward, student_forward
from kdcache.train.tiny import build_tokenizer, save_tiny
from kdcache.train.trainer import train

K, BETAS = 4, [1.0, 2.0]
FIELDS = ["topk_ids", "topk_logprobs", "token_logprob", "ref_topk_logprobs",
          "ref_token_logprob", "soft_value", "behavior_logprob"]


def _record(rng, eid, role, group, vocab, eos, reward=None):
    P, T = int(rng.integers(2, 5)), int(rng.integers(1, 6))
    resp = rng.integers(6, vocab, size=T).astype(np.int32)
    resp[-1] = eos
    logits = rng.normal(size=(T + 1, vocab))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp[:T], axis=-1)[:, :K].astype(np.int32)
    ref = lp[:T] + rng.normal(scale=0.3, size=(T, vocab))
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    return {
        "example_id": eid, "role": role, "group": group,
        "prompt_ids": rng.integers(6, vocab, size=P).astype(np.int32), "response_ids": resp,
        "teacher_prompt_ids": None, "is_terminal": True, "reward": reward,
        "topk_ids": ids,
        "topk_logprobs": np.take_along_axis(lp[:T], ids, -1).astype(np.float32),
        "token_logprob": lp[np.arange(T), resp].astype(np.float32),
        "ref_topk_logprobs": np.take_along_axis(ref, ids, -1).astype(np.float32),
        "ref_token_logprob": ref[np.arange(T), resp].astype(np.float32),
        "soft_value": np.stack([b * np.log(np.exp(logits / b).sum(-1)) for b in BETAS], -1).astype(np.float32),
        "behavior_logprob": (lp[np.arange(T), resp] - 0.1).astype(np.float32),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    tok = build_tokenizer()
    model_dir = save_tiny(root / "student", tok, hidden=32, layers=1, heads=2)
    rng = np.random.default_rng(0)
    meta = StoreMeta(k=K, betas=BETAS, fields=FIELDS, models={}, tokenizer={"vocab_size": len(tok)},
                     dataset={}, options={"codec": "lossless"}, code_version="test")
    url = str(root / "store")
    with StoreWriter(url, meta, shard_records=12) as w:
        for e in range(16):
            group = [_record(rng, f"ex{e}", "chosen", 0, len(tok), tok.eos_token_id),
                     _record(rng, f"ex{e}", "rejected", 0, len(tok), tok.eos_token_id)]
            for g in range(2):
                group.append(_record(rng, f"ex{e}", "student_rollout", g, len(tok), tok.eos_token_id,
                                     reward=float(rng.integers(0, 2))))
                group.append(_record(rng, f"ex{e}", "teacher_rollout", g, len(tok), tok.eos_token_id))
            w.add_group(group)
    return model_dir, url, root


def _cfg(setup, objective, out, **kw):
    model_dir, url, _ = setup
    base = dict(model=str(model_dir), store=url, out=str(out), objective=objective, max_steps=2,
                batch_groups=2, lr=1e-3, chunk_size=5, progress=False, log_every=1, tvkd_beta=2.0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_and_exports(setup, objective, tmp_path):
    res = train(_cfg(setup, objective, tmp_path / objective))
    assert res.steps == 2 and np.isfinite(res.final_loss)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / objective / "model")
    assert model.config.vocab_size == len(build_tokenizer())
    assert (tmp_path / objective / "config.yaml").exists()


def test_packed_training_matches_padded(setup, tmp_path):
    a = train(_cfg(setup, "dckd", tmp_path / "pad"))
    b = train(_cfg(setup, "dckd", tmp_path / "pack", packing=True))
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-4)


def test_lora_and_grad_checkpointing(setup, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="kdcache.train.trainer"):
        res = train(_cfg(setup, "adpa", tmp_path / "lora", lora_r=4, lora_targets=["q_proj", "v_proj"],
                         grad_checkpointing=True))
    assert res.steps == 2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")  # merged, plain HF
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA r=4")]
    # A [r, in] and B [out, r] per adapted linear layer
    lora = sum(4 * (m.in_features + m.out_features) for n, m in merged.named_modules()
               if n.endswith(("q_proj", "v_proj")))
    base = sum(p.numel() for p in merged.parameters())
    assert f"{lora:,} trainable parameters of {base + lora:,}" in line and "merged" in line


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_student_forward_equals_full_logits(setup, dtype, packed):
    model_dir, url, _ = setup
    from kdcache.store import open_store

    records = next(open_store(url).groups())[:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(dtype)
    out = student_forward(model, collate(records, packed=packed), chunk_size=3)
    batch = collate(records)  # the reference: each sequence in its own padded row
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    lp = logits.log_softmax(-1)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for s, r in enumerate(records):
        P, T = len(r["prompt_ids"]), len(r["response_ids"])
        ref = lp[s, P - 1 : P - 1 + T]
        ids = torch.tensor(np.array(r["response_ids"]), dtype=torch.long)
        torch.testing.assert_close(out.token_logprobs[s, :T].double(), ref.gather(-1, ids[:, None])[:, 0], atol=tol, rtol=0)
        topk = torch.tensor(np.array(r["topk_ids"]), dtype=torch.long)
        torch.testing.assert_close(out.topk_logprobs[s, :T].double(), ref.gather(-1, topk), atol=tol, rtol=0)


def test_the_student_module_is_student_forward_and_adds_no_state(setup):
    """StudentForward, the one form every step calls: the output of student_forward, the
    model's parameters in their order (optimizer states and checkpoints carry over) and its
    state-dict keys under `model.` (what the FSDP export strips)."""
    model_dir, url, _ = setup
    from kdcache.store import open_store

    records = next(open_store(url).groups())[:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    student, batch = StudentForward(model, chunk_size=3), collate(records)
    got, want = student(batch), student_forward(model, batch, chunk_size=3)
    assert torch.equal(got.token_logprobs, want.token_logprobs)
    assert torch.equal(got.topk_logprobs, want.topk_logprobs)
    assert [id(p) for p in student.parameters()] == [id(p) for p in model.parameters()]
    assert list(student.state_dict()) == [f"{StudentForward.KEY_PREFIX}{k}" for k in model.state_dict()]
    assert StudentForward.KEY_PREFIX == "model."  # FSDP exports of earlier runs stripped this


@pytest.mark.parametrize("objective", ["dckd", "adpa"])
def test_resume_is_bitwise_identical(setup, objective, tmp_path):
    full = train(_cfg(setup, objective, tmp_path / "full", max_steps=4))
    part = _cfg(setup, objective, tmp_path / "part", max_steps=4)
    train(part, stop_after=2)
    resumed = train(part)
    assert full.steps == resumed.steps == 4
    assert resumed.seconds > 0 and train(part).seconds == pytest.approx(resumed.seconds, rel=0.5)  # a finished run reports its own time
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "part" / "model").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_missing_fields_error(setup, tmp_path):
    model_dir, _, root = setup
    meta = StoreMeta(k=K, betas=BETAS, fields=[], models={}, tokenizer={}, dataset={},
                     options={"codec": "lossless"}, code_version="test")
    url = str(root / "bare")
    rng = np.random.default_rng(1)
    with StoreWriter(url, meta) as w:
        r = _record(rng, "a", "chosen", 0, 52, 2)
        w.add_group([{k: v for k, v in r.items() if k not in FIELDS}])
    with pytest.raises(ValueError, match="needs stored fields"):
        train(TrainConfig(model=str(model_dir), store=url, out=str(tmp_path / "x"), objective="dckd"))


def test_vocab_mismatch_names_both_sizes(setup, tmp_path):
    _, url, root = setup
    other = save_tiny(root / "other-vocab", build_tokenizer(words=["x", "y"]), hidden=32, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"teacher vocab 52 != student vocab 8: .*shares the teachers' tokenizer"):
        train(TrainConfig(model=str(other), store=url, out=str(tmp_path / "v"), objective="sft", max_steps=1))


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("objective: dckd\nlr: 0.5\ndckd_alpha: 1.0\n")
    cfg = make_config("train", TrainConfig, f, {"lr": 0.1, "dckd_alpha": None})
    assert (cfg.objective, cfg.lr, cfg.dckd_alpha) == ("dckd", 0.1, 1.0)
    f.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        make_config("train", TrainConfig, f, {})


def test_resume_refuses_a_different_run(setup, tmp_path):
    train(_cfg(setup, "sft", tmp_path / "r", max_steps=2))
    with pytest.raises(ValueError, match="different settings \\(lr\\)"):
        train(_cfg(setup, "sft", tmp_path / "r", max_steps=2, lr=0.5))
    res = train(_cfg(setup, "sft", tmp_path / "r", max_steps=2, lr=0.5, resume=False))
    assert res.steps == 2


def test_tgpo_guidance_schedule_continues_across_rounds(setup, tmp_path):
    from kdcache.train.losses import guidance_weight

    out = tmp_path / "tg"
    train(_cfg(setup, "tgpo", out, max_steps=1, tgpo_step_offset=150, tgpo_w_init=2e-3, tgpo_delta=1e-5))
    import json

    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["w"] == pytest.approx(guidance_weight(150))


def test_tvkd_beta_defaults_to_the_store_s_only_beta(setup, tmp_path, caplog):
    """Issue 23 §6: a default TVKD run works on a store of one β (precompute --betas defaults
    to 1) and says which β it took; a store of several asks for --tvkd-beta, naming them."""
    import logging

    import yaml

    model_dir, url, _ = setup
    tok = build_tokenizer()
    rng = np.random.default_rng(1)
    meta = StoreMeta(k=K, betas=[1.0], fields=FIELDS, models={}, tokenizer={"vocab_size": len(tok)},
                     dataset={}, options={"codec": "lossless"}, code_version="test")
    one = str(tmp_path / "one-beta")
    with StoreWriter(one, meta) as w:
        for e in range(4):
            recs = [_record(rng, f"ex{e}", role, 0, len(tok), tok.eos_token_id) for role in ("chosen", "rejected")]
            for r in recs:
                r["soft_value"] = r["soft_value"][:, :1]
            w.add_group(recs)
    with caplog.at_level(logging.INFO, logger="kdcache.train.trainer"):
        res = train(_cfg(setup, "tvkd", tmp_path / "run", store=one, tvkd_beta=None))
    assert res.steps == 2
    assert any("beta 1, the store's only soft-value beta" in r.getMessage() for r in caplog.records)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["tvkd_beta"] == 1.0
    with pytest.raises(ValueError, match=r"holds soft values at betas \[1.0, 2.0\]: pick one with --tvkd-beta"):
        train(_cfg(setup, "tvkd", tmp_path / "two", tvkd_beta=None))
    with pytest.raises(ValueError, match=r"--tvkd-beta 2.0 is not among the store's soft-value betas \[1.0\]"):
        train(_cfg(setup, "tvkd", tmp_path / "three", store=one, tvkd_beta=2.0))
    assert not (tmp_path / "two").exists() and not (tmp_path / "three").exists()


def test_tvkd_maxent_reads_the_reference(setup, tmp_path):
    """--tvkd-maxent trains on log pi_theta - log pi_ref: the reader must load
    ref_token_logprob (it once read only soft_value, and MaxEnt silently trained the plain
    form), and a store without it is refused up front."""
    plain = train(_cfg(setup, "tvkd", tmp_path / "plain", max_steps=1))
    maxent = train(_cfg(setup, "tvkd", tmp_path / "maxent", max_steps=1, tvkd_maxent=True))
    assert np.isfinite(maxent.final_loss) and maxent.final_loss != plain.final_loss
    model_dir, _, root = setup
    meta = StoreMeta(k=K, betas=BETAS, fields=["soft_value"], models={}, tokenizer={}, dataset={},
                     options={"codec": "lossless"}, code_version="test")
    url = str(root / "values-only")
    rng = np.random.default_rng(2)
    with StoreWriter(url, meta) as w:
        for e in range(2):
            w.add_group([{k: v for k, v in _record(rng, f"v{e}", role, 0, 52, 2).items()
                          if k not in FIELDS or k == "soft_value"} for role in ("chosen", "rejected")])
    with pytest.raises(ValueError, match=r"needs stored fields \['ref_token_logprob'\]"):
        train(TrainConfig(model=str(model_dir), store=url, out=str(tmp_path / "x"), objective="tvkd",
                          tvkd_beta=2.0, tvkd_maxent=True))
