"""The memory estimate of a student with another tokenizer (`--cross-tokenizer map|uld`,
METHODS §5): the synthetic batch carries what the cross-tokenizer data path gives collate,
the fake step equals the same step measured on real tensors, the extra work shows in the
peak, and the trainer's shape is in student tokens (the store's, scaled by the measured
student/teacher ratio)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from kdcache.precompute import PrecomputeConfig, run_precompute
from kdcache.store import open_store
from kdcache.train.config import TrainConfig
from kdcache.train.data import next_batches
from kdcache.train.memory import (
    XTOK_RATIO,
    StorageTracker,
    XtokShape,
    batch_tensors,
    estimate_memory,
    measure_step,
    simulate,
    store_shape,
    synthetic_groups,
    xtok_translate,
)
from kdcache.train.objectives import objective_fields
from kdcache.train.optim import make_optimizer
from kdcache.train.step import Precision
from kdcache.train.student import prepare_student
from kdcache.train.tiny import build_split_tokenizer, build_tokenizer, save_tiny
from kdcache.train.xtok.setup import store_tokenizer
from kdcache.train.xtok.translate import CrossTokenizer
from kdcache.train.xtok.vocab_map import build_map

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=300, max_position_embeddings=128)
SHAPE = dict(seq_len=40, prompt_len=8, k=5)
# (objective, mode): what --cross-tokenizer accepts (config.check_cross_tokenizer, xtok/setup.REFUSED)
RUNS = [("kd", "map"), ("kd", "uld"), ("dckd", "map"), ("dckd", "uld"), ("adpa", "map"), ("dpo", "map")]


def _cfg(objective: str, mode: str, **kw) -> TrainConfig:
    base = dict(model="tiny", store="none", objective=objective, batch_groups=2, chunk_size=16, lr=1e-3,
                weights_dtype="fp32", bf16=False, progress=False, cross_tokenizer=mode, kd_mode="tail")
    return TrainConfig(**{**base, **kw})


def _real_peak(cfg: TrainConfig, hf_config) -> tuple[dict, list]:
    """The tracker around the same step, on a real model and real (CPU) tensors."""
    torch.manual_seed(0)
    model = prepare_student(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32), cfg)
    model.train()
    group = synthetic_groups(cfg, SHAPE["seq_len"], SHAPE["prompt_len"], SHAPE["k"], hf_config.vocab_size, (1.0,))
    batches, _ = next_batches(itertools.repeat(group), cfg, 0, (1.0,), torch.device("cpu"),
                              translate=xtok_translate(cfg, SHAPE["k"]))
    tracker = StorageTracker()
    tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    tracker.register(batch_tensors(batches), "inputs")
    precision = Precision(bf16=False, device_type="cpu", cache=not cfg.grad_checkpointing)
    with tracker:
        res = measure_step(model, cfg, batches, precision,
                           lambda ps: make_optimizer(cfg.optim_settings, ps, device_type="cuda"), tracker)
    return res, batches


@pytest.mark.parametrize("objective,mode", RUNS)
@pytest.mark.parametrize("ckpt", [False, True])
def test_real_and_fake_cross_tokenizer_step_have_the_same_peak(objective, mode, ckpt):
    """The estimate runs the cross-tokenizer step itself: the fake run and the real CPU run
    of that step agree exactly (the tolerance of tests/test_memory.py), and the batch is
    what the run's step gets (ULD: the own top-K pass and the ULD inputs; map: the slots)."""
    hf = Qwen2Config(**TINY, tie_word_embeddings=True)
    cfg = _cfg(objective, mode, grad_checkpointing=ckpt)
    real, batches = _real_peak(cfg, hf)
    fake = simulate(cfg, hf, **SHAPE)
    assert real["peak"] > 0
    assert fake["peak"] == real["peak"]
    assert fake["breakdown"] == real["breakdown"]
    assert fake["peak_where"] == real["peak_where"]
    assert fake["phases"] == real["phases"]
    b = batches[0]
    assert "xtok_aligned" in b.stored
    if mode == "uld":
        assert b.own_topk == SHAPE["k"] and "uld_teacher" in b.stored and "topk_ids" not in b.stored
    elif "topk_ids" in objective_fields(cfg):
        assert b.own_topk == 0 and b.stored["xtok_slots"].shape == b.stored["topk_ids"].shape


@pytest.mark.parametrize("objective,mode", RUNS)
def test_cross_tokenizer_estimate_is_not_the_same_tokenizer_one(objective, mode):
    """At the same student lengths the map step holds at least what the same-tokenizer step
    holds (the same inputs plus the slot and alignment masks, and the where); the ULD step
    is another step (the own top-K pass, ULD's sort, no stored top-K ids), so another peak.
    The estimate says which path it ran."""
    hf = Qwen2Config(**TINY, tie_word_embeddings=True)
    xt = _cfg(objective, mode)
    same = dataclasses.replace(xt, cross_tokenizer="off")
    a, b = simulate(xt, hf, **SHAPE), simulate(same, hf, **SHAPE)
    if mode == "map":
        assert a["breakdown"]["inputs"] > b["breakdown"]["inputs"]
        assert a["peak"] >= b["peak"]
        if "topk_ids" in objective_fields(xt):
            assert a["peak"] > b["peak"]
    else:
        assert a["peak"] != b["peak"]
    est = estimate_memory(xt, hf, gpu_bytes=2**30, cache=False, xtok_ratio="x1.200 measured", **SHAPE)
    assert est.config["cross_tokenizer"] == mode and f"cross_tokenizer={mode}" in est.format()
    assert "student_tokens=x1.200 measured" in est.format()


def test_tvkd_is_refused_as_the_run_refuses_it():
    hf = Qwen2Config(**TINY)
    with pytest.raises(ValueError, match="--cross-tokenizer with --objective tvkd"):
        simulate(_cfg("tvkd", "map"), hf, **SHAPE)


# ------------------------------------------------------------------ against the real data path
ROWS = [{"id": f"e{i}", "prompt": f"sort : {i % 10} 1 2", "chosen": "1 2 " + f"{i % 10}" * (1 + i),
         "rejected": f"{i % 10} 2 1 a"} for i in range(6)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtokmem")
    save_tiny(d / "teacher", build_tokenizer(), hidden=32, layers=1, heads=2, seed=1)
    save_tiny(d / "split", build_split_tokenizer(), hidden=32, layers=1, heads=2, seed=3)
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    url = run_precompute(PrecomputeConfig(
        teacher=str(d / "teacher"), reference=str(d / "teacher"), data=str(d / "prefs.jsonl"), k=5,
        betas=[1.0], out_root=str(d / "stores"), progress=False, codec="lossless"))
    return d, url


@pytest.mark.parametrize("objective,mode", RUNS)
def test_synthetic_translation_has_the_fields_of_the_real_one(work, objective, mode):
    """XtokShape gives collate the same fields, dtypes and per-token shapes as
    CrossTokenizer gives a real store record (only the values differ)."""
    d, url = work
    store = open_store(url)
    teacher, student = store_tokenizer(store), build_split_tokenizer()
    cfg = _cfg(objective, mode)
    fields = set(objective_fields(cfg))
    xt = CrossTokenizer(teacher, student, build_map(teacher, student), mode,
                        own_topk=store.meta.k if mode == "uld" else 0)
    real = xt(store.load_shard(0, fields=[f for f in fields if f in store.fields]).record(0))  # as the reader reads
    group = synthetic_groups(cfg, 20, 4, store.meta.k, len(student), (1.0,))
    syn = XtokShape(mode, store.meta.k)(group[0])
    assert syn.keys() == real.keys()
    assert xt.own_topk == XtokShape(mode, store.meta.k).own_topk
    for key, v in real.items():
        if isinstance(v, np.ndarray):
            w = syn[key]
            assert w.dtype == v.dtype, key
            assert w.shape[1:] == v.shape[1:] and (w.shape[0] == syn["n_tokens"]) == (v.shape[0] == real["n_tokens"]), key


def test_store_shape_is_in_student_tokens(work, caplog):
    """The trainer's shape: the store's longest record scaled by the student/teacher ratio
    measured on the store's text, the default ratio when it cannot be measured, and
    --estimate-seq-len (student tokens) as given."""
    import logging
    import math

    d, url = work
    store = open_store(url)
    same = store_shape(store, _cfg("dckd", "off", model=str(d / "split")))
    xt = store_shape(store, _cfg("dckd", "map", model=str(d / "split")))
    teacher, student = store_tokenizer(store), build_split_tokenizer()
    tr = CrossTokenizer(teacher, student, build_map(teacher, student))
    lengths = [(len(tr.prompt_ids(r)) + len(tr(r)["response_ids"]), len(r["prompt_ids"]) + len(r["response_ids"]))
               for r in store]
    longest_store = max(t for _, t in lengths)
    ratio = max(s / t for s, t in lengths)
    assert same["seq_len"] == longest_store and same["xtok_ratio"] == ""
    assert xt["xtok_ratio"] == f"x{ratio:.3f} measured on {len(store)} records"  # a small store: all of it
    assert xt["seq_len"] == math.ceil(longest_store * ratio) != same["seq_len"]
    assert xt["seq_len"] >= max(s for s, _ in lengths)  # bounds every record in student tokens
    # a config-only student directory: the stated default, and a warning that says so
    (d / "cfgonly").mkdir(exist_ok=True)
    (d / "cfgonly" / "config.json").write_text((d / "split" / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="kdcache.train.memory"):
        dflt = store_shape(store, _cfg("dckd", "map", model=str(d / "cfgonly")))
    assert dflt["seq_len"] == math.ceil(longest_store * XTOK_RATIO) and "assumed" in dflt["xtok_ratio"]
    assert "--estimate-seq-len" in caplog.text
    fixed = store_shape(store, _cfg("dckd", "uld", model=str(d / "split"), estimate_seq_len=77))
    assert fixed["seq_len"] == 77 and fixed["xtok_ratio"] == "--estimate-seq-len"


def test_fit_check_decides_on_the_cross_tokenizer_step(work, tmp_path, monkeypatch):
    """The trainer's up-front check and `--estimate-memory` estimate the cross-tokenizer step
    at the student's lengths: a card that the same-tokenizer estimate would call big enough
    refuses (or auto-fits) the longer, wider cross-tokenizer step."""
    from kdcache.train import memory

    d, url = work
    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memory, "CUDA_CONTEXT", 0)
    monkeypatch.setattr(memory, "FRAGMENTATION", 0.0)
    store = open_store(url)
    base = _cfg("dckd", "map", model=str(d / "split"), store=url, grad_checkpointing=False, auto_fit=False)
    peaks = {}
    for mode in ("off", "map"):
        c = dataclasses.replace(base, cross_tokenizer=mode)
        s = store_shape(store, c)
        peaks[mode] = estimate_memory(c, memory.model_config(c), suggest=False, **{
            k: s[k] for k in ("seq_len", "prompt_len", "k", "per_block")}).peak_gib * 2**30
    assert peaks["map"] > peaks["off"]
    gpu = f"{int(peaks['off'] + peaks['map']) // 2}B"
    assert memory.fit_or_fail(dataclasses.replace(base, cross_tokenizer="off", gpu_memory=gpu), store)
    with pytest.raises(ValueError, match="does not fit the GPU") as e:
        memory.fit_or_fail(dataclasses.replace(base, gpu_memory=gpu), store)
    assert "cross_tokenizer=map" in str(e.value) and "student_tokens=x" in str(e.value)
    fitted = memory.fit_or_fail(dataclasses.replace(base, gpu_memory=gpu, auto_fit=True), store)
    assert (fitted.batch_groups, fitted.grad_accum) == (1, 2)
    est = memory.estimate_for_cli(dataclasses.replace(base, cross_tokenizer="uld", gpu_memory="1GiB", store=[url]))
    assert est.config["cross_tokenizer"] == "uld" and est.seq_len == store_shape(store, base)["seq_len"]
