"""kdcache side by side with TRL on CPU: the training loop (DPO and top-K KD) and the
reference / teacher pass, on the same data, model weights, batch, order and optimizer.

Peers (each repetition is a fresh process; the three systems alternate, rotating who goes first):

  DPO   kdcache  `train --objective dpo` on a `precompute --teacher REF --reference REF
                 --fields ref_token_logprob` store (the reference never runs at train time)
        trl-pre  DPOTrainer(precompute_ref_log_probs=True): TRL's own reference pass before
                 training, then the policy alone each step: the like-for-like peer
        trl      DPOTrainer as shipped (ref_model=None: TRL loads the reference and runs its
                 forward every step)
  KD    kdcache  `train --objective kd` (forward KL on the teacher's stored top-K, renormalised,
                 against the student's full-vocabulary log-probs) on a `--fields
                 topk_ids,topk_logprobs` store
        trl-pre  TRL's GKD loss on precomputed teacher logits: GKDTrainer's own
                 `generalized_jsd_loss` (beta=0: forward KL) on the student's logits and the SAME
                 stored top-K (log-probs at the K ids, -1e4 elsewhere, so the teacher's
                 softmax is the renormalised top-K and exp(-1e4) is exactly 0), in TRL's SFT
                 loop (GKDTrainer's base) with a collator that pads the stored top-K. TRL has no
                 offline-teacher path, so this is GKDTrainer with its teacher forward replaced by
                 the store: the same loss values as kdcache, hence a loss check.
        trl      GKDTrainer as shipped for off-policy KD (lmbda=0: the dataset's completions,
                 beta=0: forward KL): the teacher runs every step, full-vocabulary KL with
                 token-mean reduction, the ChatML collator tokenising each batch. Different loss
                 values by design (full vocabulary vs top-K): the time of the default path.

What is the same: weights (one saved random-init Llama per role, loaded by both), data (one
TRL-chat-format JSONL; kdcache precompute and TRL tokenise it with the same chat template and
the benchmark checks the ids agree), order (TRL reads the dataset in kdcache's StreamReader
order through a sequential sampler), batch (pairs / sequences per step), fp32 on CPU,
`torch.set_num_threads(n)` + OMP/MKL_NUM_THREADS=n, AdamW (lr, betas, eps, weight decay 0,
clip 1.0, linear decay to 0 with no warm-up; each side's own AdamW: kdcache's default,
torch's fused kernel; TRL's `--optim adamw_torch` as shipped, the per-op one, or with
`--trl-optim adamw_torch_fused` the same fused kernel as kdcache), dropout
off, no gradient checkpointing, logging every 10 steps, no saving inside the loop.
Timed: the loop, from just before the first batch is fetched to the end of the last optimizer
step (TRL: on_train_begin .. last on_step_end; kdcache: the loop's first read .. last
train_step). Start-up, TRL's dataset preparation and reference pass, and kdcache's final
checkpoint are outside it and reported apart. Per-step losses are recorded on both sides and
compared (max |kdcache - trl-pre| over the steps).

Also measured: `kdcache train` start-up (process start -> first step, model loaded -> first
step), and precompute: kdcache's DPO store (in-process and as a command) and KD store vs TRL's
reference pass vs the bare forward of the same model over the same sequences (tokens/s).

    pip install -e '.[bench]'                                # trl (not part of [dev])
    python benchmarks/bench_trl.py                           # everything: tiny and 32k vocab, 1 and 2 threads,
                                                             # 2 reps (~30 min on a shared 2-core box)
    python benchmarks/bench_trl.py --cases tiny --steps 50 --reps 4   # the issue's set-up, more repetitions
    python benchmarks/bench_trl.py --trl-optim adamw_torch_fused      # TRL with the fused AdamW too
    python benchmarks/bench_trl.py --cases tiny --threads 2 --reps 2 --objectives dpo
    python benchmarks/bench_trl.py --smoke                   # a few steps of every path (~2 min)
    python benchmarks/bench_trl.py --profile tiny:dpo        # torch.profiler tables of both steps
    python benchmarks/bench_trl.py --report                  # rewrite results/trl.md from trl.json
Results: results/trl.{json,md} (machine named; medians, spread, ratios, loss agreement).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LR, DPO_BETA, SEED = 5e-5, 0.1, 0
# per-step losses agree when |kdcache - trl-pre| <= LOSS_RTOL * max(1, |loss|) at every step: both
# sides compute the same loss in fp32; what differs is summation order and AdamW's kernel (fused
# vs per-op), whose last-bit differences grow a little over the steps
LOSS_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """One model/data size. `words` = 0: the tiny built-in word list (46 words + 6 specials)."""

    name: str
    words: int
    hidden: int
    layers: int
    heads: int
    rows: int  # dataset rows: DPO pairs / KD sequences
    batch: int  # pairs (DPO) or sequences (KD) per optimizer step
    steps: int
    k: int  # KD: teacher top-K stored
    prompt: tuple[int, int] = (8, 24)  # words per prompt, min..max
    response: tuple[int, int] = (8, 48)
    kv_heads: int | None = None  # None: as many as heads
    intermediate: int | None = None  # None: tiny's default (4 x hidden)
    tie: bool = False  # tied input/output embeddings

    def scaled(self, steps: int, rows: int) -> Case:
        return dataclasses.replace(self, steps=steps, rows=rows)


CASES = {
    # the set-up: tiny Llama (hidden 256, 4 layers), 400 pairs, 8 pairs/step, 50 steps
    # (the issue measured 50 steps; 20 by default keeps the whole benchmark within ~30 min on a
    # shared 2-core box: --cases tiny --steps 50 --reps 4 for the set-up)
    "tiny": Case("tiny", words=0, hidden=256, layers=4, heads=4, rows=400, batch=8, steps=20, k=20),
    # a realistic vocabulary: 32k words (+6 specials), hidden 512; sized for minutes on 2 cores
    "32k": Case("32k", words=32000, hidden=512, layers=4, heads=8, rows=48, batch=8, steps=6, k=50),
    # a real model's shape: Qwen2.5-0.5B (hidden 896, 24 layers, 14 / 2 heads, intermediate 4864,
    # tied embeddings, 151,936 output rows; a Llama config, so no q/k/v biases), random init;
    # small batches so one step takes seconds on 2 cores
    "qwen0.5b": Case("qwen0.5b", words=151930, hidden=896, layers=24, heads=14, rows=10, batch=2,
                     steps=5, k=50, kv_heads=2, intermediate=4864, tie=True),
}
SYSTEMS = ("kdcache", "trl-pre", "trl")


# ----------------------------------------------------------------------------- data and models
def work_dir(root: Path, case: Case) -> Path:
    return root / f"{case.name}-r{case.rows}"


def _text(rng: random.Random, words: list[str], span: tuple[int, int]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(*span)))


def prepare(case: Case, root: Path) -> Path:
    """Tokenizer, models, datasets and kdcache stores of `case` under root (reused when done)."""
    from kdcache.precompute import PrecomputeConfig, run_precompute
    from kdcache.train.tiny import DEFAULT_WORDS, build_model, build_tokenizer

    d = work_dir(root, case)
    if (d / "ready.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    words = DEFAULT_WORDS if case.words == 0 else [f"w{i}" for i in range(case.words)]
    tok = build_tokenizer(words)
    kw = dict(hidden=case.hidden, layers=case.layers, heads=case.heads, max_positions=512,
              kv_heads=case.kv_heads, intermediate=case.intermediate, tie_embeddings=case.tie)
    for name, seed in (("ref", 0), ("teacher", 1)):  # ref: the DPO reference AND the students' init
        model = build_model(len(tok), seed=seed, **kw)
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    rng = random.Random(0)
    content = [w for w in words if w not in (":", "=", "?", ".", ",", "!")]
    with (d / "dpo.jsonl").open("w") as f:
        for i in range(case.rows):
            row = {"id": f"r{i}", "prompt": [{"role": "user", "content": _text(rng, content, case.prompt)}],
                   "chosen": [{"role": "assistant", "content": _text(rng, content, case.response)}],
                   "rejected": [{"role": "assistant", "content": _text(rng, content, case.response)}]}
            f.write(json.dumps(row) + "\n")
    with (d / "sft.jsonl").open("w") as f:
        for i in range(case.rows):
            row = {"id": f"r{i}", "prompt": [{"role": "user", "content": _text(rng, content, case.prompt)}],
                   "completion": [{"role": "assistant", "content": _text(rng, content, case.response)}]}
            f.write(json.dumps(row) + "\n")
    common = dict(device="cpu", dtype="fp32", progress=False, max_length=None)
    run_precompute(PrecomputeConfig(teacher=str(d / "ref"), reference=str(d / "ref"), data=str(d / "dpo.jsonl"),
                                     fields=["ref_token_logprob"], out=str(d / "store-dpo"), codec="lossless",
                                     **common))
    run_precompute(PrecomputeConfig(teacher=str(d / "teacher"), data=str(d / "sft.jsonl"), k=case.k,
                                    fields=["topk_ids", "topk_logprobs"], out=str(d / "store-kd"), **common))
    (d / "ready.json").write_text(json.dumps(dataclasses.asdict(case)))
    return d


def kdcache_order(store_url: str, objective: str) -> list[str]:
    """Example ids in the order kdcache's trainer consumes them (epoch 0, seed SEED)."""
    from kdcache.store import StreamReader
    from kdcache.train.objectives import OBJECTIVE_SPECS

    reader = StreamReader(store_url, fields=list(OBJECTIVE_SPECS[objective].fields), shuffle=True, seed=SEED)
    return [g[0]["example_id"] for g in reader]


def stored_records(store_url: str) -> dict[str, dict[str, dict]]:
    """example_id -> role -> record (ids and stored fields, as numpy)."""
    from kdcache.store import open_store

    out: dict[str, dict[str, dict]] = {}
    for r in open_store(store_url):
        out.setdefault(r["example_id"], {})[r["role"]] = r
    return out


def read_jsonl(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


# ----------------------------------------------------------------------------- timing hooks
class Clock:
    """Loop start, per-step end times and per-step losses (detached tensors, read at the end)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.ends: list[float] = []
        self.losses: list = []

    def summary(self) -> dict:
        ends = self.ends
        steps = [b - a for a, b in zip([self.start, *ends[:-1]], ends, strict=True)]
        return {"loop_s": ends[-1] - self.start, "first_step_s": steps[0],
                "step_median_s": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
                "losses": [float(x) for x in self.losses], "steps": len(ends)}


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- kdcache side
def kdcache_cfg(case: Case, d: Path, objective: str, out: Path, steps: int):
    from kdcache.train.config import TrainConfig

    store = d / ("store-dpo" if objective == "dpo" else "store-kd")
    return TrainConfig(model=str(d / "ref"), store=str(store), out=str(out), objective=objective,
                       max_steps=steps, batch_groups=case.batch, lr=LR, dpo_beta=DPO_BETA, seed=SEED,
                       log_every=10, progress=False, resume=False, bf16=False)


def run_kdcache(case: Case, d: Path, objective: str, steps: int, out: Path, profile: Path | None = None) -> dict:
    """kdcache's own `train()`; the clock starts when the loop asks for its first batch and
    stops after each train_step. (The first group is read ahead while the student loads, as
    TRL prepares its dataset before on_train_begin: both outside the loop.)"""
    from kdcache.train import trainer as T

    clock = Clock()
    next_batches, train_step = T.next_batches, T.train_step

    def timed_batches(*a, **k):
        if clock.start is None:
            clock.start = time.perf_counter()
        return next_batches(*a, **k)

    def timed_step(*a, **k):
        metrics = train_step(*a, **k)
        clock.ends.append(time.perf_counter())
        clock.losses.append(metrics["loss"])
        if prof is not None:
            prof.step()
        return metrics

    prof = _profiler(profile)
    T.next_batches, T.train_step = timed_batches, timed_step
    t0 = time.perf_counter()
    try:
        if prof is not None:
            prof.__enter__()
        T.train(kdcache_cfg(case, d, objective, out, steps))
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
            _write_profile(prof, profile)
        T.next_batches, T.train_step = next_batches, train_step
    res = clock.summary()
    res["run_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- TRL side
def trl_args(cls, case: Case, out: Path, steps: int, **kw):
    return cls(output_dir=str(out), per_device_train_batch_size=case.batch, gradient_accumulation_steps=1,
               max_steps=steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
               weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
               optim=os.environ.get("BENCH_TRL_OPTIM", "adamw_torch"), logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
               bf16=False, fp16=False, gradient_checkpointing=False, seed=SEED, data_seed=SEED,
               dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
               max_length=None, **kw)


def _trl_callback(clock: Clock, prof):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock.ends.append(time.perf_counter())
            if prof is not None:
                prof.step()

    return Timer()


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def trl_dpo(case: Case, d: Path, mode: str, steps: int, out: Path, clock: Clock, prof,
            extra_callbacks: list | None = None) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = read_jsonl(d / "dpo.jsonl")
    order = kdcache_order(str(d / "store-dpo"), "dpo")
    ds = Dataset.from_list([{k: rows[e][k] for k in ("prompt", "chosen", "rejected")} for e in order])
    extra: dict = {}

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            clock.losses.append((out[0] if return_outputs else out).detach())
            return out

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            res = super()._precompute_ref_logps(dataset, name, batch_size)
            extra["ref_pass_s"] = time.perf_counter() - t
            return res

    args = trl_args(DPOConfig, case, out, steps, beta=DPO_BETA, precompute_ref_log_probs=mode == "trl-pre")
    tok = AutoTokenizer.from_pretrained(str(d / "ref"))
    t = time.perf_counter()
    trainer = Trainer(model=_load(d / "ref"), args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[_trl_callback(clock, prof), *(extra_callbacks or [])])
    extra["setup_s"] = time.perf_counter() - t
    check_ids_dpo(trainer.train_dataset, order, str(d / "store-dpo"))
    trainer.train()
    return extra


def check_ids_dpo(ds, order: list[str], store_url: str) -> None:
    """TRL's tokenisation must give kdcache's ids (prompt, chosen, rejected) for every row."""
    recs = stored_records(store_url)
    for row, e in zip(ds, order, strict=True):
        for role in ("chosen", "rejected"):
            r = recs[e][role]
            if list(row["prompt_ids"]) != list(r["prompt_ids"]) or list(row[f"{role}_ids"]) != list(r["response_ids"]):
                raise SystemExit(f"token ids differ between TRL and kdcache for example {e} ({role}): "
                                 "the comparison would not be like for like")


def _topk_examples(d: Path, order: list[str]) -> list[dict]:
    """Pre-tokenised KD examples in kdcache's order, with the store's top-K per response token."""
    recs = stored_records(str(d / "store-kd"))
    out = []
    for e in order:
        r = recs[e]["sft"]
        p, y = [int(x) for x in r["prompt_ids"]], [int(x) for x in r["response_ids"]]
        out.append({"input_ids": p + y, "completion_mask": [0] * len(p) + [1] * len(y),
                    "topk_ids": r["topk_ids"].tolist(), "topk_logprobs": r["topk_logprobs"].tolist()})
    return out


def trl_kd(case: Case, d: Path, mode: str, steps: int, out: Path, clock: Clock, prof,
           extra_callbacks: list | None = None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    order = kdcache_order(str(d / "store-kd"), "kd")
    tok = AutoTokenizer.from_pretrained(str(d / "ref"))
    extra: dict = {}
    if mode == "trl":
        rows = read_jsonl(d / "sft.jsonl")
        ds = Dataset.from_list([{"messages": rows[e]["prompt"] + rows[e]["completion"]} for e in order])

        class Trainer(GKDTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                clock.losses.append((loss[0] if return_outputs else loss).detach())
                return loss

        args = trl_args(GKDConfig, case, out, steps, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False)
        t = time.perf_counter()
        trainer = Trainer(model=_load(d / "ref"), teacher_model=_load(d / "teacher"), args=args,
                          train_dataset=ds, processing_class=tok, callbacks=[_trl_callback(clock, prof), *(extra_callbacks or [])])
        extra["setup_s"] = time.perf_counter() - t
        trainer.train()
        return extra

    examples = _topk_examples(d, order)
    pad = tok.pad_token_id
    K = case.k

    def collate(batch: list[dict]) -> dict:
        """TRL's padded layout (right padding) plus the stored top-K aligned with the shifted
        logits: logits[:, i] predict token i+1, so response token t (input position P+t) sits
        at shifted position P+t-1."""
        L = max(len(b["input_ids"]) for b in batch)
        B = len(batch)
        ids = torch.full((B, L), pad, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        t_ids = torch.zeros((B, L - 1, K), dtype=torch.long)
        t_lp = torch.zeros((B, L - 1, K), dtype=torch.float32)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            P = n - len(b["topk_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            att[i, :n] = 1
            labels[i, P:n] = ids[i, P:n]
            t_ids[i, P - 1:n - 1] = torch.tensor(b["topk_ids"])
            t_lp[i, P - 1:n - 1] = torch.tensor(b["topk_logprobs"])
        return {"input_ids": ids, "attention_mask": att, "labels": labels, "topk_ids": t_ids, "topk_logprobs": t_lp}

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # GKDTrainer.compute_loss with the teacher's forward replaced by the stored top-K
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
            teacher = logits.detach().new_full(logits.shape, -1e4).scatter_(-1, inputs["topk_ids"], inputs["topk_logprobs"])
            kl = GKDTrainer.generalized_jsd_loss(logits, teacher, beta=0.0, reduction="none").sum(-1)  # [B, L-1]
            mask = inputs["labels"][:, 1:] != -100
            loss = torch.where(mask, kl, 0.0).sum(-1).mean()  # kdcache's reduction: mean_b sum_t
            clock.losses.append(loss.detach())
            return (loss, None) if return_outputs else loss

    args = trl_args(SFTConfig, case, out, steps, remove_unused_columns=False,
                    dataset_kwargs={"skip_prepare_dataset": True})
    t = time.perf_counter()
    trainer = Trainer(model=_load(d / "ref"), args=args, train_dataset=Dataset.from_list(examples),
                      processing_class=tok, data_collator=collate, callbacks=[_trl_callback(clock, prof), *(extra_callbacks or [])])
    extra["setup_s"] = time.perf_counter() - t
    trainer.train()
    return extra


def run_trl(case: Case, d: Path, objective: str, mode: str, steps: int, out: Path,
            profile: Path | None = None) -> dict:
    os.environ.setdefault("HF_DATASETS_CACHE", str(out / "hf-datasets"))  # TRL's ref pass is never a cache hit
    os.environ.setdefault("TQDM_DISABLE", "1")
    clock = Clock()
    prof = _profiler(profile)
    t0 = time.perf_counter()
    try:
        if prof is not None:
            prof.__enter__()
        fn = trl_dpo if objective == "dpo" else trl_kd
        extra = fn(case, d, mode, steps, out, clock, prof)
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
            _write_profile(prof, profile)
    res = clock.summary()
    res.update(extra, run_s=time.perf_counter() - t0)
    return res


# ----------------------------------------------------------------------------- profiling
def _profiler(path: Path | None):
    if path is None:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    # skip the first 3 steps (first read, allocator warm-up), record 10
    return profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=2, warmup=1, active=10),
                   record_shapes=False, with_stack=False)


def _write_profile(prof, path: Path) -> None:
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=60))


# ----------------------------------------------------------------------------- children
def child(ns: argparse.Namespace) -> None:
    """One repetition in this fresh process; writes its result as JSON to ns.out_json."""
    set_threads(ns.threads)
    case = CASES[ns.case].scaled(ns.steps, ns.rows)
    d = work_dir(Path(ns.root), case)
    out = Path(ns.run_dir)
    prof = Path(ns.profile_to) if ns.profile_to else None
    if ns.tensor_peak:
        res = tensor_peak(ns.system, case, d, ns.objective, out / "run")
    elif ns.system == "kdcache":
        res = run_kdcache(case, d, ns.objective, case.steps, out / "run", prof)
    else:
        res = run_trl(case, d, ns.objective, ns.system, case.steps, out / "run", prof)
    import resource

    res["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(ns.out_json).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- tensor peak
def tensor_peak(system: str, case: Case, d: Path, objective: str, out: Path) -> dict:
    """Peak bytes of live tensors during one steady-state training step (the third: optimizer
    states exist), counted by kdcache's StorageTracker on real tensors: what a GPU's
    max_memory_allocated would report for the same fp32 step, the same way for both systems.
    Weights, gradients and optimizer states are registered when the step starts."""
    import itertools

    from kdcache.train import trainer as T
    from kdcache.train.memory import StorageTracker

    target = 3
    box: dict = {}

    def start(model, optimizer) -> None:
        tr = StorageTracker()
        tr.__enter__()
        tr.register(itertools.chain(model.parameters(), model.buffers()), "weights")
        tr.register([p.grad for p in model.parameters() if p.grad is not None], "grads")
        tr.register([v for st in optimizer.state.values() for v in st.values()
                     if isinstance(v, torch_tensor())], "optimizer")
        tr.reset_peak("step")
        box["tracker"] = tr

    def stop() -> None:
        tr = box.pop("tracker")
        tr._resolve()
        tr.__exit__(None, None, None)
        box["peak"] = tr.peak
        box["where"] = tr.peak_where

    steps = max(case.steps, target)
    if system == "kdcache":
        train_step = T.train_step
        calls = itertools.count(1)

        def tracked(model, optimizer, *a, **k):
            n = next(calls)
            if n == target:
                start(model, optimizer)
            try:
                return train_step(model, optimizer, *a, **k)
            finally:
                if n == target:
                    stop()

        T.train_step = tracked
        try:
            T.train(kdcache_cfg(case, d, objective, out, steps))
        finally:
            T.train_step = train_step
    else:
        from transformers import TrainerCallback

        class Track(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
                if state.global_step + 1 == target:
                    start(model, optimizer)

            def on_step_end(self, args, state, control, **kw):
                if "tracker" in box:
                    stop()

        fn = trl_dpo if objective == "dpo" else trl_kd
        fn(case, d, system, steps, out, Clock(), None, extra_callbacks=[Track()])
    return {"tensor_peak_gib": box["peak"] / 2**30, "tensor_peak_where": box["where"]}


def torch_tensor():
    import torch

    return torch.Tensor


def spawn(system: str, case: Case, objective: str, threads: int, root: Path, tmp: Path,
          profile_to: Path | None = None, timeout: float = 3600, tensor_peak: bool = False) -> dict:
    import shutil

    run_dir = tmp / f"{system}-{objective}-{case.name}-{threads}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out_json = run_dir / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(run_dir / "hf-datasets"),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, __file__, "--child", system, "--case", case.name, "--objective", objective,
           "--threads", str(threads), "--steps", str(case.steps), "--rows", str(case.rows),
           "--root", str(root), "--run-dir", str(run_dir), "--out-json", str(out_json)]
    if profile_to is not None:
        cmd += ["--profile-to", str(profile_to)]
    if tensor_peak:
        cmd.append("--tensor-peak")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{system} {objective} {case.name} x{threads} failed:\n{p.stderr[-4000:]}")
    res = json.loads(out_json.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- the comparison
def compare(cases: list[Case], objectives: list[str], threads: list[int], reps: int, root: Path,
            tmp: Path, results: dict, save, memory_cases: tuple[str, ...] = ()) -> None:
    for case in cases:
        prepare(case, root)
        for objective in objectives:
            for n in threads:
                key = f"{case.name}/{objective}/{n}"
                runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
                for rep in range(reps):
                    order = SYSTEMS[rep % 3:] + SYSTEMS[:rep % 3]  # alternate who goes first
                    for system in order:
                        r = spawn(system, case, objective, n, root, tmp)
                        runs[system].append(r)
                        print(f"{key} rep {rep} {system}: loop {r['loop_s']:.2f}s "
                              f"(step {r['step_median_s'] * 1e3:.0f} ms)", file=sys.stderr, flush=True)
                row = summarise(case, objective, n, runs)
                if case.name in memory_cases:  # one extra process per system: the tracked step
                    for system in SYSTEMS:
                        r = spawn(system, case, objective, n, root, tmp, tensor_peak=True)
                        row[system]["tensor_peak_gib"] = r["tensor_peak_gib"]
                        row[system]["tensor_peak_where"] = r["tensor_peak_where"]
                        print(f"{key} {system}: tensor peak {r['tensor_peak_gib']:.2f} GiB",
                              file=sys.stderr, flush=True)
                results["rows"][key] = row
                save()


def summarise(case: Case, objective: str, threads: int, runs: dict[str, list[dict]]) -> dict:
    def med(system: str, k: str) -> float:
        return statistics.median(r[k] for r in runs[system])

    row = {"case": case.name, "objective": objective, "threads": threads, "steps": case.steps,
           "batch": case.batch, "reps": len(runs["kdcache"])}
    for s in SYSTEMS:
        loops = [r["loop_s"] for r in runs[s]]
        row[s] = {"loop_s": med(s, "loop_s"), "loop_min_s": min(loops), "loop_max_s": max(loops),
                  "step_median_s": med(s, "step_median_s"), "first_step_s": med(s, "first_step_s"),
                  "run_s": med(s, "run_s"), "rss_peak_mib": med(s, "rss_peak_mib")}
        if "ref_pass_s" in runs[s][0]:
            row[s]["ref_pass_s"] = med(s, "ref_pass_s")
    for s in ("trl-pre", "trl"):
        row[f"{s}_over_kdcache"] = row[s]["loop_s"] / row["kdcache"]["loop_s"]
        row[f"{s}_over_kdcache_step"] = row[s]["step_median_s"] / row["kdcache"]["step_median_s"]
    ours = runs["kdcache"][0]["losses"]
    for s in ("trl-pre", "trl"):
        theirs = runs[s][0]["losses"]
        row[f"loss_maxdiff_{s}"] = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    row["loss_agree_trl-pre"] = all(abs(a - b) <= LOSS_RTOL * max(1.0, abs(b))
                                    for a, b in zip(ours, runs["trl-pre"][0]["losses"], strict=True))
    row["loss_first_last"] = {s: [runs[s][0]["losses"][0], runs[s][0]["losses"][-1]] for s in SYSTEMS}
    return row


# ----------------------------------------------------------------------------- start-up
def startup_child(ns: argparse.Namespace) -> None:
    """`kdcache train` as the CLI runs it, with timestamps: imports, model loaded, first step."""
    t_main = time.time()
    from kdcache.train import student as S
    from kdcache.train import trainer as T

    marks: dict[str, float] = {"main": t_main, "imported": time.time()}
    load_student, train_step = S.load_student, T.train_step

    def timed_load(*a, **k):
        out = load_student(*a, **k)
        marks["loaded"] = time.time()
        return out

    def timed_step(*a, **k):
        marks.setdefault("first_step", time.time())
        out = train_step(*a, **k)
        marks.setdefault("first_step_done", time.time())
        return out

    T.load_student, T.train_step = timed_load, timed_step
    from kdcache.cli import main

    case = CASES[ns.case].scaled(ns.steps, ns.rows)
    d = work_dir(Path(ns.root), case)
    argv = ["train", "--model", str(d / "ref"), "--store", str(d / "store-dpo"), "--out", ns.run_dir,
            "--objective", "dpo", "--max-steps", "2", "--batch-groups", str(case.batch), "--no-progress"]
    sys.argv = ["kdcache", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    marks["end"] = time.time()
    Path(ns.out_json).write_text(json.dumps(marks))


def startup(case: Case, root: Path, tmp: Path, reps: int) -> dict:
    import shutil

    prepare(case, root)
    rows = []
    for rep in range(reps):
        run_dir = tmp / f"startup-{rep}"
        shutil.rmtree(run_dir, ignore_errors=True)
        out_json = tmp / f"startup-{rep}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--startup-child", "--case", case.name, "--root", str(root),
                        "--run-dir", str(run_dir), "--out-json", str(out_json), "--steps", str(case.steps),
                        "--rows", str(case.rows)], env=env, check=True, capture_output=True)
        m = json.loads(out_json.read_text())
        rows.append({"process_to_first_step_s": m["first_step"] - t0, "imports_s": m["imported"] - t0,
                     "load_to_first_step_s": m["first_step"] - m["loaded"],
                     "load_to_first_step_done_s": m["first_step_done"] - m["loaded"],
                     "process_to_loaded_s": m["loaded"] - t0})
        shutil.rmtree(run_dir, ignore_errors=True)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"reps": reps}


# ----------------------------------------------------------------------------- precompute
def bare_forward_s(model_dir: Path, seqs: list[list[int]], batch_tokens: int = 16384) -> float:
    """The floor: the model's decoder over the same sequences (length-sorted, padded batches of
    <= batch_tokens), hidden states only, no head."""
    import torch

    model = _load(model_dir).eval()
    seqs = sorted(seqs, key=len)
    batches, cur = [], []
    for s in seqs:
        if cur and len(s) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    batches.append(cur)
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            L = max(map(len, b))
            ids = torch.zeros((len(b), L), dtype=torch.long)
            att = torch.zeros((len(b), L), dtype=torch.long)
            for i, s in enumerate(b):
                ids[i, :len(s)] = torch.tensor(s)
                att[i, :len(s)] = 1
            model.model(input_ids=ids, attention_mask=att, use_cache=False)
    return time.perf_counter() - t


def precompute_child(ns: argparse.Namespace) -> None:
    """One precompute measurement in this process: ns.system in kdcache-dpo / kdcache-kd /
    trl-ref-pass / bare-ref / bare-teacher."""
    set_threads(ns.threads)
    case = CASES[ns.case].scaled(ns.steps, ns.rows)
    d = work_dir(Path(ns.root), case)
    out = Path(ns.run_dir)
    res: dict = {}
    if ns.system in ("kdcache-dpo", "kdcache-kd", "kdcache-dpo-all"):
        from kdcache.precompute.run import PrecomputeConfig, run_one

        common = dict(device="cpu", dtype="fp32", progress=False, max_length=None, out=str(out / "store"))
        if ns.system == "kdcache-kd":
            cfg = PrecomputeConfig(teacher=str(d / "teacher"), data=str(d / "sft.jsonl"), k=case.k,
                                   fields=["topk_ids", "topk_logprobs"], **common)
        else:
            fields = ["ref_token_logprob"] if ns.system == "kdcache-dpo" else None
            cfg = PrecomputeConfig(teacher=str(d / "ref"), reference=str(d / "ref"), data=str(d / "dpo.jsonl"),
                                   fields=fields, k=case.k, **common)
        t = time.perf_counter()
        timings: dict = {}
        run_one(cfg, timings)
        res = {"wall_s": time.perf_counter() - t, **timings}
    elif ns.system == "trl-ref-pass":
        os.environ["HF_DATASETS_CACHE"] = str(out / "hf")
        os.environ["TQDM_DISABLE"] = "1"
        clock = Clock()
        extra = _trl_ref_pass(case, d, out, clock)
        res = {"wall_s": extra["ref_pass_s"], **extra}
    else:
        model = d / ("ref" if ns.system == "bare-ref" else "teacher")
        seqs = _sequences(d, "dpo" if ns.system == "bare-ref" else "kd")
        res = {"wall_s": bare_forward_s(model, seqs)}
    Path(ns.out_json).write_text(json.dumps(res))


def _trl_ref_pass(case: Case, d: Path, out: Path, clock: Clock) -> dict:
    """TRL's reference pass alone: DPOTrainer(precompute_ref_log_probs=True) construction, its
    `_precompute_ref_logps` timed (batch = the training batch, TRL's default)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = read_jsonl(d / "dpo.jsonl")
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows.values()])
    extra: dict = {}

    class Trainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            res = super()._precompute_ref_logps(dataset, name, batch_size)
            extra["ref_pass_s"] = time.perf_counter() - t
            return res

    args = trl_args(DPOConfig, case, out, 1, beta=DPO_BETA, precompute_ref_log_probs=True)
    Trainer(model=_load(d / "ref"), args=args, train_dataset=ds,
            processing_class=AutoTokenizer.from_pretrained(str(d / "ref")))
    return extra


def _sequences(d: Path, kind: str) -> list[list[int]]:
    recs = stored_records(str(d / ("store-dpo" if kind == "dpo" else "store-kd")))
    return [[int(x) for x in r["prompt_ids"]] + [int(x) for x in r["response_ids"]]
            for g in recs.values() for r in g.values()]


def precompute_bench(case: Case, root: Path, tmp: Path, threads: int, reps: int) -> dict:
    import shutil

    d = prepare(case, root)
    systems = ("kdcache-dpo", "trl-ref-pass", "bare-ref", "kdcache-kd", "bare-teacher", "kdcache-dpo-all",
               "kdcache-dpo-cmd")
    runs: dict[str, list[float]] = {s: [] for s in systems}
    dpo_tokens = sum(len(s) for s in _sequences(d, "dpo"))
    kd_tokens = sum(len(s) for s in _sequences(d, "kd"))
    for rep in range(reps):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]
        for system in order:
            run_dir = tmp / f"pre-{system}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
            if system == "kdcache-dpo-cmd":  # the command, start to finish (imports and load included)
                cmd = ["kdcache", "precompute", "--teacher", str(d / "ref"), "--reference", str(d / "ref"),
                       "--data", str(d / "dpo.jsonl"), "--fields", "ref_token_logprob", "--device", "cpu",
                       "--dtype", "fp32", "--no-progress", "--out", str(run_dir / "store")]
                t = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                runs[system].append(time.perf_counter() - t)
            else:
                out_json = run_dir / "r.json"
                subprocess.run([sys.executable, __file__, "--precompute-child", system, "--case", case.name,
                                "--threads", str(threads), "--steps", str(case.steps), "--rows", str(case.rows),
                                "--root", str(root), "--run-dir", str(run_dir), "--out-json", str(out_json)],
                               env=env, check=True, capture_output=True)
                runs[system].append(json.loads(out_json.read_text())["wall_s"])
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"precompute {case.name} x{threads} rep {rep} {system}: {runs[system][-1]:.2f}s",
                  file=sys.stderr, flush=True)
    med = {s: statistics.median(v) for s, v in runs.items()}
    tokens = {s: (kd_tokens if s in ("kdcache-kd", "bare-teacher") else dpo_tokens) for s in systems}
    return {"threads": threads, "reps": reps, "tokens": {"dpo": dpo_tokens, "kd": kd_tokens},
            "median_s": med, "spread_s": {s: [min(v), max(v)] for s, v in runs.items()},
            "tokens_per_s": {s: tokens[s] / med[s] for s in systems}}


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    import trl

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "note": "shared machine: other jobs ran at the same time; ratios are from alternating repetitions"}


def write_report(results: dict, path_md: Path) -> None:
    m = results["machine"]
    lines = [f"# kdcache vs TRL on CPU ({results['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
             f"trl {m['trl']}. {m['note']}.", "",
             "Loop = first batch fetched .. last optimizer step (start-up, TRL's dataset preparation and "
             "reference pass, and saving are outside it); median of the repetitions (min-max in brackets), "
             "each repetition a fresh process, the three systems alternating who goes first. "
             "Ratio = peer loop / kdcache loop (> 1: kdcache faster). Loss diff = max over the steps of "
             "|kdcache - trl-pre| per-step loss; agree = within "
             f"{results.get('loss_rtol', 1e-4):g} x max(1, |loss|) at every step (the same loss on the same "
             "weights, data order and batches). trl (default) has other KD loss values by design "
             "(full-vocabulary KL against the live teacher).", "",
             "Peers. **DPO**: `trl-pre` = DPOTrainer(precompute_ref_log_probs=True), the like-for-like peer "
             "(reference log-probs computed before training, policy only in the loop); `trl` = DPOTrainer as "
             "shipped (reference forward every step). **KD**: TRL has no offline-teacher path, so `trl-pre` "
             "is GKDTrainer's own `generalized_jsd_loss` (beta=0: forward KL) on the student's logits against "
             "the SAME stored top-K (log-probs at the K ids, -1e4 elsewhere), inside TRL's SFT loop "
             "(GKDTrainer's base class): the closest TRL path to a precomputed teacher, computing kdcache's "
             "loss values; `trl` = GKDTrainer as shipped for off-policy KD (lmbda=0, beta=0: the dataset's "
             "completions, forward KL, the teacher's forward every step).", "",
             f"Optimizer: kdcache's AdamW is torch's fused kernel (CPU and CUDA); TRL runs `--optim "
             f"{results.get('trl_optim', 'adamw_torch')}`"
             + (" (TrainingArguments' default: the per-op AdamW, several times slower per step on CPU at "
                "the 32k size; `--trl-optim adamw_torch_fused` gives TRL the fused kernel too)"
                if results.get("trl_optim", "adamw_torch") == "adamw_torch" else "") + ".", ""]
    cases = {c["name"]: c for c in results.get("cases", [])}
    for name, c in cases.items():
        lines.append(f"- **{name}**: vocab {c['vocab']}, hidden {c['hidden']}, {c['layers']} layers, {c['rows']} rows, "
                     f"{c['batch']} pairs (DPO) / sequences (KD) per step, {c['steps']} steps, top-K {c['k']}")
    lines += ["", "| case | objective | threads | kdcache loop | trl-pre loop | trl loop | trl-pre / kdcache | "
              "trl / kdcache | step ms (k / pre / trl) | loss diff vs trl-pre | agree | reps |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def loop(r: dict, s: str) -> str:
        x = r[s]
        return f"{x['loop_s']:.2f} s [{x['loop_min_s']:.2f}-{x['loop_max_s']:.2f}]"

    for _key, r in sorted(results["rows"].items()):

        steps = " / ".join(f"{r[s]['step_median_s'] * 1e3:.0f}" for s in SYSTEMS)
        lines.append(f"| {r['case']} | {r['objective']} | {r['threads']} | {loop(r, 'kdcache')} | {loop(r, 'trl-pre')} | "
                     f"{loop(r, 'trl')} | **{r['trl-pre_over_kdcache']:.2f}x** | **{r['trl_over_kdcache']:.2f}x** | "
                     f"{steps} | {r['loss_maxdiff_trl-pre']:.1e} | "
                     f"{'yes' if r.get('loss_agree_trl-pre') else 'NO'} | {r['reps']} |")
    mem = [r for _k, r in sorted(results["rows"].items()) if "rss_peak_mib" in r["kdcache"]]
    if mem:
        lines += ["", "## Memory", "",
                  "Peak RSS: the whole process (weights, optimizer, Python, allocator caches), median of "
                  "the timed repetitions. Tensor peak: bytes of live tensors during one steady-state step "
                  "(the third), counted by kdcache's StorageTracker on real tensors the same way for every "
                  "system: what `torch.cuda.max_memory_allocated` would report for this fp32 step on a GPU. "
                  "Ratio = peer / kdcache (> 1: kdcache smaller).", "",
                  "| case | objective | threads | RSS MiB (k / pre / trl) | trl-pre / kdcache RSS | "
                  "tensor peak GiB (k / pre / trl) | trl-pre / kdcache tensors | trl / kdcache tensors |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mem:
            rss = " / ".join(f"{r[s]['rss_peak_mib']:,.0f}" for s in SYSTEMS)
            has_tp = all("tensor_peak_gib" in r[s] for s in SYSTEMS)
            tp = " / ".join(f"{r[s]['tensor_peak_gib']:.2f}" for s in SYSTEMS) if has_tp else "-"
            rt = {s: f"{r[s]['tensor_peak_gib'] / r['kdcache']['tensor_peak_gib']:.2f}x" if has_tp else "-"
                  for s in ("trl-pre", "trl")}
            lines.append(f"| {r['case']} | {r['objective']} | {r['threads']} | {rss} | "
                         f"{r['trl-pre']['rss_peak_mib'] / r['kdcache']['rss_peak_mib']:.2f}x | {tp} | "
                         f"{rt['trl-pre']} | {rt['trl']} |")
    if results.get("startup"):
        s = results["startup"]
        lines += ["", "## `kdcache train` start-up (DPO, tiny; median of "
                  f"{s['reps']})", "",
                  f"- process start -> first step: {s['process_to_first_step_s']:.2f} s "
                  f"(python start and `import kdcache.train.trainer`, i.e. torch and transformers: "
                  f"{s['imports_s']:.2f} s; model loaded at {s['process_to_loaded_s']:.2f} s)",
                  f"- model loaded -> first step starts: {s['load_to_first_step_s']:.2f} s; -> first step done: "
                  f"{s.get('load_to_first_step_done_s', float('nan')):.2f} s (target: first step within 2 s of "
                  "the model load; the first store read runs in a thread during the load)"]
    for name, p in results.get("precompute", {}).items():
        lines += ["", f"## Precompute ({name}, {p['threads']} threads, median of {p['reps']})", "",
                  "kdcache precompute rows: `run_one` in-process, model load, tokenisation and store write "
                  "included; TRL's row: its `_precompute_ref_logps` alone (model already loaded); bare "
                  "forward: the decoder alone, model already loaded.", "",
                  "| what | s | tokens/s | vs bare forward |", "|---|---|---|---|"]
        tps = p["tokens_per_s"]
        labels = {"kdcache-dpo": "kdcache precompute, DPO store (--fields ref_token_logprob, teacher == reference)",
                  "kdcache-dpo-cmd": "the same as a command (`kdcache precompute ...`, process start to end)",
                  "kdcache-dpo-all": "kdcache precompute, every field (teacher == reference: one forward)",
                  "trl-ref-pass": "TRL DPOTrainer reference pass (precompute_ref_log_probs)",
                  "bare-ref": "bare forward of the reference (decoder only, same sequences)",
                  "kdcache-kd": "kdcache precompute, KD store (--fields topk_ids,topk_logprobs)",
                  "bare-teacher": "bare forward of the KD teacher"}
        for s, label in labels.items():
            if s not in tps:
                continue
            bare = tps["bare-teacher" if s in ("kdcache-kd", "bare-teacher") else "bare-ref"]
            lines.append(f"| {label} | {p['median_s'][s]:.2f} | {tps[s]:,.0f} | {tps[s] / bare:.2f} |")
    path_md.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main
def with_ext(out: Path, ext: str) -> Path:
    """--out STEM + ext (not Path.with_suffix: a stem like trl_qwen0.5b has a dot)."""
    return out.parent / (out.name + ext)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="tiny,32k")
    ap.add_argument("--objectives", default="dpo,kd")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--precompute-reps", type=int, default=1)
    ap.add_argument("--precompute-cases", default="tiny", help="cases of the precompute section")
    ap.add_argument("--trl-optim", default="adamw_torch",
                    help="TRL's --optim (adamw_torch: TrainingArguments' default; adamw_torch_fused: "
                         "the fused kernel kdcache uses)")
    ap.add_argument("--steps", type=int, default=0, help="override the case's steps")
    ap.add_argument("--rows", type=int, default=0, help="override the case's dataset rows")
    ap.add_argument("--root", default="/tmp/kdcache-bench-trl")
    ap.add_argument("--smoke", action="store_true", help="4 steps of every path, 1 rep, no results written")
    ap.add_argument("--profile", default="", help="CASE:OBJECTIVE: torch.profiler tables of kdcache and trl-pre")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: loop,startup,precompute")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "trl"))
    # child processes
    ap.add_argument("--child", default="")
    ap.add_argument("--startup-child", action="store_true")
    ap.add_argument("--precompute-child", default="")
    ap.add_argument("--case", default="tiny")
    ap.add_argument("--objective", default="dpo")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--out-json", default="")
    ap.add_argument("--profile-to", default="")
    ap.add_argument("--tensor-peak", action="store_true")
    ap.add_argument("--memory-cases", default="qwen0.5b",
                    help="cases whose rows also get each system's tensor peak (one extra process each)")
    ns = ap.parse_args()
    if ns.child or ns.startup_child or ns.precompute_child:
        ns.threads = int(str(ns.threads).split(",")[0])
    if ns.child:
        ns.system = ns.child
        return child(ns)
    if ns.startup_child:
        return startup_child(ns)
    if ns.precompute_child:
        ns.system = ns.precompute_child
        return precompute_child(ns)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench_trl needs TRL: pip install -e '.[bench]' (trl is not part of [dev])")
    os.environ["BENCH_TRL_OPTIM"] = ns.trl_optim  # the children's TRL optimizer
    out = Path(ns.out)
    if ns.report:
        write_report(json.loads(with_ext(out, ".json").read_text()), with_ext(out, ".md"))
        return
    root = Path(ns.root)
    tmp = root / "runs"
    threads = [int(x) for x in str(ns.threads).split(",")]
    cases = [CASES[c] for c in ns.cases.split(",")]
    if ns.steps or ns.rows:
        cases = [c.scaled(ns.steps or c.steps, ns.rows or c.rows) for c in cases]
    if ns.profile:
        name, objective = ns.profile.split(":")
        case = [c for c in cases if c.name == name][0] if name in [c.name for c in cases] else CASES[name]
        prepare(case, root)
        for system in ("kdcache", "trl-pre"):
            path = RESULTS / f"trl_profile_{name}_{objective}_{system}_x{threads[0]}.txt"
            spawn(system, case, objective, threads[0], root, tmp, profile_to=path)
            print(f"wrote {path}", file=sys.stderr)
        return
    if ns.smoke:
        cases = [c.scaled(4, 4 * c.batch) for c in cases]
        for c in cases:
            prepare(c, root)
            for objective in ns.objectives.split(","):
                for system in SYSTEMS:
                    r = spawn(system, c, objective, threads[0], root, tmp)
                    print(f"smoke {c.name} {objective} {system}: loop {r['loop_s']:.2f}s losses "
                          f"{[round(x, 6) for x in r['losses']]}", file=sys.stderr, flush=True)
        return
    results = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "cases": [dict(dataclasses.asdict(c), vocab=(52 if c.words == 0 else c.words + 6)) for c in cases],
               "rows": {}, "precompute": {}, "startup": None, "trl_optim": ns.trl_optim,
               "loss_rtol": LOSS_RTOL}
    if with_ext(out, ".json").exists():  # keep what other sections measured
        old = json.loads(with_ext(out, ".json").read_text())
        results["rows"] = old.get("rows", {})
        results["precompute"] = old.get("precompute", {})
        results["startup"] = old.get("startup")
        names = {c["name"] for c in results["cases"]}
        results["cases"] += [c for c in old.get("cases", []) if c["name"] not in names]

    def save() -> None:
        with_ext(out, ".json").write_text(json.dumps(results, indent=1))
        write_report(results, with_ext(out, ".md"))

    skip = set(ns.skip.split(","))
    if "loop" not in skip:
        compare(cases, ns.objectives.split(","), threads, ns.reps, root, tmp, results, save,
                tuple(ns.memory_cases.split(",")))
    if "startup" not in skip:
        results["startup"] = startup(CASES["tiny"], root, tmp, ns.reps)
        save()
    if "precompute" not in skip:
        for c in cases:
            if c.name in ns.precompute_cases.split(","):
                results["precompute"][c.name] = precompute_bench(c, root, tmp, max(threads), ns.precompute_reps)
            save()


if __name__ == "__main__":
    main()
