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
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from kdcache.store import StoreMeta, StoreWriter, StreamReader, open_store
from kdcache.store.integrity import crc32c, is_chunk
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


def save_groups(path: Path, groups: list[list[dict]]) -> None:
    """Scored groups as one .npz (fields concatenated, plus lengths): no pickles."""
    recs = [r for g in groups for r in g]
    arrays: dict[str, np.ndarray] = {
        "group_size": np.array([len(g) for g in groups], np.int32),
        "n_tokens": np.array([len(r["response_ids"]) for r in recs], np.int32),
        "prompt_len": np.array([len(r["prompt_ids"]) for r in recs], np.int32),
        "prompt_ids": np.concatenate([np.asarray(r["prompt_ids"]) for r in recs]),
    }
    for f in ["response_ids", *FIELDS]:
        arrays[f] = np.concatenate([np.asarray(r[f]) for r in recs])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_groups(path: Path) -> list[list[dict]]:
    z = np.load(path, allow_pickle=False)
    T, P = z["n_tokens"], z["prompt_len"]
    to, po = np.concatenate([[0], np.cumsum(T)]), np.concatenate([[0], np.cumsum(P)])
    so = np.concatenate([[0], np.cumsum(T + 1)])
    cols = {f: z[f] for f in ["response_ids", *FIELDS]}
    prompt = z["prompt_ids"]
    recs = []
    for i in range(len(T)):
        r = {"prompt_ids": prompt[po[i]:po[i + 1]], "is_terminal": False}
        for f, a in cols.items():
            r[f] = a[so[i]:so[i + 1]] if f == "soft_value" else a[to[i]:to[i + 1]]
        recs.append(r)
    groups, k = [], 0
    for gi, n in enumerate(z["group_size"]):
        g = recs[k:k + n]
        for j, r in enumerate(g):
            r["example_id"] = f"ex{gi:06d}"
            r["role"] = ("chosen", "rejected")[j] if n == 2 else "sft"
        groups.append(g)
        k += n
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


def _epoch_tokens_per_s(st, fields: list[str]) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) for one epoch.

    CPU time (all threads) is what a read costs on a shared machine: other jobs stretch the
    wall time, not the CPU time, so ratios are taken on it."""
    t, c = time.perf_counter(), time.process_time()
    n = sum(r["n_tokens"] for g in StreamReader(st, fields=fields, prefetch=0) for r in g)
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def checksum_cost(groups: list[list[dict]], tmp: str, repeats: int) -> dict:
    """What the read-path checks cost: StreamReader throughput (ADPA fields, prefetch 0) with
    the checks on vs off on the very same bytes — v4 (crc32c per chunk + crc32c of parquet
    and zarr.json) and v3 (sha256 of every file fetched).  Repetitions alternate between the
    four readers so machine load hits them alike; reported: medians and the median of the
    per-repetition ratios (checked / unchecked)."""
    readers = {}
    for v in (3, 4):
        url = os.path.join(tmp, f"cks-v{v}")
        write(url, groups, {"codec": "compact", "error_bound": 2e-3}, v)
        on, off = open_store(url), open_store(url)
        off._check_reads = False  # private switch: the same reader without its checks
        readers[f"v{v} checked"], readers[f"v{v} unchecked"] = on, off
    for st in readers.values():  # warm-up (page cache, thread pool)
        _epoch_tokens_per_s(st, ADPA_FIELDS)
    wall: dict[str, list[float]] = {k: [] for k in readers}
    cpu: dict[str, list[float]] = {k: [] for k in readers}
    for rep in range(repeats):
        order = list(readers) if rep % 2 == 0 else list(readers)[::-1]
        for k in order:
            w, c = _epoch_tokens_per_s(readers[k], ADPA_FIELDS)
            wall[k].append(w)
            cpu[k].append(c)
    out: dict = {k: {"median_cpu": float(np.median(cpu[k])), "median_wall": float(np.median(
        wall[k])), "runs_cpu": cpu[k], "runs_wall": wall[k]} for k in readers}
    for v in (3, 4):
        ratios = [a / b for a, b in zip(cpu[f"v{v} checked"], cpu[f"v{v} unchecked"],
                                        strict=True)]
        out[f"v{v} checked/unchecked (cpu)"] = {"median": float(np.median(ratios)),
                                                "runs": ratios}
        # The end-to-end A/B above is noisy on a shared box; the checks' own work is timed
        # in isolation too: exactly the hashing the reader does, on the same fetched bytes.
        st = readers[f"v{v} unchecked"]
        raws = [st.fetch_shard(i, ADPA_FIELDS) for i in range(len(st.shards))]
        n_tok = st.num_tokens
        work = []
        for _ in range(repeats):
            c = time.process_time()
            for raw in raws:
                for rel, data in raw.items():
                    if v >= 4 and is_chunk(rel):
                        google_crc32c.value(np.frombuffer(data, np.uint8)[:-4])
                    elif v >= 4:
                        crc32c(data)
                    else:
                        hashlib.sha256(data).digest()
            work.append(time.process_time() - c)
        epoch_s = n_tok / out[f"v{v} unchecked"]["median_cpu"]
        check_s = float(np.median(work))
        out[f"v{v} check work"] = {
            "cpu_s_per_epoch": check_s, "unchecked_epoch_cpu_s": epoch_s,
            "bytes_checked": sum(len(d) for raw in raws for d in raw.values()),
            "throughput_ratio": epoch_s / (epoch_s + check_s)}
    out["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else None
    return out


# ----------------------------------------------------------------------------- main
class _Done(Exception):
    """The sections asked for are done."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-steps", type=int, default=300)
    ap.add_argument("--dpo-steps", type=int, default=200)
    ap.add_argument("--train-s", type=float, default=90.0, help="time cap per stage")
    ap.add_argument("--tokens", type=int, default=150_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--read-repeats", type=int, default=5)
    ap.add_argument("--note", default="shared 2-core container; other engineers' jobs running")
    ap.add_argument("--sections", default="codecs,checksum",
                    help="comma list: codecs (sizes, errors, curve, read speed), checksum "
                         "(cost of the read-path checks, one core)")
    ap.add_argument("--checksum-repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store.json"))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "kdcache" / "bench_store"),
                    help="scored teacher outputs are cached here (outside the repository)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    text = np.frombuffer(corpus((".md", ".py")), dtype=np.uint8)
    py = np.frombuffer(corpus((".py",)), dtype=np.uint8)
    # keyed by the recipe, not the text: the corpus is this repository, which every commit
    # changes (delete the cache to retrain on the current text)
    key = hashlib.sha256(repr(("bytes", args.ref_steps, args.dpo_steps,
                               args.tokens)).encode()).hexdigest()[:12]
    cached = Path(args.cache).expanduser() / f"bytes-teacher-{key}.npz"
    steps_ref = steps_dpo = train_s = score_s = None
    if cached.exists():
        groups = load_groups(cached)
    else:
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
        save_groups(cached, groups)
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
        if "checksum" in sections:
            pinned = hasattr(os, "sched_setaffinity")
            if pinned:
                cpus = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {min(cpus)})  # one core, as a DataLoader worker has
            try:
                res["checksum_cost"] = checksum_cost(groups, tmp, args.checksum_repeats)
            finally:
                if pinned:
                    os.sched_setaffinity(0, cpus)
            print("checksum cost", json.dumps(
                {k: v.get("median", v.get("median_cpu", v.get("throughput_ratio")))
                 for k, v in res["checksum_cost"].items() if isinstance(v, dict)}), flush=True)
        if "codecs" not in sections:
            raise _Done
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
    except _Done:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
