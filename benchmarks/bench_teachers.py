"""Step time of an ensemble of J = 1, 2, 4 teachers against one teacher (METHODS §4).

Every configuration runs the trainer's own step (`train_step`: collate is done once up front,
then student forward -> chunked gather at the target plus the UNION of the teachers' top-K
ids -> the objective's per-teacher terms, weighted -> backward -> clip -> AdamW) on the same
random-init student and the same synthetic sequences. The teachers' top-K ids are all
different (the worst case: the union is J x K wide). J = 1 is the plain single-store path.
Configurations alternate within each repetition (J=1, J=2, J=4, J=1, ...), so a load change
on a shared machine hits all of them alike; the ratio is of the medians of the per-rep
medians.

    python benchmarks/bench_teachers.py                 # results/teachers.{json,md}
    python benchmarks/bench_teachers.py --reps 3 --steps 4 --vocab 8192
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kdcache.train.config import TrainConfig
    from kdcache.train.data import next_batches
    from kdcache.train.memory import synthetic_groups
    from kdcache.train.optim import make_optimizer, make_scheduler
    from kdcache.train.step import Precision, train_step
    from kdcache.train.student import StudentForward

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", default="dckd", choices=("kd", "dckd", "adpa", "tvkd"))
    ap.add_argument("--teachers", default="1,2,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and repetition")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--batch-groups", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "teachers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf = Qwen2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=4 * args.hidden, vocab_size=args.vocab,
                     max_position_embeddings=2 * args.seq, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    model.train()
    js = [int(j) for j in args.teachers.split(",")]
    base = TrainConfig(model="bench", store=[f"s{i}" for i in range(max(js))], objective=args.objective,
                       batch_groups=args.batch_groups, chunk_size=1024, bf16=False, weights_dtype="fp32",
                       lr=1e-5, max_grad_norm=1.0, progress=False)
    prompt = max(1, args.seq // 8)
    setups = {}
    for j in js:
        cfg = dataclasses.replace(base, ensemble=j > 1)
        betas = (1.0, 2.0)
        group = synthetic_groups(cfg, args.seq, prompt, args.k, args.vocab, betas, teachers=j)
        batches, _ = next_batches(itertools.repeat(group), cfg, 0, betas, torch.device("cpu"),
                                  teacher_weights=(1.0 / j,) * j if j > 1 else (),
                                  teacher_betas=[betas] * j if j > 1 else None)
        setups[j] = (cfg, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(base.optim_settings, params)
    scheduler = make_scheduler(dataclasses.replace(base.schedule_settings, lr_schedule="constant"), optimizer, 10**9)
    precision = Precision(bf16=False, device_type="cpu")

    def one(j: int) -> float:
        cfg, batches = setups[j]
        t0 = time.perf_counter()
        train_step(StudentForward(model, cfg.chunk_size), optimizer, scheduler, params, batches, cfg, 0,
                   precision)
        return time.perf_counter() - t0

    for j in js:  # warm-up: allocator, optimizer state
        one(j)
    per_rep: dict[int, list[float]] = {j: [] for j in js}
    for rep in range(args.reps):
        order = js if rep % 2 == 0 else js[::-1]
        for j in order:
            per_rep[j].append(statistics.median(one(j) for _ in range(args.steps)))
        print(f"rep {rep}: " + ", ".join(f"J={j} {per_rep[j][-1] * 1e3:.1f} ms" for j in js), flush=True)
    base_s = statistics.median(per_rep[js[0]])
    rows = [{"teachers": j, "union_width": int(setups[j][1][0].index.shape[1] - 1),
             "median_step_ms": statistics.median(per_rep[j]) * 1e3,
             "min_ms": min(per_rep[j]) * 1e3, "max_ms": max(per_rep[j]) * 1e3,
             "ratio_vs_1": statistics.median(per_rep[j]) / base_s} for j in js]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"machine": f"{platform.node()}: {os.cpu_count()} CPU cores, no GPU, shared with other jobs "
                         f"(load average {load:.1f} at the end)" if load is not None else platform.node(),
              "torch": torch.__version__, "threads": args.threads, "settings": vars(args) | {"out": str(args.out)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# Ensemble step time: J teachers against one ({args.objective})", "",
          f"{result['machine']}; torch {torch.__version__}, {args.threads} thread(s). Student: Qwen2-shaped, "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.batch_groups} groups per step, "
          f"{args.seq} tokens per sequence ({prompt} prompt), K = {args.k}, teachers' ids all different. "
          f"{args.reps} alternating repetitions x {args.steps} steps; min-max are the per-repetition medians.", "",
          "| teachers J | union width | step (median) | min-max | ratio vs J = 1 |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['teachers']} | {r['union_width']} | {r['median_step_ms']:.1f} ms | "
                  f"{r['min_ms']:.1f}-{r['max_ms']:.1f} ms | {r['ratio_vs_1']:.2f}x |")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
