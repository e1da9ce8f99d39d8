"""Precompute throughput: ours (hidden states -> chunked float32 scoring) vs a bare forward
(hidden states only, the floor) vs naive (full logits -> log_softmax -> top-K).

Default: an 8B Llama-3-shaped random-init model (hidden 4096, 32 layers, 32 heads / 8 KV,
intermediate 14336, vocab 128256) in bf16 over >= 16k tokens of mixed lengths, on CUDA.
`--smoke`: a tiny model on CPU, to check the script end to end anywhere.

Writes benchmarks/results/precompute.json and .md (precompute_smoke.* for --smoke), naming
the machine. Usage:
    python benchmarks/bench_precompute.py                 # any CUDA box (~17 GB weights)
    python benchmarks/bench_precompute.py --smoke         # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from kdcache.precompute.data import Sequence
from kdcache.precompute.engine import Scorer, bucket_batches, score_sequences

# dense bf16 peak (no sparsity), for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "L4": 121.0, "4090": 165.0, "B200": 2250.0}

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=4096, max_position_embeddings=2048)


def build(shape: dict, device: torch.device, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model.eval().requires_grad_(False)


def make_sequences(total_tokens: int, min_len: int, max_len: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    seqs, n = [], 0
    while n < total_tokens:
        length = rng.randint(min_len, max_len)
        p = max(1, length // 4)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        seqs.append(Sequence(str(len(seqs)), "chosen", 0, ids[:p], ids[p:]))
        n += length
    return seqs


def flops_per_token(shape: dict, avg_len: float) -> float:
    """Forward FLOPs per token: 2 x matmul params (incl. lm_head) + causal attention."""
    h, L, i, v = (shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                      "vocab_size"))
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q,o + k,v + gate,up,down
    attn = 2 * L * avg_len * h  # QK^T and AV over half the context on average (causal)
    return 2.0 * (L * per_layer + h * v) + attn


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, batches, dev, repeat: int = 1) -> tuple[float, float]:
    """Best of `repeat` passes over all batches (after a warm-up pass over the shortest and the
    widest batch); peak memory (weights included) over the timed passes."""
    for b in {id(batches[0]): batches[0], id(batches[-1]): batches[-1]}.values():
        fn(b)  # warm-up: kernels for both ends of the length range, allocator
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return best, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--tokens", type=int, default=None, help="total tokens (default 16384)")
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=None, help="scored rows per logits chunk")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--packed", action="store_true", help="packed rows (flash_attention_2 best)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    if args.smoke:
        dev, dtype, shape = torch.device("cpu"), torch.float32, TINY
        tokens, lo, hi = args.tokens or 2048, args.min_len or 16, args.max_len or 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU box, or pass --smoke for the CPU check")
        dev, dtype, shape = torch.device("cuda"), torch.bfloat16, LLAMA3_8B
        tokens, lo, hi = args.tokens or 16384, args.min_len or 128, args.max_len or 2048
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 head stays exact

    model = build(shape, dev, dtype, args.attn)
    scorer = Scorer.from_model(model)
    seqs = make_sequences(tokens, lo, hi, shape["vocab_size"])
    n_tokens = sum(s.length for s in seqs)
    avg_len = sum(s.length ** 2 for s in seqs) / n_tokens  # token-weighted context length
    batches = [[s for g in b for s in g] for b in
               bucket_batches([[s] for s in seqs], args.batch_tokens, 4096, args.packed)]

    def bare(b):
        scorer.hidden_at_states([(s.prompt_ids, s.response_ids) for s in b], 0, args.packed)

    def ours(b):
        score_sequences(b, scorer, None, args.k, [1.0], 0, 2, args.chunk, packed=args.packed)

    def naive(b):
        width = max(s.length for s in b)
        ids = torch.zeros((len(b), width), dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(b):
            ids[i, : s.length] = torch.tensor(s.prompt_ids + s.response_ids, device=dev)
            mask[i, : s.length] = 1
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            lp.topk(args.k, -1)
            lp.logsumexp(-1)

    results = {}
    for name, fn in (("bare_forward", bare), ("ours", ours), ("naive_full_logits", naive)):
        if name == "naive_full_logits" and args.skip_naive:
            continue
        try:
            secs, peak = timed(fn, batches, dev, args.repeat)
            results[name] = {"seconds": secs, "tokens_per_s": n_tokens / secs, "peak_gib": peak}
        except torch.OutOfMemoryError as e:
            results[name] = {"error": f"OOM: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()

    # numerics at scale: ours (float32 head) vs naive (the model's own bf16 logits), batch 0
    b0 = batches[0][:4]
    recs, _ = score_sequences(b0, scorer, None, args.k, [1.0], 0, 2, args.chunk)
    with torch.no_grad():
        s = b0[0]
        z = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids], device=dev)).logits[0]
        lp = torch.log_softmax(z.float(), -1)[len(s.prompt_ids) - 1: s.length - 1]
        diff = (torch.from_numpy(recs[0]["topk_logprobs"]).to(dev)
                - lp.topk(args.k, -1).values).abs().max().item()

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    peak_tf = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    fpt = flops_per_token(shape, avg_len)
    for r in results.values():
        if "tokens_per_s" in r:
            r["achieved_tflops"] = r["tokens_per_s"] * fpt / 1e12
            r["mfu"] = r["achieved_tflops"] / peak_tf if peak_tf else None
    out = {
        "machine": {"device": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "model": {"shape": shape, "dtype": str(dtype), "attn": args.attn, "packed": args.packed,
                  "smoke": args.smoke},
        "workload": {"tokens": n_tokens, "sequences": len(seqs), "min_len": lo, "max_len": hi,
                     "batches": len(batches), "batch_tokens": args.batch_tokens, "k": args.k,
                     "chunk": args.chunk},
        # MFU counts one definition of useful work for every method: the full model's forward
        # (2 x params incl. lm_head at every token + causal attention), so bare_forward (no
        # head) and ours (head only at scored positions) are not credited for skipped work.
        "flops_per_token": fpt, "peak_tflops": peak_tf, "repeat": args.repeat, "results": results,
        "max_abs_diff_topk_logprobs_vs_model_logits": diff,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = "precompute_smoke" if args.smoke else "precompute"
    (outdir / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (outdir / f"{stem}.md").write_text(render_md(out))
    print(render_md(out))


def render_md(o: dict) -> str:
    m, w = o["machine"], o["workload"]
    lines = [
        f"# Precompute benchmark{' (CPU smoke)' if o['model']['smoke'] else ''}",
        "",
        f"Machine: **{m['device']}**, {m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']}",
        f"Model: Llama-shaped random init, hidden {o['model']['shape']['hidden_size']}, "
        f"{o['model']['shape']['num_hidden_layers']} layers, vocab {o['model']['shape']['vocab_size']}, "
        f"{o['model']['dtype']}, attn {o['model']['attn']}, packed {o['model']['packed']}",
        f"Workload: {w['tokens']} tokens in {w['sequences']} sequences of {w['min_len']}-{w['max_len']} "
        f"tokens, {w['batches']} batches of <= {w['batch_tokens']} padded tokens, K={w['k']}",
        "",
        "| method | tokens/s | peak GiB | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in o["results"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        peak = "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {peak} | "
                     f"{r['achieved_tflops']:.2f} | {mfu} |")
    lines += ["", f"Max |ours - log_softmax(model logits)| over top-K log-probs (batch 0): "
                  f"{o['max_abs_diff_topk_logprobs_vs_model_logits']:.3g} "
                  "(ours uses float32 head logits; the model's own logits are rounded to its dtype)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
