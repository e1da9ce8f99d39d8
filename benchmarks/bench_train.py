"""Trainer GPU memory / speed on a simulated 24 GB consumer card (issue "a trainer that fits a
24 GB consumer GPU", §4).

What runs: the trainer's own step, phase by phase, on random-init models of real shapes and a
synthetic ADPA store written with `kdcache.store.StoreWriter`:

    StreamReader -> select_records -> collate -> .to(device)      (data path)
    autocast(bf16) student_forward (decoder + chunked gather_logprobs) (forward)
    OBJECTIVE_SPECS["adpa"].loss                                   (loss)
    backward, clip_grad_norm_, optimizer.step, scheduler.step       (backward / optimizer)

and the SAME step with full logits materialised (`model(...).logits -> log_softmax -> gather`)
as the baseline. The student is built by the trainer's real `load_student` (its grad
checkpointing / LoRA wiring), with `from_pretrained` swapped for `from_config` on the device,
so no 6-12 GB of random weights go to disk and nothing is downloaded.

Models (targets from the issue; GiB = 2**30 bytes, the unit of a "24 GB" card):
  (a) Qwen2.5-1.5B shape, full fine-tune, seq 2048, ADPA K=50   -> peak <= 22 GiB
  (b) Qwen2.5-3B shape, LoRA r=16 on attention+MLP projections   -> peak <= 16 GiB
Each under several memory settings (`VARIANTS`): the trainer's defaults, grad checkpointing,
8-bit AdamW (bitsandbytes, optional), and bf16 weights (a setting the trainer does not have
yet: it always loads fp32; those rows say so). A 24 GiB card is simulated with
`torch.cuda.set_per_process_memory_fraction(24 GiB / total)`; an OOM under the cap is a result.
Every (variant, mode) runs in its own subprocess on CUDA so peaks and OOMs do not leak.

Usage (any CUDA box with >= 24 GiB; bitsandbytes optional):
    python benchmarks/bench_train.py                    # all variants, ours + baseline
    python benchmarks/bench_train.py --only 1.5b-full   # variants whose name contains this
    python benchmarks/bench_train.py --smoke            # tiny shapes on CPU, < 60 s
Writes benchmarks/results/train.{json,md} (train_smoke.* for --smoke), naming the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import kdcache.train.student as student_mod
from kdcache.store import StoreMeta, StoreWriter, StreamReader, open_store
from kdcache.train.batch import collate, scatter_rows
from kdcache.train.checkpoint import set_seed as _set_seed
from kdcache.train.config import TrainConfig
from kdcache.train.data import group_stream as _group_stream
from kdcache.train.objectives import OBJECTIVE_SPECS, select_records
from kdcache.train.optim import lr_lambda as _lr_lambda
from kdcache.train.optim import make_optimizer as _make_optimizer
from kdcache.train.student import StudentOut, load_student, student_forward

GIB = 2**30
CAP_GIB = 24.0
RESULTS = Path(__file__).resolve().parent / "results"

# Qwen2.5 shapes from the public configs (tied embeddings, vocab 151936).
QWEN_COMMON = dict(vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                   rms_norm_eps=1e-6, max_position_embeddings=32768)
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, **QWEN_COMMON),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, **QWEN_COMMON),
    # --smoke: same architecture and K, toy sizes
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True,
                 max_position_embeddings=512),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# One row per memory setting. `weights` is the dtype the student's parameters are loaded in:
# the trainer always loads fp32 (student.py), so "bf16" rows need a trainer flag (`needs`).
VARIANTS = [
    dict(name="1.5b-full/trainer-default", shape="qwen2.5-1.5b", lora_r=0, weights="fp32",
         optim="adamw", grad_ckpt=False, target_gib=22.0, needs=""),
    dict(name="1.5b-full/gc", shape="qwen2.5-1.5b", lora_r=0, weights="fp32",
         optim="adamw", grad_ckpt=True, target_gib=22.0, needs=""),
    dict(name="1.5b-full/gc+adamw8bit", shape="qwen2.5-1.5b", lora_r=0, weights="fp32",
         optim="adamw8bit", grad_ckpt=True, target_gib=22.0, needs="bitsandbytes"),
    dict(name="1.5b-full/gc+bf16-weights", shape="qwen2.5-1.5b", lora_r=0, weights="bf16",
         optim="adamw", grad_ckpt=True, target_gib=22.0,
         needs="trainer flag: load weights in bf16 (AdamW states then bf16 too; see docs)"),
    dict(name="3b-lora/trainer-default", shape="qwen2.5-3b", lora_r=16, weights="fp32",
         optim="adamw", grad_ckpt=False, target_gib=16.0, needs=""),
    dict(name="3b-lora/gc", shape="qwen2.5-3b", lora_r=16, weights="fp32",
         optim="adamw", grad_ckpt=True, target_gib=16.0, needs=""),
    dict(name="3b-lora/bf16-base", shape="qwen2.5-3b", lora_r=16, weights="bf16",
         optim="adamw", grad_ckpt=False, target_gib=16.0,
         needs="trainer flag: load the frozen base in bf16 under LoRA"),
    dict(name="3b-lora/gc+bf16-base", shape="qwen2.5-3b", lora_r=16, weights="bf16",
         optim="adamw", grad_ckpt=True, target_gib=16.0,
         needs="trainer flag: load the frozen base in bf16 under LoRA"),
]


# ----------------------------------------------------------------------------- the store
def synth_record(rng, eid: str, role: str, group: int, prompt_len: int, resp_len: int,
                 vocab: int, k: int) -> dict:
    """A random but valid ADPA record: unique top-K ids per row, descending top-K log-probs
    with total mass < 1, a reference gathered at the same ids. Building these from full-vocab
    teacher logits would cost T*V floats per record for no benefit to a memory benchmark."""
    T = resp_len
    start = rng.integers(0, vocab, size=(T, 1))
    stride = rng.integers(1, max(2, vocab // k), size=(T, 1))
    ids = ((start + stride * np.arange(k)) % vocab).astype(np.int32)  # distinct: stride*(k-1) < vocab
    raw = -np.sort(-rng.normal(scale=2.0, size=(T, k)), axis=-1)
    lse = np.log(np.exp(raw).sum(-1, keepdims=True))
    lp = (raw - lse - 0.1).astype(np.float32)  # leaves ~10% mass for the tail
    ref = np.minimum(lp + rng.normal(scale=0.3, size=(T, k)), -1e-3).astype(np.float32)
    resp = ids[:, 0].copy()  # the rollout follows the teacher's top-1 token
    return {
        "example_id": eid, "role": role, "group": group,
        "prompt_ids": rng.integers(0, vocab, size=prompt_len).astype(np.int32),
        "response_ids": resp, "teacher_prompt_ids": None, "is_terminal": True, "reward": None,
        "topk_ids": ids, "topk_logprobs": lp, "token_logprob": lp[:, 0].copy(),
        "ref_topk_logprobs": ref, "ref_token_logprob": ref[:, 0].copy(),
    }


def build_store(url: str, n_groups: int, vocab: int, k: int, seq_len: int, prompt_len: int,
                rollouts: int, seed: int = 0) -> None:
    """ADPA groups (one `chosen` + `rollouts` student rollouts, each seq_len tokens), written
    with the default (compact) codec precompute uses, so the reader decodes what it would in
    a real run. Small shards so the reader's prefetch threads are exercised across steps."""
    fields = ["topk_ids", "topk_logprobs", "token_logprob", "ref_topk_logprobs", "ref_token_logprob"]
    meta = StoreMeta(k=k, fields=fields, tokenizer={"vocab_size": vocab}, code_version="bench")
    rng = np.random.default_rng(seed)
    resp_len = seq_len - prompt_len
    with StoreWriter(url, meta, shard_records=4 * (1 + rollouts)) as w:
        for e in range(n_groups):
            group = [synth_record(rng, f"ex{e}", "chosen", 0, prompt_len, resp_len, vocab, k)]
            group += [synth_record(rng, f"ex{e}", "student_rollout", g, prompt_len, resp_len, vocab, k)
                      for g in range(rollouts)]
            w.add_group(group)


# ----------------------------------------------------------------------------- the student
class _Tok:
    pad_token_id = 0


@contextlib.contextmanager
def from_config_student(shape: dict, weights: str, device: torch.device):
    """Make `load_student` build a random-init model of `shape` on `device` instead of reading
    a checkpoint, so the rest of load_student (grad checkpointing, LoRA wrapping) is the
    trainer's own code. `weights="bf16"` overrides the fp32 the trainer asks for: it is what a
    bf16-weights trainer flag would do."""

    class _Auto:
        @staticmethod
        def from_pretrained(_path, dtype=torch.float32, **_kw):
            dt = torch.bfloat16 if weights == "bf16" else dtype
            with torch.device(device):  # init directly on the GPU: seconds, not minutes
                return AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dt)

    class _AutoTok:
        @staticmethod
        def from_pretrained(*_a, **_kw):
            return _Tok()

    saved = student_mod.AutoModelForCausalLM, student_mod.AutoTokenizer
    student_mod.AutoModelForCausalLM, student_mod.AutoTokenizer = _Auto, _AutoTok
    try:
        yield
    finally:
        student_mod.AutoModelForCausalLM, student_mod.AutoTokenizer = saved


def full_logits_forward(model, batch, _chunk_size: int) -> StudentOut:
    """Baseline: what a trainer without the chunked gather does. The [S, L, V] logits (bf16
    under autocast) are upcast to float32, log_softmax'ed (saved for backward) and gathered."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    rows = logp.reshape(-1, logp.shape[-1]).index_select(0, batch.rows)
    gathered = scatter_rows(rows.gather(1, batch.index), batch.mask)
    return StudentOut(token_logprobs=gathered[..., 0], topk_logprobs=gathered[..., 1:])


# ----------------------------------------------------------------------------- one run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(spec: dict) -> dict:
    """One (variant, mode): build, `warmup` + `steps` trainer steps, timed phase by phase."""
    v, mode = spec["variant"], spec["mode"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"variant": v["name"], "mode": mode, **{k: v[k] for k in
           ("shape", "lora_r", "weights", "optim", "grad_ckpt", "target_gib", "needs")},
           "chunk_size": spec["chunk_size"]}
    if v["optim"] == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {**out, "status": "skipped: bitsandbytes not installed"}
        if device.type != "cuda":
            return {**out, "status": "skipped: bitsandbytes 8-bit AdamW needs CUDA"}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if spec["cap_gib"] * GIB < total:
            torch.cuda.set_per_process_memory_fraction(spec["cap_gib"] * GIB / total)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    cfg = TrainConfig(model=spec.get("model_dir") or "<from_config>", store=spec["store"],
                      objective="adpa", max_steps=spec["warmup"] + spec["steps"],
                      batch_groups=spec["batch_groups"], chunk_size=spec["chunk_size"],
                      grad_checkpointing=v["grad_ckpt"], optim=v["optim"], lr=1e-5,
                      lora_r=v["lora_r"], lora_targets=LORA_TARGETS, progress=False)
    use_bf16 = device.type == "cuda"  # the trainer's rule (cfg.bf16 None)
    forward = student_forward if mode == "ours" else full_logits_forward
    spec_obj = OBJECTIVE_SPECS["adpa"]
    res: dict = {"status": "ok"}
    phase = "build"
    try:
        _set_seed(cfg.seed)
        loader = (contextlib.nullcontext() if spec.get("model_dir")
                  else from_config_student(SHAPES[v["shape"]], v["weights"], device))
        with loader:
            model, tok = load_student(cfg, device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        out["params_total"] = sum(p.numel() for p in model.parameters())
        out["params_trainable"] = sum(p.numel() for p in params)
        out["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        out["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
        optimizer = _make_optimizer(cfg, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, cfg.max_steps))
        store = open_store(cfg.store)
        reader = StreamReader(store, fields=list(spec_obj.fields), shuffle=True, seed=cfg.seed)
        groups = _group_stream(reader)
        if device.type == "cuda":
            out["mem_after_build_gib"] = torch.cuda.memory_allocated() / GIB
        rows, losses = [], []
        for step in range(cfg.max_steps):
            t = {}
            t0 = time.perf_counter()
            phase = "data"
            raw = [next(groups) for _ in range(cfg.batch_groups)]  # wait on fetch + decode
            t1 = time.perf_counter()
            records, block_ids = select_records(cfg.objective, raw)
            batch = collate(records, pad_id=tok.pad_token_id or 0)
            batch.block_ids, batch.betas = block_ids, tuple(store.meta.betas)
            batch = batch.to(device)
            _sync(device)
            t2 = time.perf_counter()
            t["stream"], t["collate"] = t1 - t0, t2 - t1
            optimizer.zero_grad(set_to_none=True)
            phase = "forward"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                student = forward(model, batch, cfg.chunk_size)
            _sync(device)
            t3 = time.perf_counter()
            phase = "loss"
            loss, _metrics = spec_obj.loss(student, batch, cfg, step)
            _sync(device)
            t4 = time.perf_counter()
            phase = "backward"
            loss.backward()
            losses.append(float(loss.detach()))  # the trainer reads metrics with float() too (a sync)
            t5 = time.perf_counter()
            phase = "optimizer"
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            _sync(device)
            t6 = time.perf_counter()
            t.update(forward=t3 - t2, loss=t4 - t3, backward=t5 - t4, optimizer=t6 - t5, step=t6 - t0)
            t["tokens"] = batch.num_tokens  # response tokens: the trainer's tokens/s
            t["input_tokens"] = int(batch.attention_mask.sum())
            rows.append(t)
            del student, loss, batch
        meas = rows[spec["warmup"]:]
        step_s = sum(r["step"] for r in meas)
        data_s = sum(r["stream"] + r["collate"] for r in meas)
        res.update(
            steps_measured=len(meas),
            tokens_per_s=sum(r["tokens"] for r in meas) / step_s,
            input_tokens_per_s=sum(r["input_tokens"] for r in meas) / step_s,
            step_s=step_s / len(meas),
            phase_s={p: sum(r[p] for r in meas) / len(meas)
                     for p in ("stream", "collate", "forward", "loss", "backward", "optimizer")},
            data_share=data_s / step_s,
            tokens_per_step=meas[0]["tokens"], input_tokens_per_step=meas[0]["input_tokens"],
            losses=losses,
        )
    except torch.OutOfMemoryError as e:
        res = {"status": f"OOM in {phase}", "error": str(e).splitlines()[0][:300]}
    if device.type == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        if res["status"] == "ok":
            res["meets_target"] = res["peak_reserved_gib"] <= v["target_gib"]
    gc.collect()
    return {**out, **res}


def run_isolated(spec: dict) -> dict:
    """run_one in a fresh interpreter: a clean allocator per row, and an OOM (or a crash in
    bitsandbytes) cannot poison the rows after it."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", f.name]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"variant": spec["variant"]["name"], "mode": spec["mode"],
                    "status": f"crashed (rc {p.returncode})", "error": " | ".join(tail)[:500]}
        return json.loads(Path(f.name).read_text())


# ----------------------------------------------------------------------------- smoke parity
def trainer_parity(store_url: str, root: Path, chunk_size: int) -> dict:
    """CPU check that the benchmark's step IS the trainer's step: run kdcache's `train()` and
    the benchmark loop (real load_student on a saved tiny model) for 3 steps from the same
    seed and store, and compare the per-step losses."""
    from kdcache.train.tiny import build_tokenizer, save_tiny
    from kdcache.train.trainer import train

    tok = build_tokenizer([f"w{i}" for i in range(SHAPES["tiny"]["vocab_size"] - 6)])
    model_dir = save_tiny(root / "tiny-student", tok, arch="qwen2", hidden=64, layers=2, heads=4,
                          kv_heads=2, intermediate=128, max_positions=512, tie_embeddings=True)
    steps = 3
    tr = train(TrainConfig(model=str(model_dir), store=store_url, out=str(root / "run"),
                           objective="adpa", max_steps=steps, batch_groups=1, lr=1e-5,
                           chunk_size=chunk_size, lora_targets=LORA_TARGETS, log_every=1,
                           progress=False))
    trainer_losses = [json.loads(line)["loss"] for line in (root / "run" / "metrics.jsonl").open()]
    v = dict(name="tiny-full/parity", shape="tiny", lora_r=0, weights="fp32", optim="adamw",
             grad_ckpt=False, target_gib=math.inf, needs="")
    ours = run_one(dict(variant=v, mode="ours", store=store_url, model_dir=str(model_dir),
                        warmup=0, steps=steps, batch_groups=1, chunk_size=chunk_size, cap_gib=CAP_GIB))
    return {"trainer_losses": trainer_losses, "bench_losses": ours["losses"],
            "identical": trainer_losses == ours["losses"], "trainer_steps": tr.steps}


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_total_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    m, a = report["machine"], report["args"]
    lines = [f"# Trainer memory / speed ({'CPU SMOKE — not GPU figures' if a['smoke'] else 'GPU'})", "",
             f"Machine: **{m['device']}**, torch {m['torch']} (CUDA {m['cuda']}), {m['date']}.  ",
             f"Cap: {a['cap_gib']} GiB per process (simulated consumer card)"
             + ("; not applied on CPU" if a["smoke"] else "")
             + f". Objective ADPA, K={a['k']}, seq {a['seq_len']} (prompt {a['prompt_len']}), "
             f"{a['batch_groups']} group(s) x (1 chosen + {a['rollouts']} rollout) per step, "
             f"chunk_size {a['chunk_size']}, {a['warmup']} warm-up + {a['steps']} measured steps.", ""]
    if a["smoke"]:
        lines += ["**This is the `--smoke` run: tiny shapes on CPU. It checks the script end to end; "
                  "its speeds and (absent) memory figures say nothing about a 24 GB GPU.**", ""]
    lines += ["| variant | mode | status | tok/s | step s | data share | peak alloc GiB | "
              "peak reserved GiB | target GiB | meets | needs |", "|" + "---|" * 11]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['mode']} | {r['status']} | {_fmt(r.get('tokens_per_s'), '.0f')} | "
            f"{_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('data_share') and 100 * r['data_share'], '.2f')}% | "
            f"{_fmt(r.get('peak_allocated_gib'))} | {_fmt(r.get('peak_reserved_gib'))} | "
            f"{r.get('target_gib', '')} | {r.get('meets_target', '—')} | {r.get('needs') or '—'} |")
    lines += ["", "Ours / baseline (full logits) for the same variant:", "",
              "| variant | tok/s ratio | peak alloc ratio | baseline |", "|---|---|---|---|"]
    for c in report["ratios"]:
        lines.append(f"| {c['variant']} | {_fmt(c.get('tokens_per_s_ratio'))} | "
                     f"{_fmt(c.get('peak_alloc_ratio'))} | {c['baseline_status']} |")
    if report.get("parity"):
        p = report["parity"]
        lines += ["", f"Trainer parity (CPU): `train()` losses {p['trainer_losses']} vs benchmark step "
                      f"losses {p['bench_losses']}: identical = **{p['identical']}**."]
    return "\n".join(lines) + "\n"


def ratios(results: list[dict]) -> list[dict]:
    by = {(r["variant"], r["mode"]): r for r in results}
    out = []
    for (name, mode), ours in by.items():
        base = by.get((name, "baseline"))
        if mode != "ours" or base is None:
            continue
        row = {"variant": name, "baseline_status": base["status"]}
        if ours["status"] == "ok" and base["status"] == "ok":
            row["tokens_per_s_ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
        if ours.get("peak_allocated_gib") and base.get("peak_allocated_gib") and base["status"] == "ok":
            row["peak_alloc_ratio"] = ours["peak_allocated_gib"] / base["peak_allocated_gib"]
        out.append(row)
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, no cap (< 60 s)")
    ap.add_argument("--only", default="", help="run variants whose name contains this")
    ap.add_argument("--modes", default="ours,baseline", help="ours, baseline or both")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB, help="simulated card size")
    ap.add_argument("--seq-len", type=int, default=2048, help="prompt + response tokens per record")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--batch-groups", type=int, default=1, help="groups per step (TrainConfig.batch_groups)")
    ap.add_argument("--rollouts", type=int, default=1, help="student rollouts per group")
    ap.add_argument("--chunk-size", type=int, default=1024, help="TrainConfig.chunk_size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (>= 2: AdamW states exist)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="one subprocess per row (auto: on CUDA)")
    ap.add_argument("--out", default="", help="output stem (default results/train or train_smoke)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        Path(args.child_out).write_text(json.dumps(run_one(json.loads(args.child))))
        return

    variants = VARIANTS
    if args.smoke:
        # same matrix on the toy shape; seq 128 keeps every row well under a second on CPU
        variants = [{**v, "name": v["name"].replace("1.5b", "tiny").replace("3b", "tiny"), "shape": "tiny"}
                    for v in VARIANTS]
        if args.seq_len == 2048:
            args.seq_len, args.prompt_len = 128, 32
        args.steps = min(args.steps, 3)
        # toy matmuls gain nothing from intra-op threads, and on a shared CPU the thread
        # pool's spinning made each tiny step ~50x slower
        torch.set_num_threads(1)
    variants = [v for v in variants if args.only in v["name"]]
    modes = [m for m in args.modes.split(",") if m]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and torch.cuda.is_available())
    vocab = SHAPES[variants[0]["shape"]]["vocab_size"] if variants else 0
    if any(SHAPES[v["shape"]]["vocab_size"] != vocab for v in variants):
        raise SystemExit("all selected variants must share a vocabulary (one store serves them)")

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        store_url = str(Path(tmp) / "store")
        n_groups = (args.warmup + args.steps) * args.batch_groups
        t0 = time.perf_counter()
        build_store(store_url, n_groups, vocab, args.k, args.seq_len, args.prompt_len, args.rollouts)
        print(f"store: {n_groups} groups written in {time.perf_counter() - t0:.1f}s", flush=True)
        results = []
        for v in variants:
            for mode in modes:
                spec = dict(variant=v, mode=mode, store=store_url, warmup=args.warmup, steps=args.steps,
                            batch_groups=args.batch_groups, chunk_size=args.chunk_size, cap_gib=args.cap_gib)
                r = run_isolated(spec) if isolate else run_one(spec)
                results.append(r)
                print(f"{r['variant']:<28} {mode:<8} {r['status']:<20} "
                      f"tok/s={_fmt(r.get('tokens_per_s'), '.0f')} "
                      f"peak={_fmt(r.get('peak_allocated_gib'))}/{_fmt(r.get('peak_reserved_gib'))} GiB "
                      f"data={_fmt(r.get('data_share') and 100 * r['data_share'], '.2f')}%", flush=True)
        parity = trainer_parity(store_url, Path(tmp), args.chunk_size) if args.smoke else None

    report = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "note": ("CPU SMOKE RUN on tiny shapes: checks the script end to end; NOT the GPU figures, "
                 "which are not yet measured." if args.smoke else
                 "GPU run; the 24 GiB card is simulated with set_per_process_memory_fraction."),
        "results": results,
        "ratios": ratios(results),
        "parity": parity,
        "wall_s": time.perf_counter() - t_start,
    }
    stem = Path(args.out) if args.out else RESULTS / ("train_smoke" if args.smoke else "train")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json / .md in {report['wall_s']:.1f}s")


if __name__ == "__main__":
    main()
