"""Trainer memory on a 24 GB card: the simulated table (CPU) and, on a CUDA box, measured peaks
beside the estimate.

Every row runs kdcache's own step, `kdcache.train.step.train_step` (the function the training
loop calls): collate -> student forward -> chunked log-prob gather -> the objective's loss ->
backward -> clip -> optimizer step.

Simulated (default; any machine, no GPU): `kdcache.train.memory.simulate` runs that step on
fake tensors with CUDA's choices (bf16 autocast, bf16 weights, fused kernels; see
train/memory.py for what is modelled) and reports the peak allocated bytes of a steady-state
step. Rows: Qwen2.5-shaped 0.5B / 1.5B / 3B / 7B x {full fine-tune, LoRA r=16 on all linear
layers} x seq {2048, 4096} x objective {dckd, adpa, tvkd}, one group per micro-batch (two
sequences of `seq` tokens, prompt seq/8, K=50), gradient checkpointing on. Settings per row:
  ours      the trainer's CUDA defaults (bf16 weights; full FT: fp32 AdamW moments + stochastic
            rounding; LoRA: fp32 adapters on a frozen bf16 base)
  ours-8bit full FT with --optim adamw8bit (torchao: 1-byte moments + block scales)
  baseline  the same settings with plain transformers full logits (`model(...).logits` ->
            float -> log_softmax -> gather) instead of the chunked gather
plus the calibration case (1.5B, one 2048-token sequence, plain LM loss, bf16 weights/grads/
AdamW states, fused AdamW: measured 12.02 GiB on an H100) and the pre-issue trainer (fp32
weights, foreach AdamW). Each finished row is appended to results/train_sim.jsonl, so a rerun
resumes; the report is results/train_sim.{md,json}.

Real GPU (`--gpu`, any CUDA box): the same rows run for real (random-init weights of the right
shape, a synthetic store read by the trainer's StreamReader / next_batches), peak
`max_memory_allocated` of the steady-state steps beside the estimate: results/train_gpu.*.

    python benchmarks/bench_train.py                       # simulated table (hours on one core: resumable)
    python benchmarks/bench_train.py --only 1.5b,3b --seqs 2048 --objectives adpa
    python benchmarks/bench_train.py --report              # rewrite the report from the rows so far
    python benchmarks/bench_train.py --gpu --only 1.5b,3b --seqs 2048   # measured vs estimate
    python benchmarks/bench_train.py --smoke               # tiny shapes on CPU, ~1 min
    python benchmarks/bench_train.py --update-rule /tmp/ur # bf16 update rule on the demo (CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from kdcache.train import memory
from kdcache.train import step as step_mod
from kdcache.train import student as student_mod
from kdcache.train.batch import scatter_rows
from kdcache.train.config import TrainConfig
from kdcache.train.memory import GIB, LORA_ALL, allowance
from kdcache.train.student import StudentForward, StudentOut

CARD = 24 * GIB
RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_H100_GIB = 12.02  # issue 11: Qwen2.5-1.5B shape, bf16 w/g/states, GC, batch 1, seq 2048

QWEN = dict(tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            max_position_embeddings=32768, vocab_size=151936)
SHAPES = {  # the public Qwen2.5 configs
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, **QWEN),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, **QWEN),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, **QWEN),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, **{**QWEN, "tie_word_embeddings": False, "vocab_size": 152064}),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512),
}
OBJECTIVES = ("dckd", "adpa", "tvkd")
K = 50


# ----------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class Row:
    shape: str
    mode: str  # full | lora | calib
    seq: int
    objective: str
    setting: str  # ours | ours-8bit | baseline | before

    @property
    def key(self) -> str:
        return f"{self.shape}/{self.mode}/{self.seq}/{self.objective}/{self.setting}"

    def cfg(self) -> TrainConfig:
        c = TrainConfig(model=f"qwen2.5-{self.shape}", store="-", objective=self.objective, batch_groups=1,
                        grad_checkpointing=True, chunk_size=1024, lr=1e-5, tvkd_beta=1.0, progress=False)
        if self.mode == "lora":
            c = dataclasses.replace(c, lora_r=16, lora_targets=LORA_ALL)
        if self.mode == "calib":  # bf16 weights, grads and AdamW states; torch's fused AdamW
            c = dataclasses.replace(c, weights_dtype="bf16", optim_states="bf16", stochastic_rounding=False)
        if self.setting == "ours-8bit":
            c = dataclasses.replace(c, optim="adamw8bit")
        if self.setting == "before":  # the trainer before issue 11 on CUDA: fp32 weights, foreach AdamW
            c = dataclasses.replace(c, weights_dtype="fp32")
        return c

    def shape_kw(self) -> dict:
        if self.mode == "calib":
            return dict(seq_len=self.seq, prompt_len=1, k=1)
        return dict(seq_len=self.seq, prompt_len=self.seq // 8, k=K)


def all_rows(shapes, seqs, objectives, settings) -> list[Row]:
    """Target rows first (a partial run answers the issue's questions), then the rest."""
    rows = [Row("1.5b", "calib", 2048, "sft", "ours"), Row("1.5b", "full", 2048, "adpa", "before")]
    for shape, seq, obj in itertools.product(shapes, seqs, objectives):
        for mode in ("full", "lora"):
            for setting in settings:
                if setting == "ours-8bit" and mode == "lora":
                    continue
                rows.append(Row(shape, mode, seq, obj, setting))

    def priority(r: Row) -> tuple:
        target = ((r.shape, r.mode) in {("1.5b", "full"), ("3b", "lora"), ("3b", "full"), ("7b", "lora"),
                                         ("7b", "full")} and r.seq == 2048 and r.objective == "adpa")
        return (r.mode != "calib" and r.setting != "before", not target, r.seq, r.setting == "baseline")

    return sorted(dict.fromkeys(rows), key=priority)


# ----------------------------------------------------------------------------- the baseline
def full_logits_forward(model, batch, _chunk_size: int) -> StudentOut:
    """Plain transformers: [S, L, V] logits (bf16 under autocast), upcast to float32,
    log_softmax (saved for backward), gather at the response rows and the top-K ids."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    rows = logp.reshape(-1, logp.shape[-1]).index_select(0, batch.rows)
    gathered = scatter_rows(rows.gather(1, batch.index), batch.mask, batch.mask_pos)
    return StudentOut(token_logprobs=gathered[..., 0],
                      topk_logprobs=gathered[..., 1:] if gathered.shape[-1] > 1 else None)


@contextlib.contextmanager
def forward_for(setting: str):
    """The baseline swaps the student forward inside the trainer's own train_step (the
    `student_forward` that `StudentForward` calls)."""
    if setting != "baseline":
        yield
        return
    saved = student_mod.student_forward
    student_mod.student_forward = full_logits_forward
    try:
        yield
    finally:
        student_mod.student_forward = saved


def make_opt_for(row: Row, cfg: TrainConfig):
    if row.setting == "before":
        return lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return None  # the trainer's own choice


# ----------------------------------------------------------------------------- simulated
def simulate_row(row: Row) -> dict:
    cfg = row.cfg()
    t0 = time.perf_counter()
    with forward_for(row.setting):
        r = memory.simulate(cfg, Qwen2Config(**SHAPES[row.shape]), **row.shape_kw(), betas=(1.0,),
                            make_opt=make_opt_for(row, cfg))
    peak = r["peak"]
    need = peak + allowance(peak)
    return {"key": row.key, **dataclasses.asdict(row), "code": memory._code_version(),
            "settings": memory.memory_settings(cfg), "peak_gib": peak / GIB, "needed_gib": need / GIB,
            "fits_24": need <= CARD, "peak_where": r["peak_where"],
            "breakdown_gib": {k: v / GIB for k, v in r["breakdown"].items()},
            "largest_gib": r["largest"] / GIB, "largest_where": r["largest_where"],
            "phase_gib": {k: v / GIB for k, v in r["phases"].items()},
            "params": r["params"], "trainable": r["trainable"], "sequences": r["sequences"],
            "seconds": time.perf_counter() - t0}


def load_rows(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            rows[r["key"]] = r  # a later line for the same row wins
    return rows


def run_simulated(rows: list[Row], path: Path) -> None:
    done = load_rows(path)  # rows from older code stay until --fresh: say so in the report (code_versions)
    todo = [r for r in rows if r.key not in done]
    print(f"{len(rows) - len(todo)} rows cached, {len(todo)} to simulate", file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    for i, row in enumerate(todo, 1):
        if row.key in load_rows(path):  # another worker (--reverse) got there first
            continue
        try:
            res = simulate_row(row)
        except Exception as e:  # a row that cannot run is a result, not the end of the table
            res = {"key": row.key, **dataclasses.asdict(row), "code": memory._code_version(),
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        with path.open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"[{i}/{len(todo)}] {row.key:<36} peak {res.get('peak_gib', float('nan')):6.2f} GiB "
              f"needed {res.get('needed_gib', float('nan')):6.2f} ({res.get('seconds', 0):.0f}s) "
              f"{res.get('error', '')}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- report
def _g(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def report(path: Path) -> dict:
    rows = load_rows(path)
    by = {k: r for k, r in rows.items() if "error" not in r}

    def get(shape, mode, seq, obj, setting):
        return by.get(Row(shape, mode, seq, obj, setting).key)

    def largest(mode, setting, seq=2048):
        """The largest size whose simulated rows (every objective simulated so far) all fit."""
        fit, tried = None, {}
        for size in ("0.5b", "1.5b", "3b", "7b"):
            rs = [r for o in OBJECTIVES if (r := get(size, mode, seq, o, setting))]
            if rs:
                tried[size] = [r["objective"] for r in rs]
                if all(r["fits_24"] for r in rs):
                    fit = size
        return {"largest": fit, "tried": tried}

    calib = get("1.5b", "calib", 2048, "sft", "ours")
    t1 = get("1.5b", "full", 2048, "adpa", "ours")
    t2 = [get("3b", "lora", 2048, o, "ours") for o in OBJECTIVES]
    summary = {
        "calibration": calib and {"simulated_gib": calib["peak_gib"], "h100_gib": CALIBRATION_H100_GIB,
                                  "error": calib["peak_gib"] / CALIBRATION_H100_GIB - 1},
        "target_1.5b_full_2048_le_22": t1 and {"peak_gib": t1["peak_gib"], "met": t1["peak_gib"] <= 22},
        "target_3b_lora_le_16": [r and {"objective": r["objective"], "peak_gib": r["peak_gib"],
                                        "met": r["peak_gib"] <= 16} for r in t2],
        "largest_fits_24": {"full (fp32 moments)": largest("full", "ours"),
                            "full (8-bit moments)": largest("full", "ours-8bit"),
                            "lora": largest("lora", "ours")},
        "largest_fits_24_seq4096": {"full (8-bit moments)": largest("full", "ours-8bit", 4096),
                                    "lora": largest("lora", "ours", 4096)},
    }
    out = {"machine": machine(), "card_gib": CARD / GIB, "code_versions": sorted({r.get("code") for r in rows.values()}),
           "allowance": {
        "cuda_context_gib": memory.CUDA_CONTEXT / GIB, "fragmentation": memory.FRAGMENTATION},
        "summary": summary, "rows": sorted(rows.values(), key=lambda r: r["key"])}
    (RESULTS / "train_sim.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "train_sim.md").write_text(markdown(out, by))
    return out


def markdown(out: dict, by: dict) -> str:
    m, s = out["machine"], out["summary"]
    lines = ["# Trainer memory, simulated on CPU (fake tensors, the real train_step)", "",
             f"Simulated on **{m['device']}**, torch {m['torch']}, {m['date']}; nothing here ran on a GPU. "
             f"Peak = allocated bytes of a steady-state step (`max_memory_allocated` on CUDA). Fits 24 GiB = "
             f"peak x {1 + out['allowance']['fragmentation']:.2f} + {out['allowance']['cuda_context_gib']:.2f} "
             "GiB (CUDA context, fragmentation) <= 24 GiB. One group per micro-batch (2 sequences), prompt "
             "seq/8, K=50, grad checkpointing on, chunk 1024. `benchmarks/bench_train.py` lists the settings.", ""]
    c = s["calibration"]
    if c:
        lines += [f"**Calibration** (1.5B, 1 x 2048 tokens, bf16 weights/grads/AdamW states, fused AdamW, chunked "
                  f"loss): simulated {c['simulated_gib']:.2f} GiB vs {c['h100_gib']:.2f} GiB measured on an H100 "
                  f"({c['error']:+.1%}).", ""]
    t1 = s["target_1.5b_full_2048_le_22"]
    if t1:
        lines.append(f"**Target 1.5B full fine-tune, seq 2048 <= 22 GiB**: {t1['peak_gib']:.2f} GiB (adpa): "
                     + ("met" if t1["met"] else "NOT met") + ".")
    t2 = [r for r in s["target_3b_lora_le_16"] if r]
    if t2:
        lines.append("**Target 3B LoRA <= 16 GiB**: " + ", ".join(
            f"{r['objective']} {r['peak_gib']:.2f}" for r in t2) + " GiB: "
            + ("met" if all(r["met"] for r in t2) else "NOT met") + ".")
    for title, key in (("seq 2048", "largest_fits_24"), ("seq 4096", "largest_fits_24_seq4096")):
        lines.append(f"**Largest that fits 24 GiB ({title})**: " + "; ".join(
            f"{k}: {v['largest'] or 'none'} (simulated: " + (", ".join(
                f"{size} [{'/'.join(objs)}]" for size, objs in v["tried"].items()) or "none") + ")"
            for k, v in s[key].items()) + ".")
    before = by.get(Row("1.5b", "full", 2048, "adpa", "before").key)
    if before:
        lines.append(f"The trainer before this change (fp32 weights, foreach AdamW, 1.5B adpa seq 2048): "
                     f"{before['peak_gib']:.2f} GiB.")
    lines += ["", "| model | mode | seq | objective | ours GiB | fits | 8-bit GiB | fits | baseline GiB | fits | "
              "ours peak at | weights / grads / optim / act. GiB |", "|" + "---|" * 12]
    keys = sorted({(r["shape"], r["mode"], r["seq"], r["objective"]) for r in by.values() if r["mode"] != "calib"},
                  key=lambda t: (["0.5b", "1.5b", "3b", "7b", "tiny"].index(t[0]), t[1], t[2], t[3]))
    for shape, mode, seq, obj in keys:
        def cell(setting, shape=shape, mode=mode, seq=seq, obj=obj):
            r = by.get(Row(shape, mode, seq, obj, setting).key)
            return (_g(r and r["peak_gib"]), "—" if not r else ("yes" if r["fits_24"] else "no"))
        ours = by.get(Row(shape, mode, seq, obj, "ours").key)
        bd = ours and ours["breakdown_gib"]
        lines.append(f"| {shape} | {mode} | {seq} | {obj} | {' | '.join(cell('ours'))} | "
                     f"{' | '.join(cell('ours-8bit')) if mode == 'full' else '— | —'} | {' | '.join(cell('baseline'))} | "
                     f"{ours['peak_where'] if ours else '—'} | "
                     + (f"{bd['weights']:.2f} / {bd['grads']:.2f} / {bd['optimizer']:.2f} / {bd['activations']:.2f}"
                        if bd else "—") + " |")
    errs = [r for r in out["rows"] if "error" in r]
    if errs:
        lines += ["", "Rows that failed to simulate:", ""] + [f"- {r['key']}: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ----------------------------------------------------------------------------- real GPU
def write_store(url: str, row: Row, n_groups: int) -> None:
    """n_groups copies of the estimate's synthetic group, written with StoreWriter."""
    from kdcache.store import StoreMeta, StoreWriter

    cfg, kw = row.cfg(), row.shape_kw()
    vocab = SHAPES[row.shape]["vocab_size"]
    group = memory.synthetic_groups(cfg, kw["seq_len"], kw["prompt_len"], kw["k"], vocab, (1.0,))
    fields = sorted({f for r in group for f in r if f in ("topk_ids", "topk_logprobs", "token_logprob",
                     "ref_topk_logprobs", "ref_token_logprob", "soft_value", "behavior_logprob")})
    meta = StoreMeta(k=kw["k"], betas=[1.0], fields=fields, tokenizer={"vocab_size": vocab}, code_version="bench")
    with StoreWriter(url, meta, shard_records=4 * len(group)) as w:
        for e in range(n_groups):
            w.add_group([{**r, "example_id": f"e{e}"} for r in group])


def measure_row(spec: dict) -> dict:
    """One row for real: the trainer's reader, next_batches and train_step on `device`; the
    peak of the steady-state steps (after `warmup` steps have created the optimizer state)."""
    from kdcache.store import StreamReader, open_store
    from kdcache.train.checkpoint import set_seed
    from kdcache.train.data import group_stream, next_batches
    from kdcache.train.objectives import OBJECTIVE_SPECS
    from kdcache.train.optim import make_optimizer, make_scheduler
    from kdcache.train.student import load_student, prepare_student, weights_dtype

    row = Row(**spec["row"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dataclasses.replace(row.cfg(), store=spec["store"], max_steps=spec["warmup"] + spec["steps"])
    if spec.get("model_dir"):
        cfg = dataclasses.replace(cfg, model=spec["model_dir"])
    out = {"key": row.key, "device": machine()["device"]}
    cuda = device.type == "cuda"
    if cuda and spec.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total))
    phase = "build"
    losses = []
    try:
        set_seed(cfg.seed)
        if spec.get("model_dir"):
            model, _ = load_student(cfg, device)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[row.shape]),
                                                         dtype=weights_dtype(cfg, device))
            model = prepare_student(model, cfg)
        model.train()
        student = StudentForward(model, cfg.chunk_size)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_opt_for(row, cfg) or (lambda ps: make_optimizer(cfg.optim_settings, ps))
        optimizer = optimizer(params)
        scheduler = make_scheduler(cfg.schedule_settings, optimizer, cfg.max_steps)
        precision = step_mod.Precision.for_run(cfg, device)
        store = open_store(cfg.store[0])  # TrainConfig.store is a list (several teachers)
        reader = StreamReader(store, fields=list(OBJECTIVE_SPECS[cfg.objective].fields), shuffle=True, seed=cfg.seed)
        groups = group_stream(reader)
        times, tokens = [], 0
        with forward_for(row.setting):
            for step in range(cfg.max_steps):
                if step == spec["warmup"] and cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                phase = "data"
                batches, n_tok = next_batches(groups, cfg, 0, (1.0,), device)
                phase = "step"
                metrics = step_mod.train_step(student, optimizer, scheduler, params, batches, cfg, step, precision)
                losses.append(float(metrics["loss"]))  # a sync, as the trainer's log row
                if step >= spec["warmup"]:
                    times.append(time.perf_counter() - t0)
                    tokens += n_tok
        out.update(status="ok", losses=losses, step_s=sum(times) / max(1, len(times)),
                   tokens_per_s=tokens / max(sum(times), 1e-9))
    except torch.OutOfMemoryError as e:
        out.update(status=f"OOM in {phase}", error=str(e).splitlines()[0][:300])
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return out


def run_isolated(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--child-out", f.name],
                           capture_output=True, text=True)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"key": Row(**spec["row"]).key, "status": f"crashed (rc {p.returncode})",
                    "error": " | ".join(tail)[:500]}
        return json.loads(Path(f.name).read_text())


def run_gpu(rows: list[Row], args, sim_path: Path) -> None:
    """Measured peaks next to the estimate (simulated here if the table lacks the row)."""
    sim = load_rows(sim_path)
    results = []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        for row in rows:
            url = str(Path(tmp) / f"store-{row.shape}-{row.mode}-{row.seq}-{row.objective}")
            if not Path(url).exists():
                write_store(url, row, args.warmup + args.steps)
            est = sim.get(row.key) or simulate_row(row)
            got = run_isolated({"row": dataclasses.asdict(row), "store": url, "warmup": args.warmup,
                                "steps": args.steps, "cap_gib": args.cap_gib})
            if got.get("peak_allocated_gib") and "peak_gib" in est:
                got["estimate_gib"] = est["peak_gib"]
                got["estimate_error"] = est["peak_gib"] / got["peak_allocated_gib"] - 1
            results.append(got)
            print(f"{row.key:<36} {got['status']:<14} measured {_g(got.get('peak_allocated_gib'))} GiB "
                  f"(reserved {_g(got.get('peak_reserved_gib'))}), estimate {_g(est.get('peak_gib'))} GiB, "
                  f"error {_g(got.get('estimate_error') and 100 * got['estimate_error'], '+.1f')}%", flush=True)
    out = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
           "results": results}
    (RESULTS / "train_gpu.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Trainer memory measured on a GPU, beside the CPU estimate", "",
             f"Machine: **{out['machine']['device']}**, torch {out['machine']['torch']} (CUDA "
             f"{out['machine']['cuda']}), {out['machine']['date']}. {args.warmup} warm-up + {args.steps} measured "
             "steps; peak = max_memory_allocated over the measured steps.", "",
             "| row | status | measured alloc GiB | reserved GiB | estimate GiB | error | tok/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['key']} | {r['status']} | {_g(r.get('peak_allocated_gib'))} | {_g(r.get('peak_reserved_gib'))} | "
                     f"{_g(r.get('estimate_gib'))} | {_g(r.get('estimate_error') and 100 * r['estimate_error'], '+.1f')}% | "
                     f"{_g(r.get('tokens_per_s'), '.0f')} |")
    (RESULTS / "train_gpu.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- smoke
def smoke() -> None:
    """CPU, tiny shapes: simulate a few rows, run one for real, and check that the benchmark's
    real step is the trainer's (same losses as `train()` from the same seed and store)."""
    from kdcache.train.tiny import build_tokenizer, save_tiny
    from kdcache.train.trainer import train

    torch.set_num_threads(1)
    out = {"machine": machine(), "simulated": [], "parity": None}
    for mode, obj, setting in [("full", "adpa", "ours"), ("lora", "dckd", "ours"), ("full", "tvkd", "baseline"),
                               ("full", "adpa", "ours-8bit")]:
        out["simulated"].append(simulate_row(Row("tiny", mode, 128, obj, setting)))
    with tempfile.TemporaryDirectory() as tmp:
        row = Row("tiny", "full", 128, "adpa", "ours")
        url = str(Path(tmp) / "store")
        write_store(url, row, 4)
        tok = build_tokenizer([f"w{i}" for i in range(SHAPES["tiny"]["vocab_size"] - 6)])
        model_dir = save_tiny(Path(tmp) / "student", tok, arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2,
                              intermediate=128, max_positions=512, tie_embeddings=True)
        base = dict(row.cfg().to_dict(), model=str(model_dir), store=url, out=str(Path(tmp) / "run"),
                    max_steps=3, log_every=1, progress=False)
        train(TrainConfig(**base))
        trainer_losses = [json.loads(line)["loss"] for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
        got = measure_row({"row": dataclasses.asdict(row), "store": url, "warmup": 0, "steps": 3,
                           "model_dir": str(model_dir)})
        out["parity"] = {"trainer_losses": trainer_losses, "bench_losses": got.get("losses"),
                         "identical": trainer_losses == got.get("losses")}
    (RESULTS / "train_smoke.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# bench_train --smoke (CPU, tiny shapes: checks the script end to end; no GPU figures)", "",
             "| row | simulated peak MiB | needed GiB (with allowance) |", "|---|---|---|"]
    lines += [f"| {r['key']} | {r['peak_gib'] * 1024:.2f} | {r['needed_gib']:.2f} |" for r in out["simulated"]]
    p = out["parity"]
    lines += ["", f"Trainer parity: `train()` losses {p['trainer_losses']} vs the benchmark's real step "
                  f"{p['bench_losses']}: identical = **{p['identical']}**."]
    (RESULTS / "train_smoke.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not p["identical"]:
        raise SystemExit("the benchmark's step differs from the trainer's")


# ----------------------------------------------------------------------------- update rule
def update_rule(out: Path) -> None:
    """The bf16 update rule on the demo (CPU): students trained from the demo's SFT init on
    its stores with fp32 weights, bf16 + stochastic rounding (the CUDA default) and bf16 +
    round-to-nearest, at the demo's lr and 10x lower; rule-judged preference rate and top-K KL."""
    from kdcache.demo import Demo, run_demo

    base = run_demo(out, quick=False, methods=["sft", "dckd"], seed=0)  # teacher, stores, fp32 rows
    torch.set_num_threads(1)
    d = Demo(out, False, 0)
    teacher, ref = str(out / "runs/teacher-dpo/model"), str(out / "runs/teacher-sft/model")
    pref = d.precompute(data=str(d.data["pref"]), teacher=teacher, reference=ref)
    evals = d.precompute(data=str(d.data["eval"]), teacher=teacher, reference=ref)
    rows = []
    for lr in (1e-3, 1e-4):
        for name, kw in (("fp32", dict(weights_dtype="fp32")),
                         ("bf16-sr", dict(weights_dtype="bf16", stochastic_rounding=True)),
                         ("bf16-rtn", dict(weights_dtype="bf16", stochastic_rounding=False))):
            for m, extra in (("sft", {}), ("dckd", {"dckd_alpha": 0.2})):
                run = f"rule-{m}-{name}-lr{lr:g}"
                model = d.train(run, str(out / "runs/student-sft-init/model"), pref, m, d.steps["student"],
                                lr=lr, **kw, **extra)
                rows.append({"method": m, "weights": name, "lr": lr, **d.evaluate(model, evals),
                             "train_s": d.timings[run]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    res = {"machine": machine(), "base": base["rows"], "rows": rows}
    (RESULTS / "train_update_rule.json").write_text(json.dumps(res, indent=1) + "\n")


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="0.5b,1.5b,3b,7b", help="model sizes, comma-separated")
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--settings", default="ours,ours-8bit,baseline")
    ap.add_argument("--report", action="store_true", help="only rewrite results/train_sim.{md,json}")
    ap.add_argument("--gpu", action="store_true", help="measure the rows on this CUDA GPU beside the estimate")
    ap.add_argument("--cap-gib", type=float, default=0.0, help="--gpu: cap this process's CUDA memory (0: none)")
    ap.add_argument("--warmup", type=int, default=1, help="--gpu: steps before the peak is measured")
    ap.add_argument("--steps", type=int, default=2, help="--gpu: measured steps")
    ap.add_argument("--rows-file", default=str(RESULTS / "train_sim.jsonl"))
    ap.add_argument("--fresh", action="store_true", help="drop the rows simulated so far")
    ap.add_argument("--reverse", action="store_true",
                    help="simulate the rows last-first (a second worker on the same row file)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--update-rule", default="", metavar="DIR",
                    help="the bf16 update-rule comparison on the demo, working in DIR (~45 min on CPU)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(measure_row(json.loads(args.child))))
        return
    if args.smoke:
        smoke()
        return
    if args.update_rule:
        update_rule(Path(args.update_rule))
        return
    path = Path(args.rows_file)
    if args.fresh:
        path.unlink(missing_ok=True)
    rows = all_rows(args.only.split(","), [int(s) for s in args.seqs.split(",")], args.objectives.split(","),
                    args.settings.split(","))
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        run_gpu(rows, args, path)
        return
    if not args.report:
        run_simulated(rows[::-1] if args.reverse else rows, path)
    out = report(path)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
