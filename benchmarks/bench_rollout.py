"""Rollout throughput: vLLM vs HF `generate`, as kdcache samples with each (`rollout --backend`).

Both sides run kdcache's own samplers over the same prompts with the same settings (n, max new
tokens, temperature 1, no top-k/top-p, the same seed) and record behaviour log-probs, as
`kdcache rollout` does: HF = `precompute.rollout.sample_hf` (one left-padded batched `generate`
with the log-prob recorder), vLLM = `precompute.vllm_backend.VLLMSampler`. EOS is an id the
prompts never use and sampling rarely hits, so both generate about max_new_tokens per row; the
rate counts the tokens each side actually generated. Repetitions alternate (hf, vllm, hf, ...)
after one warm-up each, so both see the same machine load; the result is the median of the
per-pair ratios vllm/hf.

Models (random init, saved locally with the tiny word-level tokenizer; prompts are random ids):
  tiny:    Llama, hidden 128, 2 layers, 4 heads (head dim 32), vocab 4096
  qwen05:  Qwen2.5-0.5B-shaped Qwen2: hidden 896, 24 layers, 14 / 2 KV heads, intermediate 4864,
           vocab 151,936, tied embeddings

Notes: on CPU both sides get the same thread count (--threads, default 1: vLLM's worker binds
its threads to the cores it does not reserve, one on a 2-core machine). vLLM starts an engine and a worker process; its worker is idle but alive while HF
generates. The engine's start-up (and on the first run of a shape, torch.compile's warm-up,
cached in ~/.cache/vllm afterwards) is reported separately, not in the rate.

Usage:
    python benchmarks/bench_rollout.py --model tiny                 # CPU, a minute or two
    python benchmarks/bench_rollout.py --model qwen05               # CPU, several minutes
    python benchmarks/bench_rollout.py --model qwen05 --device cuda --prompts 64 --n 8 \
        --max-new-tokens 256 --out-stem rollout_cuda               # a GPU box with vllm
Results: benchmarks/results/<out-stem>.{json,md} (one entry per model, merged into the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(arch="llama", hidden=128, layers=2, heads=4, kv_heads=4, intermediate=512,
                 vocab=4096, tie=False),
    "qwen05": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                   vocab=151936, tie=True),
}


def build(shape: dict, out: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from kdcache.train.tiny import build_tokenizer

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape["arch"]]
    cfg = cls(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
              num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
              num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
              max_position_embeddings=2048, tie_word_embeddings=shape["tie"], bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def machine(device: str) -> dict:
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"CPU {platform.processor() or platform.machine()}")
    return {"device": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="tiny", help="model shape; default tiny")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    ap.add_argument("--prompts", type=int, default=4, help="prompts; default 4")
    ap.add_argument("--prompt-len", type=int, default=32, help="mean prompt length; default 32")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt; default 2")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions; default 3")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of both sides; default 1 (vLLM's CPU worker keeps one core "
                         "of the machine in reserve: on 2 cores it computes on 1)")
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    ap.add_argument("--shared-note", default="", help="a note on the machine's load, for the results")
    ap.add_argument("--out-stem", default="rollout", help="results file stem; default rollout")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # vLLM's CPU worker reads it
    torch.set_num_threads(args.threads)
    from kdcache.precompute.rollout import sample_hf
    from kdcache.precompute.vllm_backend import VLLMSampler

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = SHAPES[args.model]
    g = torch.Generator().manual_seed(1)
    lens = [max(4, args.prompt_len + int(d)) for d in torch.randint(-8, 9, (args.prompts,), generator=g)]
    prompts = [torch.randint(10, shape["vocab"], (n,), generator=g).tolist() for n in lens]
    rows = [p for p in prompts for _ in range(args.n)]
    eos, pad = 3, 0  # <unk>: never in the prompts, rarely sampled

    with tempfile.TemporaryDirectory() as tmp:
        path = build(shape, Path(tmp) / "m", dtype)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        t0 = time.perf_counter()
        extra = {"enforce_eager": True} if args.eager else {}
        if args.device == "cuda":  # the HF copy of the model shares the GPU
            extra["gpu_memory_utilization"] = 0.5
        vs = VLLMSampler(str(path), dtype="auto", device=args.device, seed=0, **extra)
        startup = time.perf_counter() - t0
        run = {
            "hf": lambda s: sample_hf(hf, rows, pad, eos, 1.0, 1.0, 0, args.max_new_tokens, s),
            "vllm": lambda s: vs.sample(rows, eos, 1.0, 1.0, 0, args.max_new_tokens, s),
        }
        for side in run:  # warm-up
            run[side](0)
        rates: dict[str, list[float]] = {"hf": [], "vllm": []}
        for r in range(args.reps):
            for side in run:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = run[side](r + 1)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
                tokens = sum(len(ids) for ids, _ in out)
                rates[side].append(tokens / dt)
                print(f"rep {r} {side}: {tokens} tokens in {dt:.2f} s = {tokens / dt:.1f} tok/s",
                      file=sys.stderr)
        vs.close()

    ratios = [v / h for v, h in zip(rates["vllm"], rates["hf"], strict=True)]
    entry = {
        "machine": machine(args.device), "shared_note": args.shared_note,
        "model": {"name": args.model, **shape, "dtype": str(dtype).removeprefix("torch.")},
        "workload": {"prompts": args.prompts, "prompt_tokens": sum(lens), "n": args.n,
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                     "reps": args.reps, "vllm_eager": args.eager},
        "vllm_startup_s": round(startup, 1),
        "tok_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "median_tok_per_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "ratio_vllm_over_hf": {"median": round(statistics.median(ratios), 3),
                               "min": round(min(ratios), 3), "max": round(max(ratios), 3)},
    }
    res_dir = Path(__file__).parent / "results"
    jpath = res_dir / f"{args.out_stem}.json"
    allres = json.loads(jpath.read_text()) if jpath.exists() else {}
    allres[f"{args.model}-{args.device}"] = entry
    jpath.write_text(json.dumps(allres, indent=1) + "\n")
    (res_dir / f"{args.out_stem}.md").write_text(markdown(allres))
    print(json.dumps(entry))


def markdown(allres: dict) -> str:
    lines = ["# Rollout throughput: vLLM vs HF generate (kdcache's two samplers)", "",
             "Generated tokens/s at the same settings, alternating repetitions; ratio = median "
             "of the per-pair ratios vllm/hf. `benchmarks/bench_rollout.py`.", "",
             "| case | machine | workload | HF tok/s | vLLM tok/s | vLLM / HF (min–max) | vLLM start s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for key, e in allres.items():
        m, w, r = e["machine"], e["workload"], e["ratio_vllm_over_hf"]
        mach = f"{m['device']}, {m['cpu_count']} CPUs, {m['threads']} threads, torch {m['torch']}"
        if e.get("shared_note"):
            mach += f" ({e['shared_note']})"
        wl = (f"{w['prompts']} prompts ({w['prompt_tokens']} tok) x n={w['n']}, "
              f"{w['max_new_tokens']} new, T=1, {e['model']['dtype']}"
              + (", vLLM eager" if w["vllm_eager"] else ""))
        lines.append(f"| {key} | {mach} | {wl} | {e['median_tok_per_s']['hf']:.1f} | "
                     f"{e['median_tok_per_s']['vllm']:.1f} | **{r['median']:.2f}x** "
                     f"({r['min']:.2f}–{r['max']:.2f}) | {e['vllm_startup_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
