"""Data-parallel scaling of the trainer: 1 vs N processes under torchrun, and where a step's
time goes (compute vs gradient all-reduce).

What runs: the trainer's own pieces, unchanged — `load_student`, `distributed.wrap` (DDP),
StreamReader with this rank's windows and the per-epoch group budget, `next_batches`,
`step.train_step` — on a random-init student and a synthetic DCKD store (every response the
same length, so ranks carry equal work and imbalance does not pose as communication).
Each world size is a fresh `torchrun --nproc-per-node N` job (N = 1 is the plain
single-process path: no DDP wrapper). Per job, after warm-up steps:

  step s       median wall time of one optimizer step (every rank steps together)
  tok/s        response tokens of all ranks per second = tokens per step / step s
  all-reduce   per step, the time DDP's gradient buckets spend from hand-off to completion
               (a timing comm hook around the default all-reduce; overlapped with backward
               where the backend allows, so it can exceed what it costs)
  no-sync s    the same steps inside `no_sync()` (no all-reduce at all): step s - no-sync s
               is the communication the step actually waits for ("exposed")

Jobs alternate between world sizes (1, 2, 1, 2, ...) and the report takes medians over
repetitions, because a shared machine's load drifts.

Usage:
    python benchmarks/bench_distributed.py                       # CPU (gloo), 1 vs 2 processes
    python benchmarks/bench_distributed.py --shape qwen2.5-0.5b --worlds 1,2,4,8 \\
        --batch-groups 4 --seq 1024 --tag h100x8                   # a GPU box (NCCL, bf16)
Writes benchmarks/results/distributed[_TAG].{json,md}, naming the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
K = 20
SHAPES = {
    # fits a CPU box: ~6.6 M parameters (26 MB of fp32 gradients to all-reduce per step)
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=1024, vocab_size=4096, tie_word_embeddings=False),
    # Qwen2.5-0.5B's public config (tied embeddings)
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}


# --------------------------------------------------------------------------- setup (parent)
def build(root: Path, shape: str, seq: int, groups: int, shard_groups: int) -> tuple[str, str]:
    """A random-init student (saved as an HF dir) and a DCKD store of `groups` pairs."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kdcache.store import StoreMeta, StoreWriter
    from kdcache.train.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(max_position_embeddings=max(512, 2 * seq), bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model_dir = root / "student"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    vocab = cfg.vocab_size
    rng = np.random.default_rng(0)
    meta = StoreMeta(k=K, fields=["topk_ids", "topk_logprobs"], tokenizer={}, options={"codec": "lossless"},
                     code_version="bench")
    prompt, resp = seq // 4, seq - seq // 4
    url = str(root / "store")
    with StoreWriter(url, meta, shard_records=2 * shard_groups) as w:
        for e in range(groups):
            group = []
            for role in ("chosen", "rejected"):
                ids = rng.integers(6, vocab, size=(resp, K)).astype(np.int32)
                lp = -np.sort(rng.uniform(1.0, 6.0, size=(resp, K)), axis=-1).astype(np.float32)
                group.append({"example_id": f"e{e}", "role": role, "group": 0,
                              "prompt_ids": rng.integers(6, vocab, size=prompt).astype(np.int32),
                              "response_ids": rng.integers(6, vocab, size=resp).astype(np.int32),
                              "teacher_prompt_ids": None, "is_terminal": True, "reward": None,
                              "topk_ids": ids, "topk_logprobs": lp})
            w.add_group(group)
    return str(model_dir), url


# --------------------------------------------------------------------------- one rank (worker)
def worker(spec: dict) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from kdcache.store import StreamReader, open_store
    from kdcache.train import distributed as D
    from kdcache.train.checkpoint import set_seed
    from kdcache.train.config import TrainConfig
    from kdcache.train.data import group_stream, next_batches
    from kdcache.train.optim import make_optimizer, make_scheduler
    from kdcache.train.step import Precision, train_step
    from kdcache.train.student import StudentForward, load_student

    cfg = TrainConfig(model=spec["model"], store=spec["store"], out="unused", objective="dckd",
                      batch_groups=spec["batch_groups"], chunk_size=spec["chunk_size"], max_steps=10**6,
                      grad_checkpointing=spec["grad_checkpointing"], progress=False)
    d = D.setup(cfg)
    set_seed(0)
    device = d.device()
    model, tok = load_student(cfg, device)
    precision = Precision.for_run(cfg, device)
    student = StudentForward(model, cfg.chunk_size)
    step_model = D.wrap(d, student, cfg, precision.bf16) if d.enabled else student
    comm: list[float] = []
    if d.enabled:
        def timed(state, bucket):  # the default all-reduce, timed from hand-off to completion
            t0 = time.perf_counter()

            def done(fut):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                comm.append(time.perf_counter() - t0)
                return fut.value()

            return allreduce_hook(None, bucket).then(done)

        step_model.register_comm_hook(None, timed)
    params = [p for p in step_model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optim_settings, params)
    sched = make_scheduler(cfg.schedule_settings, opt, cfg.max_steps)
    store = open_store(cfg.store[0])  # TrainConfig.store is a list (several teachers)
    fields = ["topk_ids", "topk_logprobs"]
    budget = D.epoch_budget(store, fields, 0, d.world_size) if d.enabled else None
    groups = group_stream(StreamReader(store, fields=fields, seed=0, rank=d.rank, world_size=d.world_size),
                          budget)
    model.train()

    def run(n: int, sync: bool) -> tuple[list[float], list[float], int]:
        times, comms, tokens = [], [], 0
        for _ in range(n):
            batches, t = next_batches(groups, cfg, tok.pad_token_id or 0, (), device)
            D.barrier(d)  # every rank starts the step together
            del comm[:]
            t0 = time.perf_counter()
            if sync or not d.enabled:
                train_step(step_model, opt, sched, params, batches, cfg, 0, precision)
            else:
                with step_model.no_sync():
                    train_step(step_model, opt, sched, params, batches, cfg, 0, precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            comms.append(sum(comm))
            tokens += t
        return times, comms, tokens

    run(spec["warmup"], True)
    times, comms, tokens = run(spec["steps"], True)
    nosync = run(spec["steps"], False)[0] if d.enabled else times
    tokens = D.sum_int(d, tokens)
    # every rank's medians; the job's step time is the slowest rank's (they wait for it)
    mine = torch.tensor([statistics.median(times), statistics.median(comms), statistics.median(nosync)],
                        dtype=torch.float64, device=D.comm_device(d))
    if d.enabled:
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    if d.main:
        step_s, comm_s, nosync_s = mine.tolist()
        per_step = tokens / spec["steps"]
        print(json.dumps({"world": d.world_size, "step_s": step_s, "tokens_per_step": per_step,
                          "tok_s": per_step / step_s, "allreduce_s": comm_s, "nosync_step_s": nosync_s,
                          "params": sum(p.numel() for p in model.parameters())}), flush=True)
    D.teardown(d)


# --------------------------------------------------------------------------- orchestration
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, spec_path: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(_port()), __file__, "--worker", str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"world {world} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def summarize(runs: dict[int, list[dict]]) -> list[dict]:
    """Medians over the repetitions of each world size; the exposed communication is the
    median over repetitions of (step s - no-sync step s), measured in the same job."""
    rows = []
    for w, jobs in runs.items():
        med = {k: statistics.median(r[k] for r in jobs)
               for k in ("step_s", "tok_s", "allreduce_s", "nosync_step_s", "tokens_per_step")}
        med["exposed_s"] = statistics.median(r["step_s"] - r["nosync_step_s"] for r in jobs)
        rows.append({"world": w, "params": jobs[0]["params"], **med})
    return rows


def report(rows: list[dict], args, reps: dict, machine_name: str, when: str, load: str) -> str:
    base = next(r for r in rows if r["world"] == 1)
    lines = [
        "# Trainer data-parallel scaling (DDP under torchrun)", "",
        f"Machine: **{machine_name}**, torch {torch.__version__}, "
        f"{'NCCL' if torch.cuda.is_available() else 'gloo'}, {when}. Load average (1 min) {load}.  ",
        f"Student: `{args.shape}` shape, random init ({base['params'] / 1e6:.1f} M parameters), objective DCKD "
        f"(K={K}), per rank {args.batch_groups} pairs x {args.seq} tokens a step, "
        f"{'gradient checkpointing, ' if args.grad_checkpointing else ''}"
        f"{args.threads} intra-op thread(s) per process. {args.warmup} warm-up + {args.steps} measured steps "
        f"per job; medians over {args.reps} alternating repetitions of each world size.", "",
        "| processes | tok/s | vs 1 process | step s | all-reduce s / step | no-sync step s | exposed comm share |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        exposed = max(0.0, r["exposed_s"]) / r["step_s"]
        lines.append(f"| {r['world']} | {r['tok_s']:.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {r['step_s']:.3f} | "
                     f"{r['allreduce_s']:.3f} | {r['nosync_step_s']:.3f} | {100 * exposed:.1f}% |")
    lines += ["", "Per repetition (tok/s):", ""]
    for w, vals in reps.items():
        lines.append(f"- {w} process(es): " + ", ".join(f"{v:.0f}" for v in vals))
    lines += ["", "step s: median wall time of an optimizer step (the slowest rank's); all-reduce: time "
              "DDP's gradient buckets spend from hand-off to completion (overlaps backward); no-sync: the "
              "same steps without any all-reduce; exposed comm share: median over repetitions of "
              "(step s - no-sync s) / step s."]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def write(name: str, runs: dict[int, list[dict]], args, machine_name: str, when: str, load: str) -> str:
    rows = summarize(runs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"machine": machine_name, "when": when, "load": load, "args": vars(args), "rows": rows,
         "runs": {str(k): v for k, v in runs.items()}}, indent=2))
    md = report(rows, args, {w: [r["tok_s"] for r in runs[w]] for w in runs}, machine_name, when, load)
    (RESULTS / f"{name}.md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--worlds", default="1,2", help="process counts to compare (comma-separated)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-groups", type=int, default=4, help="preference pairs per rank per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (a quarter of it prompt)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process (CPU)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--rerender", metavar="JSON", help="rewrite the .md from a saved .json (no runs)")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    name = "distributed" + (f"_{args.tag}" if args.tag else "")
    if args.rerender:
        saved = json.loads(Path(args.rerender).read_text())
        args = argparse.Namespace(**saved["args"])
        runs = {int(k): v for k, v in saved["runs"].items()}
        print(write(name, runs, args, saved["machine"], saved.get("when", "n/a"), saved.get("load", "not recorded")))
        return None
    worlds = [int(w) for w in args.worlds.split(",")]
    if 1 not in worlds:
        worlds = [1, *worlds]
    when = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        steps_groups = (args.warmup + 2 * args.steps) * args.batch_groups
        model, store = build(root, args.shape, args.seq, steps_groups * max(worlds) + 8, args.batch_groups)
        spec = {"model": model, "store": store, "batch_groups": args.batch_groups, "warmup": args.warmup,
                "steps": args.steps, "chunk_size": args.chunk_size, "grad_checkpointing": args.grad_checkpointing}
        (root / "spec.json").write_text(json.dumps(spec))
        runs: dict[int, list[dict]] = {w: [] for w in worlds}
        for rep in range(args.reps):
            for w in worlds if rep % 2 == 0 else worlds[::-1]:
                runs[w].append(launch(w, root / "spec.json", args.threads))
                print(f"rep {rep} world {w}: {runs[w][-1]['tok_s']:.0f} tok/s", file=sys.stderr)
    print(write(name, runs, args, machine(), when, f"{load} at start, {load_average()} at end"))


if __name__ == "__main__":
    main()
