"""The memory estimate runs the real training step: on a tiny model the storage tracker
reports the same peak on real tensors and on fake ones; a config that cannot fit says so,
names the switches, and `--require-fit` makes the CLI exit non-zero."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config
from typer.testing import CliRunner

from kdcache.train.config import TrainConfig
from kdcache.train.data import next_batches
from kdcache.train.memory import (
    GIB,
    StorageTracker,
    batch_tensors,
    estimate_memory,
    measure_step,
    parse_size,
    simulate,
    synthetic_groups,
)
from kdcache.train.optim import make_optimizer
from kdcache.train.step import Precision
from kdcache.train.student import prepare_student

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=300, max_position_embeddings=128)
SHAPE = dict(seq_len=40, prompt_len=8, k=5)
ONE_LAYER = {**TINY, "num_hidden_layers": 1}  # for tests that simulate many variants


def _cfg(**kw) -> TrainConfig:
    base = dict(model="tiny", store="none", objective="adpa", batch_groups=2, chunk_size=16, lr=1e-3,
                weights_dtype="fp32", bf16=False, progress=False)
    return TrainConfig(**{**base, **kw})


def _real_peak(cfg: TrainConfig, hf_config) -> dict:
    """The tracker around the same step on a real model and real batches."""
    torch.manual_seed(0)
    model = prepare_student(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32), cfg)
    model.train()
    group = synthetic_groups(cfg, SHAPE["seq_len"], SHAPE["prompt_len"], SHAPE["k"], hf_config.vocab_size, (1.0,))
    import itertools

    batches, _ = next_batches(itertools.repeat(group), cfg, 0, (1.0,), torch.device("cpu"))
    tracker = StorageTracker()
    tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    tracker.register(batch_tensors(batches), "inputs")
    precision = Precision(bf16=False, device_type="cpu", cache=not cfg.grad_checkpointing)
    with tracker:
        return measure_step(model, cfg, batches, precision,
                            lambda ps: make_optimizer(cfg.optim_settings, ps, device_type="cuda"), tracker)


@pytest.mark.parametrize("kw,tied", [(dict(grad_checkpointing=False), True),
                                     (dict(grad_checkpointing=True), False),
                                     (dict(lora_r=4, lora_targets=["q_proj", "v_proj"], grad_checkpointing=True), True)])
def test_real_and_fake_step_have_the_same_peak(kw, tied):
    """Same ops, same storages: the estimate is the real step, not a formula."""
    hf = Qwen2Config(**TINY, tie_word_embeddings=tied)
    cfg = _cfg(**kw)
    real = _real_peak(cfg, hf)
    fake = simulate(cfg, hf, **SHAPE)
    assert real["peak"] > 0
    assert fake["peak"] == real["peak"]
    assert fake["breakdown"] == real["breakdown"]
    assert fake["peak_where"] == real["peak_where"]
    assert fake["phases"] == real["phases"]


def test_breakdown_counts_weights_grads_and_states():
    hf = Qwen2Config(**TINY, tie_word_embeddings=True)
    r = simulate(_cfg(), hf, **SHAPE)
    n, slack = r["params"], 40 * 512  # every tensor is rounded up to 512-byte blocks
    b = r["breakdown"]
    assert 4 * n <= b["weights"] <= 4 * n + slack  # fp32
    assert 8 * n <= b["optimizer"] <= 8 * n + 3 * slack  # fp32 m, v (+ step)
    assert r["peak"] == sum(b.values())


def test_tracker_models_cuda_in_place_gradient_accumulation():
    """Two gradient contributions to one leaf: fake tensors sum them out of place, CUDA (the
    engine holding the only reference) in place. The tracker counts the CUDA way."""
    x = torch.randn(256, 256, requires_grad=True)
    tracker = StorageTracker()
    tracker.register([x], "weights")
    with tracker:
        tracker.reset_peak("step")
        y = (x * 2).sum() + (x * 3).sum()
        y.backward()
        tracker._resolve()
    # x, its grad, and the two contributions being added; never a third [256, 256] buffer
    assert tracker.peak <= 3 * 256 * 256 * 4 + 16 * 512


def test_bf16_weights_fp32_states_layout():
    hf = Qwen2Config(**TINY, tie_word_embeddings=True)
    cfg = _cfg(weights_dtype="auto", bf16=None)  # the CUDA choices: bf16 weights, fp32 moments
    r = simulate(cfg, hf, **SHAPE)
    n, slack = r["params"], 40 * 512  # every tensor is rounded up to 512-byte blocks
    assert 2 * n <= r["breakdown"]["weights"] <= 2 * n + slack  # bf16
    assert 8 * n <= r["breakdown"]["optimizer"] <= 8 * n + 3 * slack  # fp32 m, v (+ step)


def test_8bit_adamw_states_are_modelled_as_one_byte_plus_block_scales():
    # shapes whose tensors are >= 4096 values, multiples of the 256-value block (quantised)
    hf = Qwen2Config(**{**TINY, "hidden_size": 64, "num_key_value_heads": 4, "intermediate_size": 256,
                        "vocab_size": 512}, tie_word_embeddings=True)
    cfg = _cfg(weights_dtype="auto", bf16=None)
    full = simulate(cfg, hf, **SHAPE)["breakdown"]["optimizer"]
    r8 = simulate(dataclasses.replace(cfg, optim="adamw8bit"), hf, **SHAPE)
    n = r8["trainable"]
    assert 2 * n <= r8["breakdown"]["optimizer"] < 0.3 * full  # 1 byte per moment vs 4


def test_modelled_8bit_layout_matches_torchao():
    torchao_optim = pytest.importorskip("torchao.optim")
    from kdcache.train.memory import Modeled8bitAdamW

    for shape in [(512, 64), (64, 64), (10, 10), (4096, 3)]:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
        ours = Modeled8bitAdamW([p])
        p.grad = torch.zeros_like(p)
        ours.step()
        ao = torchao_optim.AdamW8bit([p])
        want = sum(t.untyped_storage().nbytes() for k in ("exp_avg", "exp_avg_sq")
                   for t in _inner(ao._new_buffer(p, k == "exp_avg")))
        got = sum(v.untyped_storage().nbytes() for k, v in ours.state[p].items() if k != "step")
        assert got == want, shape


def _inner(t):
    flat = getattr(t, "__tensor_flatten__", None)
    return [getattr(t, n) for n in flat()[0]] if flat else [t]


def test_estimate_that_cannot_fit_says_so_and_names_switches():
    hf = Qwen2Config(**ONE_LAYER, tie_word_embeddings=True)
    est = estimate_memory(_cfg(batch_groups=1), hf, gpu_bytes=int(0.5 * GIB), cache=False, **SHAPE)
    assert not est.fits and est.needed_gib > 0.5
    names = [s.name for s in est.switches]
    assert names[0] == "gradient checkpointing" and any("LoRA" in n for n in names)
    assert any(n.startswith("+ ") for n in names)  # none fits alone: stacked too
    text = est.format()
    assert "DOES NOT FIT" in text and "--grad-checkpointing" in text
    ok = estimate_memory(_cfg(batch_groups=1), hf, gpu_bytes=24 * GIB, cache=False, **SHAPE)
    assert ok.fits and not ok.switches and "FITS" in ok.format()


def test_parse_size():
    assert parse_size("24GiB") == parse_size("24GB") == parse_size("24") == 24 * GIB
    assert parse_size("512MiB") == GIB // 2
    with pytest.raises(ValueError, match="gpu-memory"):
        parse_size("lots")


def test_cli_estimate_memory_and_require_fit(tmp_path, monkeypatch):
    from kdcache.cli import app

    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))  # the repeated estimates come from it

    model = AutoModelForCausalLM.from_config(Qwen2Config(**ONE_LAYER, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "m")
    args = ["train", "--model", str(tmp_path / "m"), "--objective", "dckd", "--estimate-memory",
            "--estimate-seq-len", "40", "--batch-groups", "1", "--chunk-size", "16"]
    runner = CliRunner()
    ok = runner.invoke(app, args + ["--gpu-memory", "24GiB", "--require-fit"])
    assert ok.exit_code == 0, ok.output
    assert "FITS" in ok.stdout and "peak" in ok.stdout
    bad = runner.invoke(app, args + ["--gpu-memory", "0.5GiB", "--require-fit"])
    assert bad.exit_code == 1 and "DOES NOT FIT" in bad.stdout
    soft = runner.invoke(app, args + ["--gpu-memory", "0.5GiB"])
    assert soft.exit_code == 0 and "DOES NOT FIT" in soft.stdout
    nomodel = runner.invoke(app, ["train", "--estimate-memory"])
    assert nomodel.exit_code == 2 and "error: --estimate-memory needs --model" in nomodel.stderr


def test_fake_gather_of_a_real_sized_bf16_head_copies_nothing():
    """The estimate's (CUDA) path of gather_logprobs at Qwen2.5-1.5B's head: no 0.87 GiB float32
    copy of the [151936, 1536] weight, in forward or backward; one [chunk, V] fp32 buffer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kdcache.train.chunked import gather_logprobs

    v, h, n = 151936, 1536, 2048
    tracker = StorageTracker()
    with FakeTensorMode(), tracker:
        w = torch.empty(v, h, dtype=torch.bfloat16, requires_grad=True)
        hid = torch.empty(n, h, dtype=torch.bfloat16, requires_grad=True)
        idx = torch.zeros(n, 51, dtype=torch.long)
        gather_logprobs(hid, w, idx, chunk_size=1024).sum().backward()
    assert tracker.max_alloc <= 1024 * v * 4  # the chunk's float32 logits
    assert tracker.max_alloc < v * h * 4


def _tiny_store(tmp_path):
    import numpy as np

    from kdcache.store import StoreMeta, StoreWriter

    meta = StoreMeta(k=3, fields=["topk_ids", "topk_logprobs"], tokenizer={"vocab_size": TINY["vocab_size"]},
                     options={"codec": "lossless"}, code_version="test")
    rng = np.random.default_rng(0)
    with StoreWriter(str(tmp_path / "store"), meta) as w:
        for e in range(2):
            w.add_group([{"example_id": f"e{e}", "role": role, "group": 0,
                          "prompt_ids": np.arange(3 + e, dtype=np.int32) + 6,
                          "response_ids": np.arange(30 + e, dtype=np.int32) + 6,
                          "teacher_prompt_ids": None, "is_terminal": True, "reward": None,
                          "topk_ids": rng.integers(0, 300, (30 + e, 3)).astype(np.int32),
                          "topk_logprobs": np.full((30 + e, 3), -2.0, np.float32)}
                         for role in ("chosen", "rejected")])
    return str(tmp_path / "store")


def test_fit_check_turns_on_checkpointing_or_refuses(tmp_path, monkeypatch):
    """The trainer's up-front rule: auto grad checkpointing goes on when the step needs it; a
    step that cannot fit is refused with the estimate and the switches, before any loading."""
    from kdcache.store import open_store
    from kdcache.train import memory

    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memory, "CUDA_CONTEXT", 0)
    monkeypatch.setattr(memory, "FRAGMENTATION", 0.0)
    monkeypatch.setattr(memory, "_switches", lambda c: [("smaller lm_head chunks", "--chunk-size 8", {"chunk_size": 8})])
    model = AutoModelForCausalLM.from_config(Qwen2Config(**ONE_LAYER, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "m")
    store = open_store(_tiny_store(tmp_path))
    cfg = _cfg(model=str(tmp_path / "m"), objective="dckd", grad_checkpointing=None, batch_groups=2)
    shape = memory.store_shape(store, cfg)
    assert (shape["seq_len"], shape["prompt_len"], shape["k"]) == (35, 4, 3)
    hf = memory.model_config(cfg)
    kw = {k: shape[k] for k in ("seq_len", "prompt_len", "k", "per_block")}
    off, on = (round(memory.estimate_memory(dataclasses.replace(cfg, grad_checkpointing=gc), hf, suggest=False,
                                            **kw).peak_gib * GIB) for gc in (False, True))  # cached for fit_or_fail
    assert on < off
    big = memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{max(off, 2 * on) + 1}B"), store)
    assert big.grad_checkpointing is False  # room to spare: checkpointing stays off
    mid = memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{(on + off) // 2}B"), store)
    assert mid.grad_checkpointing is True
    assert memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{off + 1}B", grad_checkpointing=False),
                              store).grad_checkpointing is False  # set by the user: kept
    with pytest.raises(ValueError, match="does not fit the GPU; nothing was loaded") as e:
        memory.fit_or_fail(dataclasses.replace(cfg, gpu_memory=f"{on // 2}B"), store)
    assert "DOES NOT FIT" in str(e.value) and "--chunk-size 8" in str(e.value)


def test_trainer_checks_the_fit_before_loading(tmp_path, monkeypatch):
    from kdcache.train import memory
    from kdcache.train import trainer as trainer_mod

    def refuse(cfg, store):
        raise ValueError("does not fit")

    def never(*a, **kw):
        raise AssertionError("weights loaded before the fit check")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "fit_or_fail", refuse)
    monkeypatch.setattr(trainer_mod, "load_student", never)
    cfg = _cfg(model=str(tmp_path / "m"), store=_tiny_store(tmp_path), out=str(tmp_path / "run"), objective="dckd")
    with pytest.raises(ValueError, match="does not fit"):
        trainer_mod.train(cfg)
    assert not (tmp_path / "run").exists()


def _real_peak_teachers(cfg: TrainConfig, hf_config, teachers: int) -> dict:
    import itertools

    torch.manual_seed(0)
    model = prepare_student(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32), cfg)
    model.train()
    group = synthetic_groups(cfg, SHAPE["seq_len"], SHAPE["prompt_len"], SHAPE["k"], hf_config.vocab_size,
                             (1.0,), teachers=teachers)
    batches, _ = next_batches(itertools.repeat(group), cfg, 0, (1.0,), torch.device("cpu"),
                              teacher_weights=(1.0 / teachers,) * teachers)
    tracker = StorageTracker()
    tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    tracker.register(batch_tensors(batches), "inputs")
    with tracker:
        return measure_step(model, cfg, batches, Precision(bf16=False, device_type="cpu"),
                            lambda ps: make_optimizer(cfg.optim_settings, ps, device_type="cuda"), tracker), batches


@pytest.mark.parametrize("objective", ["kd", "adpa"])
def test_ensemble_of_j_stores_is_estimated_with_a_j_times_k_union(objective):
    """METHODS §4: J teachers' union index is up to J x K wide; the estimate runs that step
    (the real and the fake one agree) and grows with J."""
    hf = Qwen2Config(**ONE_LAYER, tie_word_embeddings=True)
    cfg = _cfg(objective=objective, store=["a", "b", "c"], ensemble=True)
    peaks = {}
    for J in (1, 3):
        real, batches = _real_peak_teachers(cfg, hf, J)
        assert batches[0].index.shape[1] == 1 + J * SHAPE["k"]
        fake = simulate(cfg, hf, **SHAPE, teachers=J)
        assert fake["peak"] == real["peak"] and fake["breakdown"] == real["breakdown"]
        peaks[J] = fake
    assert peaks[3]["breakdown"]["inputs"] > peaks[1]["breakdown"]["inputs"]
    est = estimate_memory(cfg, hf, gpu_bytes=24 * GIB, cache=False, teachers=3, **SHAPE)
    assert est.config["teachers"] == 3 and "teachers=3" in est.format()


def test_the_estimate_checks_its_config_once_and_needs_no_store(monkeypatch):
    """estimate_for_cli is an entry point: it validates (without --store: the shape then comes
    from --estimate-seq-len) once, and what it hands on is the checked config."""
    from kdcache.train import memory

    calls = []
    real = TrainConfig.validated
    monkeypatch.setattr(TrainConfig, "validated", lambda self, **kw: calls.append(kw) or real(self, **kw))
    monkeypatch.setattr(memory, "model_config", lambda cfg: None)
    monkeypatch.setattr(memory, "estimate_memory", lambda cfg, hf, **kw: (cfg, kw))
    cfg, kw = memory.estimate_for_cli(_cfg(store=[], estimate_seq_len=40, gpu_memory="1GiB", grad_checkpointing=False))
    assert calls == [{"need_store": False}] and cfg.store == [] and kw["seq_len"] == 40
    with pytest.raises(ValueError, match=r"--lr 0: must be > 0"):
        memory.estimate_for_cli(_cfg(store=[], lr=0))
