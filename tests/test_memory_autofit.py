"""Auto-fit (issue 21 §5, issue 23 §1): on CUDA, a step that does not fit runs as smaller
micro-batches with more gradient accumulation, which is the same optimizer step; the trainer
says so in one line, and --no-auto-fit keeps the refusal. A simulated card size stands in
for the GPU."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from test_memory import ONE_LAYER, SHAPE, TINY, _cfg, _real_peak, _tiny_store
from transformers import AutoModelForCausalLM, Qwen2Config

from kdcache.train import memory
from kdcache.train.checkpoint import check_same_run
from kdcache.train.data import next_batches
from kdcache.train.memory import GIB, same_step_splits, split_blocker, synthetic_groups
from kdcache.train.step import Precision, forward_loss
from kdcache.train.student import StudentForward


def test_same_step_splits_keep_the_groups_per_step():
    assert same_step_splits(_cfg(batch_groups=8, grad_accum=1)) == [(4, 2), (2, 4), (1, 8)]
    assert same_step_splits(_cfg(batch_groups=6, grad_accum=2)) == [(3, 4), (2, 6), (1, 12)]
    assert same_step_splits(_cfg(batch_groups=1)) == []


def _grads(cfg, groups, model):
    """The gradient of one optimizer step (train_step's accumulation: loss / n per micro-batch)."""
    model.zero_grad(set_to_none=True)
    batches, _ = next_batches(iter(groups), cfg, 0, (1.0,), torch.device("cpu"), vocab=TINY["vocab_size"])
    student = StudentForward(model, cfg.chunk_size)
    for b in batches:
        loss, _ = forward_loss(student, b, cfg, 1, Precision(bf16=False, device_type="cpu"))
        (loss / len(batches)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("objective,code", [("dckd", False), ("dpo", False), ("sft", False), ("adpa", False),
                                            ("dckd", True)])
def test_a_split_step_has_the_same_gradient_unless_the_loss_is_a_token_mean(objective, code):
    """float64: 4 groups of different lengths as one micro-batch and as 2 x 2 give the same
    gradient for the paper-form losses (a mean of per-sequence terms); the released-code
    DCKD (a token mean over the micro-batch) does not, which is why auto-fit leaves it alone."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**ONE_LAYER, tie_word_embeddings=True)).double()
    cfg = _cfg(objective=objective, batch_groups=4, dckd_released_code=code, adpa_released_code=code)
    groups = [synthetic_groups(cfg, 12 + 7 * i, 3, SHAPE["k"], TINY["vocab_size"], (1.0,), per_block=(1, 2))
              for i in range(4)]
    for g in groups:  # distinct stored values per group
        for r in g:
            for f in ("topk_logprobs", "ref_topk_logprobs", "ref_token_logprob"):
                if f in r:
                    r[f] = r[f] - 0.1 * len(r["response_ids"])
    whole = _grads(cfg, groups, model)
    split = _grads(dataclasses.replace(cfg, batch_groups=2, grad_accum=2), groups, model)
    same = torch.allclose(whole, split, rtol=1e-10, atol=1e-12)
    assert same == (split_blocker(cfg) == ""), (objective, code, (whole - split).abs().max())


@pytest.mark.parametrize("accum", [2, 3, 4, 6])
def test_a_long_accumulation_is_simulated_as_three_micro_batches_plus_inputs(accum):
    """The estimate runs at most 3 micro-batches (the 4th.. repeat the 3rd) and adds the
    inputs of the others: the same peak as the real step of `accum` micro-batches."""
    hf = Qwen2Config(**TINY, tie_word_embeddings=True)
    cfg = _cfg(objective="dckd", batch_groups=1, grad_accum=accum, grad_checkpointing=True)
    real, fake = _real_peak(cfg, hf), memory.simulate(cfg, hf, **SHAPE)
    assert (fake["peak"], fake["breakdown"], fake["phases"]) == (real["peak"], real["breakdown"], real["phases"])
    assert real["peak"] > _real_peak(dataclasses.replace(cfg, grad_accum=1), hf)["peak"]  # grads live in forward 2


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from kdcache.store import open_store

    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memory, "CUDA_CONTEXT", 0)
    monkeypatch.setattr(memory, "FRAGMENTATION", 0.0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**ONE_LAYER, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "m")
    store = open_store(_tiny_store(tmp_path))
    cfg = _cfg(model=str(tmp_path / "m"), objective="dckd", grad_checkpointing=True, batch_groups=4)
    shape = memory.store_shape(store, cfg)
    assert shape["uniform"]
    kw = {k: shape[k] for k in ("seq_len", "prompt_len", "k", "per_block")}
    hf = memory.model_config(cfg)
    peaks = {(b, a): round(memory.estimate_memory(dataclasses.replace(cfg, batch_groups=b, grad_accum=a), hf,
                                                  suggest=False, **kw).peak_gib * GIB)
             for b, a in [(4, 1), (2, 2), (1, 4)]}
    assert peaks[(4, 1)] > peaks[(2, 2)] > peaks[(1, 4)]
    return cfg, store, peaks


def test_fit_check_runs_the_largest_micro_batch_that_fits_and_says_so(setup, caplog):
    cfg, store, peaks = setup
    card = f"{(peaks[(4, 1)] + peaks[(2, 2)]) // 2}B"  # a simulated card: 4 groups do not fit, 2 do
    with caplog.at_level(logging.INFO, logger="kdcache.train.memory"):
        run = memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=card), store)
    assert (run.batch_groups, run.grad_accum) == (2, 2)
    said = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert len(said) == 1 and "--batch-groups 2 --grad-accum 2" in said[0] and "same optimizer step of 4" in said[0]
    tight = memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{peaks[(1, 4)] + 1}B"), store)
    assert (tight.batch_groups, tight.grad_accum) == (1, 4)
    roomy = memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{peaks[(4, 1)] + 1}B"), store)
    assert (roomy.batch_groups, roomy.grad_accum) == (4, 1)


def test_no_auto_fit_refuses_and_so_do_token_mean_losses(setup):
    cfg, store, peaks = setup
    card = f"{(peaks[(4, 1)] + peaks[(2, 2)]) // 2}B"
    with pytest.raises(ValueError, match="does not fit the GPU; nothing was loaded") as e:
        memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=card, auto_fit=False), store)
    assert "DOES NOT FIT" in str(e.value) and "--batch-groups 1 --grad-accum 4" in str(e.value)  # suggested
    with pytest.raises(ValueError, match="released-code loss is a token mean"):
        memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=card, dckd_released_code=True), store)
    with pytest.raises(ValueError, match="no smaller micro-batch fits"):
        memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{peaks[(1, 4)] // 2}B"), store)


def test_estimate_shows_what_the_trainer_runs_and_require_fit_accepts_it(setup):
    cfg, _store, peaks = setup
    hf = memory.model_config(cfg)
    kw = dict(seq_len=35, prompt_len=4, k=3, gpu_bytes=(peaks[(4, 1)] + peaks[(2, 2)]) // 2)
    est = memory.estimate_memory(cfg, hf, auto_fit=True, **kw)
    assert not est.fits and est.runs and est.to_dict()["runs"]
    assert est.auto_fit.changes == {"batch_groups": 2, "grad_accum": 2} and not est.switches
    assert "auto-fit: the trainer runs it as --batch-groups 2 --grad-accum 2" in est.format()
    off = memory.estimate_memory(cfg, hf, auto_fit=False, **kw)
    assert not off.runs and off.switches and "auto-fit" not in off.format()


def test_unequal_groups_block_the_split(tmp_path):
    import numpy as np

    from kdcache.store import StoreMeta, StoreWriter, open_store

    meta = StoreMeta(k=3, fields=["topk_ids", "topk_logprobs", "behavior_logprob"],
                     tokenizer={"vocab_size": TINY["vocab_size"]}, options={"codec": "lossless"}, code_version="test")
    with StoreWriter(str(tmp_path / "s"), meta) as w:
        for e, g in enumerate((2, 3)):  # 2 rollouts of one prompt, 3 of the other
            w.add_group([{"example_id": f"e{e}", "role": "student_rollout", "group": i,
                          "prompt_ids": np.arange(3, dtype=np.int32) + 6, "response_ids": np.arange(5, dtype=np.int32) + 6,
                          "teacher_prompt_ids": None, "is_terminal": True, "reward": 1.0,
                          "topk_ids": np.zeros((5, 3), np.int32), "topk_logprobs": np.full((5, 3), -2.0, np.float32),
                          "behavior_logprob": np.full(5, -1.0, np.float32)} for i in range(g)])
    shape = memory.store_shape(open_store(str(tmp_path / "s")), _cfg(objective="tgpo"))
    assert not shape["uniform"] and shape["per_block"] == (3,)
    assert "unequal numbers of records" in split_blocker(_cfg(objective="tgpo"), shape["uniform"])


def test_resume_keeps_the_split_the_run_was_fitted_to(tmp_path):
    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    cfg = _cfg(objective="dckd", out=str(out), batch_groups=8, grad_accum=1)
    dataclasses.replace(cfg, batch_groups=2, grad_accum=4).save(out / "last" / "config.yaml")
    again = check_same_run(cfg, out)
    assert (again.batch_groups, again.grad_accum) == (2, 4)
    with pytest.raises(ValueError, match="different settings"):
        check_same_run(dataclasses.replace(cfg, batch_groups=4), out)  # another step: refused


def test_switch_list_unchanged_for_split_names():
    # the suggestion of a 1-group micro-batch stays among the switches, for --no-auto-fit
    names = [n for n, _, _ in memory._switches(_cfg(batch_groups=8, grad_accum=1))]
    assert "micro-batch of 1 group" in names
