"""Precompute benchmarks.

1. Throughput (default): ours (hidden states -> chunked float32 scoring) vs a bare forward
   (hidden states only, the floor) vs naive (full logits -> log_softmax -> top-K). Default:
   an 8B Llama-3-shaped random-init model (hidden 4096, 32 layers, 32 heads / 8 KV,
   intermediate 14336, vocab 128256) in bf16 over >= 16k tokens of mixed lengths, on CUDA.
   `--smoke`: a tiny model on CPU. -> results/precompute{_smoke}.{json,md}
2. `--pipeline`: the whole `kdcache precompute` run (streamed JSONL -> teacher + reference ->
   store) on a synthetic dataset, with the store written by the background writer thread and
   inline, alternating; reports the time the scorer waits on the writer as a share of the
   scoring loop. GPU: Qwen2.5-1.5B-shaped random-init teacher and reference (vocab 151,936
   rows, a 151,665-token tokenizer: the padded rows are dropped), 2000 rows of 128-768 tokens.
   `--smoke`: tiny models on CPU. -> results/precompute_pipeline{_smoke}.{json,md}
3. `--rss`: peak RSS of a tokenized-only precompute (no teacher) over synthetic JSONL of 10k
   and 1M rows, each in a fresh process (`--rss-teacher`: with a tiny teacher instead; slow
   on CPU). -> results/precompute_rss.{json,md}
4. `--rss-sources`: the same peak RSS for each kind of `--data` source: the JSONL file (the
   hand-written reader) vs, through `datasets` streaming, a CSV file, a hub-snapshot folder
   (Parquet shards + README.md card) and a `save_to_disk` folder. Per size: a read-only pass
   over every row (`open_data(...).rows()`) and, up to --rss-full-rows, the whole
   tokenized-only precompute. -> results/precompute_rss_sources.{json,md}

Every result names the machine. Usage:
    python benchmarks/bench_precompute.py                 # any CUDA box (~17 GB weights)
    python benchmarks/bench_precompute.py --pipeline      # any CUDA box (~6 GB of weights)
    python benchmarks/bench_precompute.py --smoke         # CPU, seconds
    python benchmarks/bench_precompute.py --pipeline --smoke
    python benchmarks/bench_precompute.py --rss           # CPU; the 1M-row case takes a while
    python benchmarks/bench_precompute.py --rss-sources   # CPU; read-only at 1M rows: minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from kdcache.precompute.data import Sequence
from kdcache.precompute.engine import Scorer, bucket_batches, score_sequences
from kdcache.precompute.scoring import auto_chunk

# dense bf16 peak (no sparsity), for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "L4": 121.0, "4090": 165.0, "B200": 2250.0}

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=4096, max_position_embeddings=2048)
# Qwen2.5-0.5B's shape (q/k/v biases, 151,936 output rows): runs on CPU in minutes at a few
# thousand tokens, and its head (~28 % of the forward FLOPs) shows the vocabulary work that a
# 4k-vocabulary toy hides
QWEN_0_5B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 max_position_embeddings=4096, attention_bias=True)
SHAPES = {"tiny": TINY, "llama8b": LLAMA3_8B, "qwen0.5b": QWEN_0_5B}


def build(shape: dict, device: torch.device, dtype: torch.dtype, attn: str,
          seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(seed)
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


def warm_up(fn, batches, dev) -> None:
    """Kernels for both ends of the length range, allocator."""
    for b in {id(batches[0]): batches[0], id(batches[-1]): batches[-1]}.values():
        fn(b)
    sync(dev)


def timed_pass(fn, batches, dev) -> tuple[float, float, float | None]:
    """One pass over all batches: wall seconds, this process's CPU seconds, and peak memory
    (weights included) on CUDA. On a CPU shared with other jobs the wall time swings with
    their load; the CPU time of a one-thread run does not, so CPU runs compare CPU time."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        fn(b)
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return time.perf_counter() - t0, time.process_time() - c0, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="model shape (default: tiny with --smoke, llama8b on CUDA); qwen0.5b "
                         "runs on CPU (float32, --threads) or on CUDA (bf16)")
    ap.add_argument("--threads", type=int, default=2, help="CPU: intra-op threads (qwen0.5b)")
    ap.add_argument("--pipeline", action="store_true",
                    help="the whole precompute run: scorer time spent waiting on the writer")
    ap.add_argument("--rows", type=int, default=None, help="--pipeline: dataset rows")
    ap.add_argument("--rss", action="store_true", help="peak RSS, 10k vs 1M rows (streaming)")
    ap.add_argument("--rss-rows", default="10000,1000000")
    ap.add_argument("--rss-teacher", action="store_true", help="--rss with a tiny teacher")
    ap.add_argument("--rss-sources", action="store_true",
                    help="peak RSS per --data source kind (JSONL vs datasets: csv, folder, save_to_disk)")
    ap.add_argument("--rss-full-rows", type=int, default=10000,
                    help="--rss-sources: largest size also run as a whole precompute")
    ap.add_argument("--tokens", type=int, default=None, help="total tokens (default 16384)")
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=None, help="scored rows per logits chunk")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--packed", action="store_true", help="packed rows (flash_attention_2 best)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-reference", action="store_true",
                    help="no second model: skip the teacher + reference / run-once rows")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.pipeline:
        return pipeline(args)
    if args.rss:
        return rss(args)
    if args.rss_sources:
        return rss_sources(args)

    if args.smoke:
        torch.set_num_threads(1)  # a tiny model on a shared box: one thread is steadier
        dev, dtype, shape = torch.device("cpu"), torch.float32, TINY
        tokens, lo, hi = args.tokens or 2048, args.min_len or 16, args.max_len or 256
    elif args.shape == "qwen0.5b" and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
        dev, dtype, shape = torch.device("cpu"), torch.float32, QWEN_0_5B
        tokens, lo, hi = args.tokens or 1536, args.min_len or 64, args.max_len or 384
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU box, or pass --smoke for the CPU check")
        dev, dtype, shape = torch.device("cuda"), torch.bfloat16, SHAPES[args.shape or "llama8b"]
        tokens, lo, hi = args.tokens or 16384, args.min_len or 128, args.max_len or 2048
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 head stays exact

    model = build(shape, dev, dtype, args.attn)
    scorer = Scorer.from_model(model)
    # a second model of the same shape: the reference, for the teacher + reference rows
    ref_scorer = None if args.skip_reference else Scorer.from_model(
        build(shape, dev, dtype, args.attn, seed=1))
    seqs = make_sequences(tokens, lo, hi, shape["vocab_size"])
    n_tokens = sum(s.length for s in seqs)
    avg_len = sum(s.length ** 2 for s in seqs) / n_tokens  # token-weighted context length
    batches = [[s for g in b for s in g] for b in
               bucket_batches([[s] for s in seqs], args.batch_tokens, 4096, args.packed)]

    def bare(b):
        scorer.hidden_at_states([(s.prompt_ids, s.response_ids) for s in b], 0, args.packed)

    def ours(b):
        score_sequences(b, scorer, None, args.k, [1.0], 0, 2, args.chunk, packed=args.packed)

    def bare_x2(b):  # two decoder forwards
        bare(b)
        ref_scorer.hidden_at_states([(s.prompt_ids, s.response_ids) for s in b], 0, args.packed)

    # The floor of a scoring pass: the decoder AND the output head over the scored states
    # (s_1..s_{T+1} of every response), as plain float32 matmuls in the same chunks as ours,
    # the logits thrown away: no top-K, no log-softmax, no gather, no soft values.
    chunk = args.chunk or auto_chunk(shape["vocab_size"])

    def head_rows(sc, b):
        h = sc.hidden_at_states([(s.prompt_ids, s.response_ids) for s in b], 0, args.packed)
        for i in range(0, h.shape[0], chunk):
            sc.head.logits(h[i:i + chunk])  # the float32 logits ours computes, no more

    def floor(b):
        head_rows(scorer, b)

    def floor_x2(b):
        head_rows(scorer, b)
        head_rows(ref_scorer, b)

    def ours_teacher_ref(b):  # two models: every field, teacher and reference
        score_sequences(b, scorer, ref_scorer, args.k, [1.0], 0, 2, args.chunk,
                        packed=args.packed)

    def ours_same_model(b):  # teacher == reference (same fingerprint): one forward
        score_sequences(b, scorer, scorer, args.k, [1.0], 0, 2, args.chunk, packed=args.packed)

    def ours_seq_logprobs(b):  # a DPO store: ref_token_logprob only, no top-K, one forward
        score_sequences(b, None, scorer, args.k, [1.0], 0, 2, args.chunk, packed=args.packed,
                        fields=("ref_token_logprob",))

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
    methods = [("bare_forward", bare, 1), ("floor", floor, 1), ("ours", ours, 1)]
    if ref_scorer is not None:
        methods += [("bare_forward_x2", bare_x2, 2), ("floor_x2", floor_x2, 2),
                    ("ours_teacher_ref", ours_teacher_ref, 2),
                    ("ours_same_model", ours_same_model, 1),
                    ("ours_seq_logprobs", ours_seq_logprobs, 1)]
    if not args.skip_naive:
        methods.append(("naive_full_logits", naive, 1))
    n_models = {name: m for name, _, m in methods}
    runs: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    cpu_runs: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    for name, fn, _ in methods:
        try:
            warm_up(fn, batches, dev)
        except torch.OutOfMemoryError as e:
            results[name] = {"error": f"OOM: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
    # repetitions alternate over the methods (rotating who goes first), so that a shared
    # machine's load falls on all of them alike; the best pass of each is reported
    live = [m for m in methods if m[0] not in results]
    peaks: dict[str, float | None] = {}
    for rep in range(max(1, args.repeat)):
        for name, fn, _ in live[rep % len(live):] + live[:rep % len(live)]:
            secs, cpu, peak = timed_pass(fn, batches, dev)
            runs[name].append(secs)
            cpu_runs[name].append(cpu)
            peaks[name] = peak if peaks.get(name) is None else max(peaks[name], peak)
            print(f"rep {rep} {name}: {n_tokens / secs:,.0f} tok/s wall, {n_tokens / cpu:,.0f} tok per "
                  "CPU-s", file=sys.stderr, flush=True)
    # CUDA: wall time (the GPU's). CPU: CPU time, robust to other jobs on a shared machine
    # (median of the passes); tokens_per_s is then tokens per CPU-second of this process
    use_cpu_time = dev.type == "cpu"
    for name, _, _ in live:
        secs = statistics.median(cpu_runs[name]) if use_cpu_time else min(runs[name])
        results[name] = {"seconds": secs, "tokens_per_s": n_tokens / secs, "peak_gib": peaks[name],
                         "passes_wall_s": runs[name], "passes_cpu_s": cpu_runs[name]}
    ratios = {}
    for ours_name, floor_name in (("ours", "floor"), ("ours_same_model", "floor"),
                                  ("ours_seq_logprobs", "floor"), ("ours_teacher_ref", "floor_x2")):
        if "tokens_per_s" in results.get(ours_name, {}) and "tokens_per_s" in results.get(floor_name, {}):
            ratios[f"{ours_name}/{floor_name}"] = (results[ours_name]["tokens_per_s"]
                                                   / results[floor_name]["tokens_per_s"])

    # numerics at scale: ours (float32 head) vs naive (the model's own bf16 logits), batch 0
    b0 = batches[0][:4]
    recs, _ = score_sequences(b0, scorer, None, args.k, [1.0], 0, 2, args.chunk)
    with torch.no_grad():
        s = b0[0]
        z = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids], device=dev)).logits[0]
        lp = torch.log_softmax(z.float(), -1)[len(s.prompt_ids) - 1: s.length - 1]
        diff = (torch.from_numpy(recs[0]["topk_logprobs"]).to(dev)
                - lp.topk(args.k, -1).values).abs().max().item()

    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    peak_tf = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    fpt = flops_per_token(shape, avg_len)
    for method, r in results.items():
        r["models"] = n_models[method]
        if "tokens_per_s" in r:  # useful work: one full forward per model of the method
            r["achieved_tflops"] = r["tokens_per_s"] * fpt * n_models[method] / 1e12
            r["mfu"] = r["achieved_tflops"] / peak_tf if peak_tf else None
    out = {
        "machine": {"device": device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "platform": platform.platform(), "threads": torch.get_num_threads(),
                    "load_avg_at_end": os.getloadavg()},
        "model": {"shape": shape, "dtype": str(dtype), "attn": args.attn, "packed": args.packed,
                  "smoke": args.smoke},
        "workload": {"tokens": n_tokens, "sequences": len(seqs), "min_len": lo, "max_len": hi,
                     "batches": len(batches), "batch_tokens": args.batch_tokens, "k": args.k,
                     "chunk": args.chunk},
        # MFU counts one definition of useful work for every method: the full model's forward
        # (2 x params incl. lm_head at every token + causal attention), so bare_forward (no
        # head) and ours (head only at scored positions) are not credited for skipped work.
        "flops_per_token": fpt, "peak_tflops": peak_tf, "repeat": args.repeat, "results": results,
        "timing": "median CPU time of the passes (tokens per CPU-second)" if dev.type == "cpu"
                  else "best wall time of the passes",
        "max_abs_diff_topk_logprobs_vs_model_logits": diff, "ratios_to_floor": ratios,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = "precompute_smoke" if args.smoke else (
        "precompute" if args.shape in (None, "llama8b") else f"precompute_{args.shape}")
    if args.shape == "qwen0.5b" and dev.type == "cpu":
        stem += "_cpu"
    (outdir / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (outdir / f"{stem}.md").write_text(render_md(out))
    print(render_md(out))


def render_md(o: dict) -> str:
    m, w = o["machine"], o["workload"]
    lines = [
        f"# Precompute benchmark{' (CPU smoke)' if o['model']['smoke'] else ''}",
        "",
        f"Machine: **{m['device']}**, {m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']}",
        f"Model: {'Qwen2 (q/k/v biases)' if o['model']['shape'].get('attention_bias') else 'Llama'}-shaped random init, hidden {o['model']['shape']['hidden_size']}, "
        f"{o['model']['shape']['num_hidden_layers']} layers, vocab {o['model']['shape']['vocab_size']}, "
        f"{o['model']['dtype']}, attn {o['model']['attn']}, packed {o['model']['packed']}",
        f"Workload: {w['tokens']} tokens in {w['sequences']} sequences of {w['min_len']}-{w['max_len']} "
        f"tokens, {w['batches']} batches of <= {w['batch_tokens']} padded tokens, K={w['k']}",
        "",
        "Methods: bare_forward = decoder only; floor = decoder + the output head's matmul over "
        "the scored states (the least a scoring pass must do); ours = teacher fields (top-K, token "
        "log-prob, soft value); *_x2 / ours_teacher_ref = teacher + a second model as reference; "
        "ours_same_model = teacher == reference (same fingerprint): ONE forward gives both; "
        "ours_seq_logprobs = a DPO store (ref_token_logprob only: no top-K, no soft values, one "
        "forward); naive = full [B, T, V] logits. Compare ours, ours_same_model and "
        "ours_seq_logprobs with floor, ours_teacher_ref with floor_x2. Repetitions alternate "
        f"over the methods; timing: {o.get('timing', 'best wall time of the passes')}.",
        "",
        "| method | models | tokens/s | peak GiB | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in o["results"].items():
        if "error" in r:
            lines.append(f"| {name} | {r.get('models', 1)} | {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        peak = "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {name} | {r.get('models', 1)} | {r['tokens_per_s']:,.0f} | {peak} | "
                     f"{r['achieved_tflops']:.2f} | {mfu} |")
    lines += ["", f"Max |ours - log_softmax(model logits)| over top-K log-probs (batch 0): "
                  f"{o['max_abs_diff_topk_logprobs_vs_model_logits']:.3g} "
                  "(ours uses float32 head logits; the model's own logits are rounded to its dtype)", ""]
    if o.get("ratios_to_floor"):
        lines += ["| ratio to the floor (tokens/s) | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in o["ratios_to_floor"].items()]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- pipeline

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 max_position_embeddings=4096)
TINY_PIPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=4096, max_position_embeddings=512)
SPECIALS = 6  # kdcache.train.tiny's special tokens


def _machine() -> dict:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()}"
    return {"device": dev, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform()}


def _save_model(path: Path, shape: dict, tok, seed: int, dtype: torch.dtype) -> None:
    """A Qwen2-shaped model (q/k/v biases) as a Llama config: a Qwen2 config would make
    AutoTokenizer load the synthetic word-level tokenizer as a Qwen2 (byte-level) one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, attention_bias=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _write_jsonl(path: Path, rows: int, words: list[str], prompt: tuple[int, int],
                 response: tuple[int, int], seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({
                "id": f"r{i}",
                "prompt": " ".join(rng.choices(words, k=rng.randint(*prompt))),
                "chosen": " ".join(rng.choices(words, k=rng.randint(*response))),
                "rejected": " ".join(rng.choices(words, k=rng.randint(*response)))}) + "\n")


def pipeline(args) -> None:
    """The whole run through `run_one`, background writer vs inline, alternating."""
    import tempfile

    from kdcache.precompute import run as run_mod
    from kdcache.precompute.run import PrecomputeConfig, run_one
    from kdcache.train.tiny import build_tokenizer

    gpu = not args.smoke
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU box, or pass --smoke for the CPU check")
    if not gpu:  # tiny models: one intra-op thread; the other core is the writer's
        torch.set_num_threads(1)
    shape = QWEN_1_5B if gpu else TINY_PIPE
    n_tok = 151665 if gpu else shape["vocab_size"]  # Qwen2.5: 151,665 ids, 151,936 rows
    rows = args.rows or (2000 if gpu else 600)
    lens = ((64, 256), (64, 512)) if gpu else ((4, 24), (8, 96))
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    words = [f"w{i}" for i in range(n_tok - SPECIALS)]
    tok = build_tokenizer(words=words)
    dtype = torch.bfloat16 if gpu else torch.float32
    for name, seed in (("teacher", 1), ("reference", 2)):
        _save_model(work / name, shape, tok, seed, dtype)
    _write_jsonl(work / "data.jsonl", rows, words, *lens)
    cfg = dict(teacher=str(work / "teacher"), reference=str(work / "reference"),
               data=str(work / "data.jsonl"), k=args.k, betas=[1.0, 2.0], progress=False,
               batch_tokens=args.batch_tokens if gpu else 2048, codec="compact")
    runs = []
    for rep in range(max(1, args.repeat)):
        for background in (True, False):  # alternating: both see the same machine load
            run_mod.BACKGROUND_WRITER = background
            out = work / f"out-{rep}-{background}"
            t: dict[str, float] = {}
            run_one(PrecomputeConfig(**cfg, out=str(out)), t)
            score_s = t["loop_s"] - t.get("load_s", 0.0)
            waited = t["writer_wait_s"] + t["writer_drain_s"]
            runs.append({"writer": "background" if background else "inline", "rep": rep, **t,
                         "score_s": score_s, "waited_s": waited,
                         "wait_share": (waited if background else t["writer_busy_s"]) / score_s,
                         "tokens_per_s": t["tokens"] / score_s})
    run_mod.BACKGROUND_WRITER = True
    summary = {}
    for mode in ("background", "inline"):
        rs = [r for r in runs if r["writer"] == mode]
        summary[mode] = {k: sorted(r[k] for r in rs)[len(rs) // 2]
                         for k in ("wait_share", "tokens_per_s", "score_s", "writer_busy_s")}
    out = {"machine": _machine(), "smoke": args.smoke, "model": {"shape": shape, "dtype": str(dtype),
           "tokenizer_ids": n_tok, "teacher_and_reference": True},
           "workload": {"rows": rows, "prompt_words": lens[0], "response_words": lens[1],
                        "k": args.k, "batch_tokens": cfg["batch_tokens"], "codec": "compact"},
           "runs": runs, "median": summary,
           "speedup_background_vs_inline": summary["background"]["tokens_per_s"]
           / summary["inline"]["tokens_per_s"]}
    stem = "precompute_pipeline_smoke" if args.smoke else "precompute_pipeline"
    _save(args, stem, out, render_pipeline(out))


def render_pipeline(o: dict) -> str:
    m, w = o["machine"], o["workload"]
    lines = [f"# Precompute pipeline: scorer time waiting on the writer{' (CPU smoke)' if o['smoke'] else ''}",
             "", f"Machine: **{m['device']}**, {m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']}",
             f"Models: teacher + reference, Qwen2-shaped (Llama config with q/k/v biases) random init, hidden {o['model']['shape']['hidden_size']}, "
             f"{o['model']['shape']['num_hidden_layers']} layers, {o['model']['shape']['vocab_size']} output rows "
             f"({o['model']['tokenizer_ids']} tokenizer ids), {o['model']['dtype']}",
             f"Workload: {w['rows']} synthetic rows (prompt {w['prompt_words']} words, chosen/rejected "
             f"{w['response_words']} words), K={w['k']}, batch_tokens {w['batch_tokens']}, codec {w['codec']}",
             "", "Scoring loop = streaming + tokenizing + forwards + scoring + handing groups to the writer + "
             "the final drain (model loading excluded). *waited* = scorer blocked on a full writer queue + "
             "the final drain; for the inline writer the whole writer time is waited.", "",
             "| writer | rep | scoring loop s | writer busy s | scorer waited s | share of loop | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in o["runs"]:
        waited = r["waited_s"] if r["writer"] == "background" else r["writer_busy_s"]
        lines.append(f"| {r['writer']} | {r['rep']} | {r['score_s']:.2f} | {r['writer_busy_s']:.2f} | "
                     f"{waited:.2f} | {100 * r['wait_share']:.1f}% | {r['tokens_per_s']:,.0f} |")
    b, i = o["median"]["background"], o["median"]["inline"]
    lines += ["", f"Median: background writer {100 * b['wait_share']:.1f}% of the loop waiting, "
                  f"{b['tokens_per_s']:,.0f} tok/s; inline {100 * i['wait_share']:.1f}%, "
                  f"{i['tokens_per_s']:,.0f} tok/s (x{o['speedup_background_vs_inline']:.2f}).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- RSS

_RSS_CHILD = """
import json, resource, sys, time
from kdcache.precompute.run import PrecomputeConfig, run_one
kw = json.loads(sys.argv[1])
t = {}
t0 = time.perf_counter()
if kw:
    run_one(PrecomputeConfig(**kw), t)
print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0, **t}))
"""


def rss(args) -> None:
    """Peak RSS of one precompute process per dataset size (streaming: should not grow with
    the number of rows beyond the per-id bookkeeping)."""
    import subprocess
    import sys
    import tempfile

    from kdcache.train.tiny import build_tokenizer, save_tiny

    work = Path(tempfile.mkdtemp(prefix="kdcache-rss-"))
    words = [f"w{i}" for i in range(4090)]
    tok = build_tokenizer(words=words)
    tok.save_pretrained(work / "tok")
    if args.rss_teacher:
        save_tiny(work / "teacher", tokenizer=tok, seed=1)

    def child(kw: dict) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        res = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(kw)], env=env,
                             capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    base = child({})  # the interpreter with torch, transformers and kdcache imported
    results = []
    for n in [int(x) for x in args.rss_rows.split(",")]:
        data = work / f"d{n}.jsonl"
        _write_jsonl(data, n, words, (2, 12), (2, 30))
        kw = dict(data=str(data), out=str(work / f"out{n}"), progress=False)
        kw.update(teacher=str(work / "teacher"), k=8) if args.rss_teacher else \
            kw.update(tokenizer=str(work / "tok"))
        r = child(kw)
        r.update(rows=n, data_mb=data.stat().st_size / 2**20)
        results.append(r)
        print(json.dumps(r), flush=True)
    out = {"machine": _machine(), "teacher": "tiny (2 layers, hidden 64)" if args.rss_teacher
           else None, "baseline_maxrss_mib": base["maxrss_mib"], "results": results}
    _save(args, "precompute_rss" + ("_teacher" if args.rss_teacher else ""), out, render_rss(out))


def render_rss(o: dict) -> str:
    m = o["machine"]
    what = (f"with a {o['teacher']} teacher" if o["teacher"] else
            "tokenized-only (no teacher: every row is read, checked, tokenized twice and written)")
    lines = ["# Precompute peak memory: 10k vs 1M rows", "",
             f"Machine: **{m['device']}**, {m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']}",
             f"Run: `kdcache precompute` {what}, one fresh process per size; synthetic JSONL rows "
             "(prompt 2-12 words, chosen/rejected 2-30 words), default --bucket-window 4096, "
             "--check-data on. Peak RSS = ru_maxrss of the process; the bare interpreter with "
             f"torch, transformers and kdcache imported peaks at {o['baseline_maxrss_mib']:.0f} MiB.", "",
             "| rows | data MiB | tokens | seconds | peak RSS MiB | above the bare interpreter |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in o["results"]:
        lines.append(f"| {r['rows']:,} | {r['data_mb']:.1f} | {int(r.get('tokens', 0)):,} | "
                     f"{r['seconds']:.0f} | {r['maxrss_mib']:.0f} | "
                     f"{r['maxrss_mib'] - o['baseline_maxrss_mib']:.0f} |")
    return "\n".join(lines + [""])


_SRC_CHILD = """
import json, resource, sys, time
import datasets  # noqa: F401 - imported in every case, the baseline included
from kdcache.precompute.sources import open_data
from kdcache.precompute.run import PrecomputeConfig, run_one
kw = json.loads(sys.argv[1])
t, n = {}, 0
t0 = time.perf_counter()
if kw.get("read"):
    for src in open_data(kw["read"]).rows():
        n += len(src.row)
elif kw:
    run_one(PrecomputeConfig(**kw), t)
# VmHWM: this image's own peak. ru_maxrss keeps the parent's RSS at fork across exec on
# Linux, so a child lighter than the benchmark process would read the parent's peak.
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
print(json.dumps({"maxrss_mib": hwm / 1024, "seconds": time.perf_counter() - t0, **t}))
"""


def _write_sources(work: Path, jsonl: Path, n: int) -> dict[str, Path]:
    """The JSONL rows as a CSV file, a hub-snapshot folder and a save_to_disk folder (written
    in blocks; only the save_to_disk step holds the table, memory-mapped)."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {"jsonl": jsonl, "csv": work / f"d{n}.csv", "folder": work / f"snap{n}",
           "save_to_disk": work / f"disk{n}"}
    (out["folder"] / "data").mkdir(parents=True)
    (out["folder"] / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\n---\n# synthetic preference rows\n")
    block, shard = [], 0
    with open(jsonl) as f, open(out["csv"], "w", newline="") as c:
        w = csv.DictWriter(c, fieldnames=["id", "prompt", "chosen", "rejected"])
        w.writeheader()
        for line in f:
            row = json.loads(line)
            w.writerow(row)
            block.append(row)
            if len(block) == 100_000:
                pq.write_table(pa.Table.from_pylist(block),
                               out["folder"] / "data" / f"train-{shard:05d}.parquet")
                block, shard = [], shard + 1
    if block:
        pq.write_table(pa.Table.from_pylist(block),
                       out["folder"] / "data" / f"train-{shard:05d}.parquet")
    files = sorted(str(p) for p in (out["folder"] / "data").iterdir())
    datasets.Dataset.from_parquet(files, cache_dir=str(work / "hf-cache")).save_to_disk(
        str(out["save_to_disk"]))
    return out


def rss_sources(args) -> None:
    """Peak RSS per --data source kind, each in a fresh process; read-only at every size,
    the whole tokenized-only precompute up to --rss-full-rows."""
    import subprocess
    import sys
    import tempfile

    from kdcache.train.tiny import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="kdcache-rss-src-"))
    words = [f"w{i}" for i in range(4090)]
    build_tokenizer(words=words).save_pretrained(work / "tok")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf-cache"))

    def child(kw: dict) -> dict:
        res = subprocess.run([sys.executable, "-c", _SRC_CHILD, json.dumps(kw)], env=env,
                             capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        return json.loads(res.stdout.strip().splitlines()[-1])

    base = child({})
    results = []
    for n in [int(x) for x in args.rss_rows.split(",")]:
        jsonl = work / f"d{n}.jsonl"
        _write_jsonl(jsonl, n, words, (2, 12), (2, 30))
        for kind, path in _write_sources(work, jsonl, n).items():
            r = child({"read": str(path)})
            r.update(rows=n, source=kind, run="read every row")
            results.append(r)
            print(json.dumps(r), flush=True)
            if n <= args.rss_full_rows:
                r = child(dict(data=str(path), out=str(work / f"out-{kind}-{n}"),
                               tokenizer=str(work / "tok"), progress=False))
                r.update(rows=n, source=kind, run="tokenized-only precompute")
                results.append(r)
                print(json.dumps(r), flush=True)
    out = {"machine": _machine(), "baseline_maxrss_mib": base["maxrss_mib"], "results": results}
    _save(args, "precompute_rss_sources", out, render_rss_sources(out))


def render_rss_sources(o: dict) -> str:
    m = o["machine"]
    lines = ["# Precompute peak memory per --data source: JSONL reader vs `datasets` streaming", "",
             f"Machine: **{m['device']}**, {m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']}",
             "Run: one fresh process per table row; the same synthetic rows (prompt 2-12 words, "
             "chosen/rejected 2-30 words) as a JSONL file (hand-written reader), a CSV file, a "
             "hub-snapshot folder (Parquet shards of 100k rows + README.md card) and a "
             "save_to_disk folder (the three through `datasets`, streamed). Peak RSS = "
             "the process's VmHWM (Linux); the bare interpreter with torch, transformers, datasets and kdcache "
             f"imported peaks at {o['baseline_maxrss_mib']:.0f} MiB.", "",
             "| rows | source | run | seconds | peak RSS MiB | above the bare interpreter |",
             "|---:|---|---|---:|---:|---:|"]
    for r in o["results"]:
        lines.append(f"| {r['rows']:,} | {r['source']} | {r['run']} | {r['seconds']:.0f} | "
                     f"{r['maxrss_mib']:.0f} | {r['maxrss_mib'] - o['baseline_maxrss_mib']:.0f} |")
    return "\n".join(lines + [""])


def _save(args, stem: str, out: dict, md: str) -> None:
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (outdir / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
