"""Store benchmark: bytes/token and error per codec on realistic teacher distributions,
the bytes/token vs error-bound curve, and StreamReader decode throughput.

Not a test.  Run:  python benchmarks/bench_store.py [--ref-steps 300] [--dpo-steps 200]
[--train-s 90] [--tokens 150000] [--read-repeats 5]

Teachers: a tiny byte-level causal LM (2 layers, d=128) trained on this repository's own
*.md/*.py text — "ref" after `--ref-steps` steps, "dpo" after a further `--dpo-steps` steps
on the *.py files only (a shifted, sharper distribution, as DPO produces); each stage is
capped at `--train-s` seconds (step counts make the teachers independent of machine load
unless the cap bites; the steps actually run are recorded).  Held-out text is
scored by both: top-50 of dpo, ref log-probs gathered at those ids, token log-probs, soft
values V_β for β ∈ {1, 2}.  Caveat: a 256-symbol byte vocabulary makes ids cheaper than a
32k–150k BPE vocabulary would; ids are reported separately so the reader can judge.
Results go to benchmarks/results/store.json and store.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from kdcache.store import StoreMeta, StoreWriter, StreamReader, open_store
from kdcache.store.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
K = 50
BETAS = [1.0, 2.0]
CTX = 128
FIELDS = ["topk_ids", "topk_logprobs", "ref_topk_logprobs", "token_logprob", "soft_value"]
ADPA_FIELDS = ["topk_ids", "topk_logprobs", "ref_topk_logprobs", "token_logprob"]


# ----------------------------------------------------------------------------- teacher
class TinyLM(nn.Module):
    def __init__(self, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Embedding(CTX, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CTX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.emb(x) + self.pos(torch.arange(T))
        return self.head(self.body(h, mask=self.mask[:T, :T], is_causal=True))


def corpus(suffixes: tuple[str, ...]) -> bytes:
    skip = {"venv", ".venv", "build", ".git", "node_modules", "results"}
    parts = []
    for p in sorted(ROOT.rglob("*")):
        if p.suffix in suffixes and p.is_file() and not (set(p.parts) & skip):
            parts.append(p.read_bytes())
    return b"\n".join(parts)


def train(model: TinyLM, data: np.ndarray, steps_max: int, seconds: float,
          lr: float = 3e-3) -> int:
    """`steps_max` steps (reproducible whatever the machine load), capped at `seconds`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    t0, steps = time.time(), 0
    while steps < steps_max and time.time() - t0 < seconds:
        idx = rng.integers(0, len(data) - CTX - 1, 32)
        xb = torch.from_numpy(np.stack([data[i : i + CTX + 1] for i in idx]).astype(np.int64))
        logits = model(xb[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), xb[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps


@torch.no_grad()
def score(dpo: TinyLM, ref: TinyLM, data: np.ndarray, n_tokens: int) -> list[list[dict]]:
    """Groups of 2 records (chosen/rejected) of T = CTX - 1 scored tokens each."""
    T = CTX - 1
    n_seq = n_tokens // T
    groups, recs = [], []
    for s in range(n_seq):
        start = (s * CTX) % (len(data) - CTX - 1)
        x = torch.from_numpy(data[start : start + CTX].astype(np.int64))[None]
        zd = dpo(x)[0].double()  # [CTX, 256]; state t predicts x[t+1]
        lp_d = torch.log_softmax(zd, -1)
        lp_r = torch.log_softmax(ref(x)[0].double(), -1)
        y = x[0, 1:]
        top = lp_d[:-1].topk(K, dim=-1)
        sv = torch.stack([b * torch.logsumexp(zd / b, -1) for b in BETAS], -1)  # [CTX, B]
        recs.append({
            "example_id": f"ex{s // 2:06d}", "role": "chosen" if s % 2 == 0 else "rejected",
            "prompt_ids": x[0, :1].numpy(), "response_ids": y.numpy(), "is_terminal": False,
            "topk_ids": top.indices.numpy(), "topk_logprobs": top.values.numpy(),
            "ref_topk_logprobs": lp_r[:-1].gather(-1, top.indices).numpy(),
            "token_logprob": lp_d[:-1].gather(-1, y[:, None])[:, 0].numpy(),
            "soft_value": sv[:T + 1].numpy(),
        })
        if s % 2 == 1:
            groups.append(recs)
            recs = []
    return groups


# ----------------------------------------------------------------------------- stores
def write(url: str, groups: list[list[dict]], options: dict, version: int | None = None) -> float:
    meta = StoreMeta(k=K, betas=BETAS, fields=FIELDS, options=options,
                     models={"dpo": {"name": "tinylm-dpo"}, "ref": {"name": "tinylm-ref"}},
                     tokenizer={"name": "bytes"}, dataset={"name": "kdcache-repo-text"})
    t = time.perf_counter()
    kw = {} if version is None else {"_schema_version": version}
    with StoreWriter(url, meta, shard_records=256, **kw) as w:
        for g in groups:
            w.add_group(g)
    return time.perf_counter() - t


def errors(groups: list[list[dict]], url: str) -> dict:
    st = open_store(url)
    out = {f: [0.0, 0.0, 0] for f in FIELDS if f != "topk_ids"}
    ids_exact = True
    for a, b in zip([r for g in groups for r in g], st, strict=True):
        ids_exact &= bool(np.array_equal(a["topk_ids"], b["topk_ids"]))
        for f, acc in out.items():
            e = np.abs(np.asarray(a[f], np.float64) - b[f].astype(np.float64))
            acc[0] = max(acc[0], float(e.max()))
            acc[1] += float(e.sum())
            acc[2] += e.size
    return {"ids_exact": ids_exact,
            **{f: {"max_abs": m, "mean_abs": s / n} for f, (m, s, n) in out.items()}}


def parquet_baseline(groups: list[list[dict]], path: str) -> dict:
    """One row per token, pyarrow's strongest settings: zstd 22, byte-stream-split floats."""
    recs = [r for g in groups for r in g]
    cat = {f: np.concatenate([np.asarray(r[f]) for r in recs]) for f in FIELDS}
    n = len(cat["token_logprob"])
    sv = np.concatenate([np.asarray(r["soft_value"])[:-1] for r in recs])  # T rows per token
    last = np.stack([np.asarray(r["soft_value"])[-1] for r in recs])

    def fsl(a: np.ndarray, t: pa.DataType) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=t), a.shape[1])

    table = pa.table({
        "topk_ids": fsl(cat["topk_ids"].astype(np.int32), pa.int32()),
        "topk_logprobs": fsl(cat["topk_logprobs"].astype(np.float32), pa.float32()),
        "ref_topk_logprobs": fsl(cat["ref_topk_logprobs"].astype(np.float32), pa.float32()),
        "token_logprob": pa.array(cat["token_logprob"].astype(np.float32)),
        "soft_value": fsl(sv.astype(np.float32), pa.float32()),
    })
    sizes = {}
    for name, kw in {
        "zstd22+byte_stream_split": dict(compression="zstd", compression_level=22,
                                         use_dictionary=["topk_ids"],
                                         use_byte_stream_split=["topk_logprobs",
                                                                "ref_topk_logprobs",
                                                                "token_logprob", "soft_value"]),
        "zstd22+dictionary": dict(compression="zstd", compression_level=22, use_dictionary=True),
    }.items():
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=1 << 20, **kw)
        md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
        per_col = {}
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                key = col.path_in_schema.split(".")[0]
                per_col[key] = per_col.get(key, 0) + col.total_compressed_size
        sizes[name] = {"total": (len(buf.getvalue()) + last.nbytes) / n,
                       **{k: v / n for k, v in per_col.items()}}
    return sizes


def read_speed(url: str, repeats: int = 5) -> dict:
    """Median (and all runs) of StreamReader tokens/s over the ADPA fields, one epoch each."""
    st = open_store(url)
    out = {}
    for prefetch in (0, 2):
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            n = sum(r["n_tokens"] for g in StreamReader(st, fields=ADPA_FIELDS,
                                                         prefetch=prefetch) for r in g)
            runs.append(n / (time.perf_counter() - t))
        out[f"prefetch={prefetch}"] = {"median": float(np.median(runs)), "runs": runs}
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-steps", type=int, default=300)
    ap.add_argument("--dpo-steps", type=int, default=200)
    ap.add_argument("--train-s", type=float, default=90.0, help="time cap per stage")
    ap.add_argument("--tokens", type=int, default=150_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--read-repeats", type=int, default=5)
    ap.add_argument("--note", default="shared 2-core container; other engineers' jobs running")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    text = np.frombuffer(corpus((".md", ".py")), dtype=np.uint8)
    py = np.frombuffer(corpus((".py",)), dtype=np.uint8)
    cut = int(len(text) * 0.9)
    ref = TinyLM()
    t0 = time.perf_counter()
    steps_ref = train(ref, text[:cut], args.ref_steps, args.train_s)
    dpo = TinyLM()
    dpo.load_state_dict(ref.state_dict())
    steps_dpo = train(dpo, py[: int(len(py) * 0.9)], args.dpo_steps, args.train_s, lr=1e-3)
    train_s = time.perf_counter() - t0
    ref.eval()
    dpo.eval()
    held = text[cut:]
    t = time.perf_counter()
    groups = score(dpo, ref, held, args.tokens)
    score_s = time.perf_counter() - t
    n_tok = sum(len(r["response_ids"]) for g in groups for r in g)
    recs = [r for g in groups for r in g]
    mass = np.exp(np.concatenate([r["topk_logprobs"] for r in recs])).sum(1)
    nll = -np.concatenate([r["token_logprob"] for r in recs]).mean()

    tmp = tempfile.mkdtemp(prefix="kdcache-bench-")
    res: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch_threads": args.threads,
                    "load_avg_start": os.getloadavg(), "note": args.note},
        "teacher": {"train_s_cap_each": args.train_s, "train_s_total": train_s,
                    "steps_ref": steps_ref,
                    "steps_dpo": steps_dpo, "heldout_nll_nats_per_byte": float(nll),
                    "topk_mass_mean": float(mass.mean()), "K": K, "betas": BETAS,
                    "vocab": 256, "n_tokens": n_tok, "score_s": score_s},
        "naive_bytes_per_token": {"topk_ids": 4 * K, "topk_logprobs": 4 * K,
                                  "ref_topk_logprobs": 4 * K, "token_logprob": 4,
                                  "soft_value": 4 * len(BETAS), "total": 12 * K + 4 +
                                  4 * len(BETAS)},
        "stores": {},
        "curve": [],
    }
    try:
        res["parquet_baseline"] = parquet_baseline(groups, os.path.join(tmp, "p.parquet"))
        configs: dict[str, tuple[dict, int | None]] = {
            "lossless": ({"codec": "lossless"}, None),
            "v2 compact@0.002 (previous format)": ({"codec": "compact", "error_bound": 2e-3}, 2),
        }
        for eb in (5e-4, 1e-3, 2e-3, 4e-3, 6e-3, 8e-3, 1e-2, 1.6e-2, 3.2e-2):
            configs[f"compact@{eb:g}"] = ({"codec": "compact", "error_bound": eb}, None)
        for name, (opts, version) in configs.items():
            url = os.path.join(tmp, name.split()[0] + str(version))
            wsec = write(url, groups, opts, version)
            s = summarize(url)
            bpt = {k: round(v, 3) for k, v in s["bytes_per_token"].items()}
            signal_bytes = sum(v for k, v in s["bytes_per_token"].items() if k in FIELDS)
            entry = {"options": opts, "bytes_per_token": bpt,
                     "signal_bytes_per_token": signal_bytes,
                     "total_bytes_per_token": s["bytes_total"] / n_tok,
                     "write_tokens_per_s": n_tok / wsec, "errors": errors(groups, url)}
            if name in ("lossless", "compact@0.002") or version == 2:
                entry["read_tokens_per_s_adpa_fields"] = read_speed(url, args.read_repeats)
            res["stores"][name] = entry
            if opts["codec"] == "compact" and version is None:
                res["curve"].append({"error_bound": opts["error_bound"],
                                     "signal_bytes_per_token": signal_bytes,
                                     "max_abs_err": max(v["max_abs"] for k, v in
                                                        entry["errors"].items()
                                                        if k != "ids_exact")})
            print(name, round(signal_bytes, 1), "B/tok", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "store.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
