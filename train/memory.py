"""Will this training step fit the GPU? An estimate that RUNS the real step on fake tensors.

`estimate_memory(cfg, ...)` builds the student from its config only (no weights are read) as
fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and aliasing, no
data), wires it like the trainer (`prepare_student`: grad checkpointing, LoRA), makes the
trainer's optimizer, collates a batch of the configured shape with the trainer's own
`next_batches`, and runs `train_step` — the same function the training loop calls — under
`StorageTracker`, a TorchDispatchMode that sees every op's outputs. Live bytes are the sum over
unique live storages (added when an op creates them, removed by a weakref finalizer when
freed), so the peak counts weights, gradients, optimizer states, saved activations and
temporaries exactly as the step holds them.

The optimizer is warmed first (its states exist, as from the second step on), so the peak is
that of a steady-state step. The same code runs on real tensors (tests compare the two).

Where the fake run on a CPU build differs from CUDA, and how the estimate models CUDA:
- Device: fake tensors live on "cpu" (fake "cuda" tensors cannot run on a CPU build); every
  device-dependent choice is asked for explicitly as CUDA would make it: bf16 autocast and
  bf16 weights (`Precision`, `weights_dtype`), the fused AdamW kernel (`make_optimizer(...,
  device_type="cuda")`), bf16 GEMMs with float32 output in `gather_logprobs` (`_mm_f32`).
- Fused AdamW: the CPU build has the fused kernel too, so the fake run executes
  `_fused_adamw_` (in place, no temporaries) as CUDA would; a foreach AdamW's `_foreach_*`
  ops return their whole lists of temporaries, which the tracker sees as on CUDA.
- Autocast op lists: the forward runs under CPU autocast. Its lower-precision list (mm,
  linear, bmm, matmul, SDPA, ...) matches CUDA's for every op these models use; CUDA's
  float32 list (pow, rsqrt, softmax, exp, ...) is wider, but Qwen2/Llama already upcast in
  their norms and rotary embeddings, and the losses run on float32 gathered log-probs.
- SDPA: the CPU flash kernel runs; CUDA runs flash (no mask) or memory-efficient (a mask).
  All three keep the output and a float32 logsumexp for backward; their internal workspaces
  (a few MB at these sizes) are invisible here. No path materialises the [L, L] scores.
- Tied-embedding gradients: the autograd engine sums two gradient contributions in place
  when it holds the only reference to the first (CUDA does), but never for tensor
  subclasses such as fake tensors. The tracker models the CUDA rule: an engine `add` whose
  first operand is freed right after it counts as in place.
- Padding mask: transformers reads a real all-ones mask and drops it (SDPA then runs causal,
  no [L, L] mask); a fake mask has no values, so for its unpadded batches the estimate tells
  transformers' check what the values would have said (`_unpadded_mask_is_causal`).
- Allocator: every block is rounded up to 512 bytes as the CUDA caching allocator does.
  Not modelled: the CUDA context and library workspaces, and fragmentation (reserved minus
  allocated bytes): `CUDA_CONTEXT` and `FRAGMENTATION` below are the stated allowance.
- TGPO groups rollouts by prompt with data-dependent ops (torch.unique) that fake tensors
  cannot run; it is estimated as the kd loss on the same rollouts (the same [N, 1 + K]
  gather; the group arithmetic is on per-sequence vectors).
- A student with another tokenizer (`--cross-tokenizer map|uld`, METHODS §5): the synthetic
  records pass through `XtokShape`, which gives them the fields, dtypes and masks
  `train/xtok/translate.CrossTokenizer` gives a record (map: int64 mapped ids, `xtok_slots`,
  `xtok_aligned`; uld: `uld_teacher` instead of the top-K fields, and the batch's `own_topk`
  = K, so the step runs the student's own top-K pass and the ULD loss); the vocabulary is
  the student's (its config). The sequence is in STUDENT tokens: `store_shape` scales the
  store's longest record by the student/teacher token ratio it measures on the store's text
  (`xtok_ratio`), `XTOK_RATIO` when it cannot.
- 8-bit AdamW (torchao, a torch.compile'd kernel that cannot run on fake tensors): modelled
  as its states (1 byte per value + one float32 scale per 256 values; tensors under 4096
  values keep full-precision moments) and an update without temporaries (the compiled kernel
  fuses them away).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .chunked import has_data
from .config import TrainConfig
from .data import next_batches
from .objectives import OBJECTIVE_SPECS, objective_fields
from .optim import make_optimizer, make_scheduler
from .step import Precision, train_step
from .student import StudentForward, prepare_student, weights_dtype

log = logging.getLogger(__name__)

GIB = 2**30
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
CUDA_CONTEXT = int(0.75 * GIB)  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator
FRAGMENTATION = 0.07  # reserved / allocated - 1 of a training step (allocator block reuse)
DEFAULT_GPU = 24 * GIB
MAX_SHARDS_READ = 256  # store_shape reads at most this many shards' records tables
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CATEGORIES = ("weights", "grads", "optimizer", "inputs", "activations")


# ----------------------------------------------------------------------------- the tracker
class StorageTracker(TorchDispatchMode):
    """Live bytes of unique storages created by ops (or registered), and their peak.

    A storage is counted once however many views share it; its bytes are rounded up to the
    CUDA allocator's 512-byte blocks. `peak_live` maps the uids alive at the peak to their
    bytes, classified afterwards (weights, grads, optimizer, inputs, activations)."""

    def __init__(self) -> None:
        super().__init__()
        self._uid_of: dict[int, int] = {}  # StorageImpl address -> uid, while alive
        self.size: dict[int, int] = {}  # live uid -> rounded bytes
        self.origin: dict[int, str] = {}  # uid -> "op (phase)" that created it
        self._next = itertools.count()
        self.current = 0
        self.peak = 0
        self.peak_where = ""
        self.peak_live: dict[int, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self.phase = "setup"
        self._pending: tuple | None = None  # an engine add that may have been in place on CUDA
        self._freed: set[int] = set()
        self._seen_backward = False
        self.max_alloc = 0  # the largest single storage created

    # -- bookkeeping
    def uid(self, storage) -> int | None:
        return self._uid_of.get(storage._cdata)

    def _add(self, storage, origin: str) -> None:
        key = storage._cdata
        if key in self._uid_of:
            return
        uid = next(self._next)
        nbytes = -(-int(storage.nbytes()) // BLOCK) * BLOCK
        self._uid_of[key] = uid
        self.size[uid] = nbytes
        self.origin[uid] = origin
        self.current += nbytes
        self.max_alloc = max(self.max_alloc, nbytes)
        weakref.finalize(storage, self._free, key, uid)

    def _free(self, key: int, uid: int) -> None:
        if self._uid_of.get(key) == uid:
            del self._uid_of[key]
        self.current -= self.size.pop(uid, 0)
        self._freed.add(uid)

    def register(self, tensors, origin: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage(), origin)

    def _note_peak(self, live: int, where: str) -> None:
        phase = where.rsplit("(", 1)[-1].rstrip(")")
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), live)
        if live > self.peak:
            self.peak = live
            self.peak_where = where
            self.peak_live = dict(self.size)

    def reset_peak(self, phase: str) -> None:
        self._resolve()
        self.phase = phase
        self.peak, self.peak_where, self.peak_live = self.current, f"start ({phase})", dict(self.size)
        self.phase_peaks = {}
        self._seen_backward = False

    # -- the CUDA in-place gradient accumulation rule (module docstring)
    def _resolve(self) -> None:
        if self._pending is None:
            return
        a, live, where, snap = self._pending
        self._pending = None
        if a in self._freed:  # the engine held the only reference: CUDA adds in place
            live -= snap.pop(a, 0)
        if live > self.peak:
            self.peak, self.peak_where, self.peak_live = live, where, snap
        self.phase_peaks["backward"] = max(self.phase_peaks.get("backward", 0), live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._resolve()
        self._freed.clear()
        out = func(*args, **(kwargs or {}))
        phase = self.phase
        if phase == "step":  # forward -> backward (inside the autograd engine) -> clip
            if torch._C._current_autograd_node() is not None:
                phase, self._seen_backward = "backward", True
            else:
                phase = "clip" if self._seen_backward else "forward"
        where = f"{func.__name__} ({phase})"
        before = self.current
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), where)
        if self.current > before:
            a = args[0] if args else None
            if (func is torch.ops.aten.add.Tensor and phase == "backward" and not torch.is_grad_enabled()
                    and isinstance(a, torch.Tensor) and isinstance(args[1], torch.Tensor)
                    and a.shape == args[1].shape == out.shape and a.dtype == out.dtype
                    and a.is_contiguous() and self.uid(a.untyped_storage()) is not None):
                snap = dict(self.size) if self.current > self.peak else {}
                self._pending = (self.uid(a.untyped_storage()), self.current, where, snap)
                if not snap:  # cannot become a peak either way
                    self._pending = None
                    self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.current)
            else:
                self._note_peak(self.current, where)
        return out


# ----------------------------------------------------------------------------- the result
@dataclass
class Switch:
    """One memory switch tried alone, or (name starting with '+') on top of the ones before it."""

    name: str
    flags: str
    peak_gib: float
    needed_gib: float
    fits: bool
    changes: dict = field(default_factory=dict)  # the TrainConfig fields it sets (auto-fit)


@dataclass
class MemoryEstimate:
    model: str
    params: int
    trainable: int
    sequences: int  # per micro-batch
    seq_len: int
    k: int
    peak_gib: float  # allocated bytes at the step's peak (max_memory_allocated on CUDA)
    peak_where: str  # op and phase of the peak
    # at the peak, by what each storage is at the end of the step: a gradient still being
    # summed (lm_head's, before the tied embedding's half is added) counts as activations
    breakdown_gib: dict[str, float]
    largest_gib: float  # the largest single non-persistent tensor alive at the peak
    largest_where: str
    phase_gib: dict[str, float]  # peak per phase
    allowance_gib: float  # CUDA context + fragmentation
    needed_gib: float  # peak + allowance
    gpu_gib: float
    fits: bool
    config: dict = field(default_factory=dict)  # the memory-relevant settings estimated
    switches: list[Switch] = field(default_factory=list)
    seconds: float = 0.0
    # what the trainer runs instead when the step does not fit as configured (a smaller
    # micro-batch, more accumulation: the same optimizer step), and why none, when none
    auto_fit: Switch | None = None
    auto_fit_note: str = ""

    @property
    def runs(self) -> bool:
        """Whether `kdcache train` runs this config on the card: as configured or auto-fitted."""
        return self.fits or (self.auto_fit is not None and self.auto_fit.fits)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "runs": self.runs}

    def format(self) -> str:
        b = self.breakdown_gib
        lines = [
            f"memory estimate: {self.model}  ({self.params / 1e9:.3f} B params, "
            f"{self.trainable / 1e9:.3f} B trainable)",
            f"  step: {self.sequences} sequences x {self.seq_len} tokens per micro-batch, K={self.k}; "
            + ", ".join(f"{k}={v}" for k, v in self.config.items()),
            f"  peak {self.peak_gib:.2f} GiB allocated, at {self.peak_where}",
            "    " + "  ".join(f"{k} {b.get(k, 0.0):.2f}" for k in CATEGORIES) + "  (GiB)",
            f"    largest transient: {self.largest_gib:.2f} GiB ({self.largest_where})",
            "  per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in self.phase_gib.items()) + " GiB",
            f"  + allowance {self.allowance_gib:.2f} GiB (CUDA context {CUDA_CONTEXT / GIB:.2f} + "
            f"{FRAGMENTATION:.0%} fragmentation) = {self.needed_gib:.2f} GiB needed of {self.gpu_gib:.2f} GiB: "
            + ("FITS" if self.fits else "DOES NOT FIT"),
        ]
        if self.auto_fit is not None:
            a = self.auto_fit
            lines.append(f"  auto-fit: the trainer runs it as {a.flags} (the same optimizer step): peak "
                         f"{a.peak_gib:.2f}, needed {a.needed_gib:.2f} GiB: FITS (--no-auto-fit refuses instead)")
        elif self.auto_fit_note:
            lines.append(f"  auto-fit: {self.auto_fit_note}")
        if self.switches:
            lines.append("  switches (each alone; '+' lines stack on the ones above):")
            for s in self.switches:
                lines.append(f"    {s.name:<33} peak {s.peak_gib:6.2f}  needed {s.needed_gib:6.2f} GiB  "
                             f"{'FITS        ' if s.fits else 'does not fit'}  {s.flags}")
        lines.append(f"  (simulated on CPU with fake tensors in {self.seconds:.0f}s; train/memory.py lists "
                     "what it models)")
        return "\n".join(lines)


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '24G', '24' (GiB), '23000MiB', '1000B' -> bytes. A "24 GB" card is 24 GiB
    (GB here means GiB, as GPU vendors use it)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text or "")
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 24GiB or 80GB")
    prefix, suffix = m.group(2).lower(), m.group(3)
    unit = {"k": 1, "m": 2, "g": 3, "t": 4}.get(prefix, 0 if suffix else 3)  # "100B": bytes; "24": GiB
    return int(float(m.group(1)) * 1024**unit)


def allowance(peak: int) -> int:
    return int(peak * FRAGMENTATION) + CUDA_CONTEXT


# ----------------------------------------------------------------------------- the step
def synthetic_groups(cfg: TrainConfig, seq_len: int, prompt_len: int, k: int, vocab: int,
                     betas: Sequence[float], per_block: Sequence[int] = (), teachers: int = 1) -> list[dict]:
    """One group holding `per_block[b]` records (default 1) for block b of the objective,
    each `seq_len` tokens (`prompt_len` of prompt), with exactly the fields the trainer reads
    for it. Values are valid (ids in range, log-probs < 0) but meaningless: memory depends on
    shapes only. `teachers` > 1: an ensemble whose teachers' top-K ids are all different, so
    the union index is the worst case, teachers x K wide."""
    spec = OBJECTIVE_SPECS[cfg.objective]
    T = seq_len - prompt_len
    fields = set(objective_fields(cfg))
    values = {"topk_ids": (np.arange(T * k).reshape(T, k) % vocab).astype(np.int32),
              "topk_logprobs": np.full((T, k), -3.0, np.float32),
              "ref_topk_logprobs": np.full((T, k), -3.5, np.float32),
              "soft_value": np.zeros((T + 1, len(betas)), np.float32)}
    group = []
    for b, roles in enumerate(spec.blocks):
        n = per_block[b] if b < len(per_block) and not spec.paired else 1
        for i in range(n):
            rec = {"example_id": "x", "role": roles[0], "group": i,
                   "prompt_ids": np.ones(prompt_len, np.int32),
                   "response_ids": (np.arange(T) % vocab).astype(np.int32),
                   "teacher_prompt_ids": None, "is_terminal": True, "reward": float(i % 2)}
            rec.update({f: values.get(f, np.full(T, -1.0, np.float32)) for f in fields})
            if teachers > 1:
                rec["teachers"] = [{**{f: rec[f] for f in fields}, **(
                    {"topk_ids": ((rec["topk_ids"] + j * k) % vocab).astype(np.int32)} if "topk_ids" in fields else {})}
                    for j in range(teachers)]
            group.append(rec)
    return group


# Student tokens per teacher token when the store's text cannot be measured (`store_shape`):
# a 32k-vocabulary student of a 128k-152k-vocabulary teacher reads English in ~1.18x the
# tokens (Meta: Llama 3's tokenizer needs up to 15% fewer tokens than Llama 2's), plus margin.
XTOK_RATIO = 1.25
XTOK_SAMPLE = 256  # store_shape re-tokenizes about this many of the store's longest records


class XtokShape:
    """The data loader's record translator for a `--cross-tokenizer` step (the `translate`
    of `next_batches`): a synthetic record, already `seq_len` student tokens long, gets the
    fields `CrossTokenizer.__call__` gives a translated record — same names, dtypes and
    shapes — every position aligned and every slot mapped (memory depends on shapes only)."""

    def __init__(self, mode: str, k: int) -> None:
        self.mode = mode
        self.own_topk = int(k) if mode == "uld" else 0  # as train/xtok/setup.prepare sets it

    def __call__(self, rec: dict) -> dict:
        from .xtok.translate import SEQ_SUM_FIELDS

        T = len(rec["response_ids"])
        out = {k: rec[k] for k in ("example_id", "role", "group", "is_terminal", "reward") if k in rec}
        out.update(prompt_ids=np.asarray(rec["prompt_ids"], np.int64),
                   response_ids=np.asarray(rec["response_ids"], np.int64), n_tokens=T,
                   teacher_prompt_ids=None, xtok_aligned=np.ones(T, bool))
        if "topk_logprobs" in rec:
            lp = np.asarray(rec["topk_logprobs"], np.float32)
            if self.mode == "uld":
                out["uld_teacher"] = lp
            elif "topk_ids" in rec:
                out.update(topk_ids=np.asarray(rec["topk_ids"], np.int64), topk_logprobs=lp,
                           xtok_slots=np.ones(lp.shape, bool))
                if rec.get("ref_topk_logprobs") is not None:
                    out["ref_topk_logprobs"] = np.asarray(rec["ref_topk_logprobs"], np.float32)
        for name in SEQ_SUM_FIELDS:
            if rec.get(name) is not None:
                out[name] = np.zeros(T, np.float32)
        return out


def fake_batches(mode, batches) -> list:
    """Fake copies of the trainer's micro-batches (`next_batches` runs for real on the host:
    the collate is not part of the device's memory)."""
    out = []
    for b in batches:
        conv = {f.name: mode.from_tensor(v) for f in dataclasses.fields(b)
                if isinstance(v := getattr(b, f.name), torch.Tensor)}
        fb = dataclasses.replace(b, **conv)
        fb.stored = {k: mode.from_tensor(v) for k, v in b.stored.items()}
        fb.teachers = [{k: mode.from_tensor(v) for k, v in t.items()} for t in b.teachers]
        fb.teacher_pos = [mode.from_tensor(p) for p in b.teacher_pos]
        out.append(fb)
    return out


def batch_tensors(batches) -> list[torch.Tensor]:
    out = []
    for b in batches:
        out += [v for f in dataclasses.fields(b) if isinstance(v := getattr(b, f.name), torch.Tensor)]
        out += list(b.stored.values())
        out += [v for t in b.teachers[1:] for v in t.values()] + list(b.teacher_pos)  # teachers[0] is stored
    return out


def warm_optimizer(optimizer, params) -> None:
    """Create the optimizer's states as its first step does (zero gradients, lr 0), so the
    measured step is a steady-state one (states alive through forward and backward)."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if not torch.is_tensor(g["lr"]) else g["lr"].fill_(0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr


def measure_step(model, cfg: TrainConfig, batches, precision: Precision,
                 make_opt: Callable, tracker: StorageTracker) -> dict:
    """Run one steady-state `train_step` under `tracker` (already active) and classify the
    bytes alive at its peak. Works on real and on fake tensors alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_opt(params)
    scheduler = make_scheduler(cfg.schedule_settings, optimizer, 10)
    warm_optimizer(optimizer, params)
    tracker.reset_peak("step")
    hooks = [optimizer.register_step_pre_hook(lambda *a: setattr(tracker, "phase", "optimizer")),
             optimizer.register_step_post_hook(lambda *a: setattr(tracker, "phase", "step"))]
    train_step(StudentForward(model, cfg.chunk_size), optimizer, scheduler, params, batches, cfg, 1, precision)
    tracker._resolve()
    for h in hooks:
        h.remove()
    uid = tracker.uid
    weights = {uid(t.untyped_storage()) for t in itertools.chain(model.parameters(), model.buffers())}
    grads = {uid(p.grad.untyped_storage()) for p in params if p.grad is not None}
    states = {uid(v.untyped_storage()) for s in optimizer.state.values() for v in _state_tensors(s)}
    inputs = {uid(t.untyped_storage()) for t in batch_tensors(batches)}
    cat = {k: 0 for k in CATEGORIES}
    largest, largest_where = 0, ""
    for u, nbytes in tracker.peak_live.items():
        c = ("weights" if u in weights else "grads" if u in grads else "optimizer" if u in states
             else "inputs" if u in inputs else "activations")
        cat[c] += nbytes
        if c == "activations" and nbytes > largest:
            largest, largest_where = nbytes, tracker.origin.get(u, "?")
    return {"peak": tracker.peak, "peak_where": tracker.peak_where, "breakdown": cat,
            "largest": largest, "largest_where": largest_where,
            "phases": dict(tracker.phase_peaks),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params)}


def _state_tensors(state: dict):
    for v in state.values():
        if isinstance(v, torch.Tensor):
            # a tensor subclass (torchao's 8-bit state) holds its bytes in inner tensors
            inner = getattr(v, "__tensor_flatten__", None)
            yield from ([getattr(v, n) for n in inner()[0]] if inner else [v])


class Modeled8bitAdamW(torch.optim.Optimizer):
    """The memory of torchao's AdamW8bit (0.18): per tensor of >= 4096 values divisible by
    the block, 1-byte codes for each moment plus one float32 scale per 256 values (and the
    256-entry float32 quantisation map); smaller tensors keep moments in their own dtype. The
    compiled update writes in place, without temporaries, so `step` only creates the states."""

    block = 256

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None or self.state[p]:
                    continue
                st = self.state[p]
                st["step"] = torch.zeros((), dtype=torch.float32)
                for name in ("exp_avg", "exp_avg_sq"):
                    if p.numel() >= 4096 and p.numel() % self.block == 0:
                        st[name + "_codes"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                        st[name + "_scale"] = torch.zeros(p.numel() // self.block, device=p.device)
                        st[name + "_qmap"] = torch.zeros(256, device=p.device)
                    else:
                        st[name] = torch.zeros_like(p)


# ----------------------------------------------------------------------------- the estimate
def model_config(cfg: TrainConfig):
    """The student's HF config, read from cfg.model without touching its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the student's config from {cfg.model!r}: {e.__class__.__name__}: "
                         f"pass --model a local HF model directory (its config.json is enough)") from e


def cuda_choices(cfg: TrainConfig) -> tuple[Precision, torch.dtype]:
    """The settings a CUDA run of cfg resolves to: bf16 autocast unless --no-bf16, its weight
    dtype; autocast itself runs on the CPU fake tensors (module docstring)."""
    prec = Precision.for_run(cfg, torch.device("cuda"))
    return Precision(bf16=prec.bf16, device_type="cpu", cache=prec.cache), weights_dtype(cfg, "cuda")


def simulate(cfg: TrainConfig, hf_config, *, seq_len: int, prompt_len: int, k: int,
             per_block: Sequence[int] = (), betas: Sequence[float] = (1.0,),
             make_opt: Callable | None = None, teachers: int = 1) -> dict:
    """One steady-state step of cfg on fake tensors, as CUDA would run it. Loads no weights.
    `make_opt(params)` replaces the trainer's optimizer (benchmarks compare others)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    if cfg.load_in_4bit:
        raise ValueError("the memory estimate does not model --load-in-4bit (bitsandbytes 4-bit base)")
    if cfg.cross_tokenizer != "off":
        from .xtok.setup import REFUSED

        if cfg.objective in REFUSED:
            raise ValueError(f"--cross-tokenizer with --objective {cfg.objective}: {REFUSED[cfg.objective]}")
    if cfg.objective == "tgpo":  # module docstring: the same rollouts and gather, under the kd loss
        cfg = dataclasses.replace(cfg, objective="kd")
    # micro-batches 4..N of a step repeat the third (the accumulated gradients, one micro-batch's
    # activations, the running metric sums: the 2nd differs from the 3rd by one 512-byte block
    # of them); only their inputs, all collated before the step, add up (tests/test_memory_autofit.py)
    extra_inputs = max(0, cfg.grad_accum - 3)
    cfg = _variant(cfg, grad_accum=min(cfg.grad_accum, 3))
    precision, wdtype = cuda_choices(cfg)
    if cfg.objective == "tvkd":  # unset: the store's only beta (train.trainer.resolve_tvkd_beta)
        cfg = cfg if cfg.tvkd_beta is not None else _variant(cfg, tvkd_beta=float(betas[0]))
        betas = tuple(sorted({*betas, cfg.tvkd_beta}))
    vocab = hf_config.vocab_size  # the student's: with another tokenizer, its own ids
    group = synthetic_groups(cfg, seq_len, prompt_len, k, vocab, betas, per_block, teachers)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    real = next_batches(itertools.repeat(group), cfg, 0, tuple(betas), torch.device("cpu"),
                        translate=xtok_translate(cfg, k), teacher_weights=(1.0 / teachers,) * teachers)[0]
    batches = fake_batches(mode, real)
    tracker = StorageTracker()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fake ops compute nothing; threads only add overhead
    try:
        with _quiet():
            with torch.device("meta"):  # the architecture only: no weights, no init compute
                model = AutoModelForCausalLM.from_config(hf_config, dtype=wdtype)
            model = prepare_student(model, cfg)  # LoRA / grad checkpointing wiring, on meta
        with _unpadded_mask_is_causal(real), mode, tracker, _quiet():
            fake_weights_(model)
            model.train()
            tracker.register(batch_tensors(batches), "inputs")
            make_opt = make_opt or ((lambda ps: Modeled8bitAdamW(ps, lr=cfg.lr)) if cfg.optim == "adamw8bit"
                                    else (lambda ps: make_optimizer(cfg.optim_settings, ps, device_type="cuda")))
            res = measure_step(model, cfg, batches, precision, make_opt, tracker)
    finally:
        torch.set_num_threads(threads)
    if extra_inputs:
        one = extra_inputs * _storage_bytes(batch_tensors(batches[-1:]))
        res["peak"] += one
        res["breakdown"]["inputs"] += one
        res["phases"] = {p: v + one for p, v in res["phases"].items()}
    res["sequences"] = len(batches[0].roles)
    return res


def xtok_translate(cfg: TrainConfig, k: int) -> XtokShape | None:
    """The synthetic translator of a `--cross-tokenizer` run (None without one)."""
    return None if cfg.cross_tokenizer == "off" else XtokShape(cfg.cross_tokenizer, k)


def _storage_bytes(tensors) -> int:
    """Bytes of the unique storages of `tensors`, in the allocator's 512-byte blocks."""
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(-(-int(n) // BLOCK) * BLOCK for n in seen.values())


def fake_weights_(model: torch.nn.Module) -> None:
    """Replace every meta parameter and buffer of `model` by an empty fake CPU tensor of the
    same shape and dtype (inside an active FakeTensorMode); tied weights stay tied."""
    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for slots in (mod._parameters, mod._buffers):
            for name, t in list(slots.items()):
                if t is None:
                    continue
                if id(t) not in memo:
                    new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    memo[id(t)] = (torch.nn.Parameter(new, requires_grad=t.requires_grad)
                                   if isinstance(t, torch.nn.Parameter) else new)
                slots[name] = memo[id(t)]


@contextlib.contextmanager
def _unpadded_mask_is_causal(batches):
    """transformers decides from the padding mask's VALUES whether SDPA can run causal without
    a mask; fake tensors have none, so it would build an [S, 1, L, L] mask. Our synthetic
    batches are unpadded (checked here on the host), so answer as for an all-ones mask."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        yield
        return
    orig = getattr(mu, "_ignore_causal_mask_sdpa", None)
    unpadded = all(b.attention_mask is None or bool(b.attention_mask.all()) for b in batches)
    if orig is None or not unpadded:
        yield
        return

    def ignore(padding_mask, *a, **kw):
        return orig(None if padding_mask is not None and not has_data(padding_mask) else padding_mask, *a, **kw)

    mu._ignore_causal_mask_sdpa = ignore
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa = orig


@contextlib.contextmanager
def _quiet():
    tl = logging.getLogger("transformers")
    level = tl.level
    tl.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tl.setLevel(level)


def memory_settings(cfg: TrainConfig) -> dict:
    """The options that change the step's memory, as a CUDA run resolves them."""
    return {"weights": str(weights_dtype(cfg, "cuda")).replace("torch.", ""),
            "optim": cfg.optim, "optim_states": "8bit" if cfg.optim == "adamw8bit" else (
                "bf16" if cfg.optim_states == "bf16" else "fp32"),
            "grad_ckpt": bool(cfg.grad_checkpointing), "chunk": cfg.chunk_size,
            "lora_r": cfg.lora_r, "batch_groups": cfg.batch_groups,
            **({"cross_tokenizer": cfg.cross_tokenizer} if cfg.cross_tokenizer != "off" else {})}


# TrainConfig fields that cannot change a step's memory (every other one is in the cache key)
NOT_MEMORY = {"model", "store", "store_weights", "out", "store_root", "seed", "lr", "weight_decay", "warmup_steps",
              "max_steps", "epochs", "log_every", "save_every", "resume", "report_to", "run_name", "wandb_project", "progress",
              "fit_check", "auto_fit", "estimate_memory", "gpu_memory", "require_fit", "estimate_seq_len"}


def _cache_key(cfg: TrainConfig, hf_config, shape: dict) -> str:
    import transformers

    relevant = {k: v for k, v in cfg.to_dict().items() if k not in NOT_MEMORY}
    blob = json.dumps([relevant, hf_config.to_dict(), shape, torch.__version__,
                       transformers.__version__, _code_version()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _code_version() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("memory.py", "step.py", "chunked.py", "optim.py", "student.py", "batch.py",
                 "xtok/student_topk.py", "xtok/translate.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def _cache_dir() -> Path:
    return Path(os.environ.get("KDCACHE_CACHE", Path.home() / ".cache" / "kdcache")) / "memory"


def simulate_cached(cfg: TrainConfig, hf_config, **shape) -> dict:
    """`simulate`, remembered on disk per (settings, model config, shape, code version)."""
    path = _cache_dir() / f"{_cache_key(cfg, hf_config, shape)}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    res = simulate(cfg, hf_config, **shape)
    res["seconds"] = time.perf_counter() - t0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
    except OSError:
        pass
    return res


def _variant(cfg: TrainConfig, **kw) -> TrainConfig:
    return dataclasses.replace(cfg, **kw)


def _switches(cfg: TrainConfig) -> list[tuple[str, str, dict]]:
    """The memory switches that apply to cfg, most preferred first: (name, flags, changes).
    A `seq_len` change means shorter stored sequences (precompute --max-length)."""
    out = []
    if not cfg.grad_checkpointing:
        out.append(("gradient checkpointing", "--grad-checkpointing", {"grad_checkpointing": True}))
    if cfg.batch_groups > 1:
        accum = cfg.grad_accum * cfg.batch_groups
        out.append(("micro-batch of 1 group", f"--batch-groups 1 --grad-accum {accum}",
                    {"batch_groups": 1, "grad_accum": accum}))
    if cfg.lora_r == 0 and cfg.optim != "adamw8bit":
        out.append(("8-bit AdamW states (torchao)", "--optim adamw8bit", {"optim": "adamw8bit"}))
    if cfg.chunk_size > 256:
        out.append(("smaller lm_head chunks", "--chunk-size 256", {"chunk_size": 256}))
    if cfg.lora_r == 0:
        out.append(("LoRA r=16 on all linear layers", "--lora-r 16 --lora-targets " + ",".join(LORA_ALL),
                    {"lora_r": 16, "lora_targets": LORA_ALL, "optim": "adamw"}))
    out.append(("half-length sequences", "precompute --max-length {half}", {"seq_len": 0.5}))
    return out


def _apply(cfg: TrainConfig, seq_len: int, changes: dict) -> tuple[TrainConfig, int]:
    changes = dict(changes)
    s = max(64, int(seq_len * changes.pop("seq_len"))) if "seq_len" in changes else seq_len
    return _variant(cfg, **changes), s


def estimate_memory(cfg: TrainConfig, hf_config=None, *, seq_len: int = 2048, prompt_len: int | None = None,
                    k: int = 50, per_block: Sequence[int] = (), teachers: int = 1, gpu_bytes: int | None = None,
                    suggest: bool = True, stop_at_fit: bool = False, cache: bool = True,
                    auto_fit: bool = False, uniform_groups: bool = True, xtok_ratio: str = "",
                    progress: Callable[[str], None] | None = None) -> MemoryEstimate:
    """The peak memory of one training step of cfg on a CUDA GPU of `gpu_bytes`; when it does
    not fit, with `auto_fit`, the micro-batch split the trainer would run instead
    (`est.auto_fit`, or `est.auto_fit_note` saying why none), and, when that does not make it
    fit either and `suggest`, the switches that would, each estimated.

    `hf_config`: the student's transformers config (default: read from cfg.model).
    `seq_len`/`prompt_len`: tokens per sequence (every sequence of the micro-batch is this
    long: the worst case); `k`: stored top-K; `per_block`: records per role block of a group
    of an unpaired objective (e.g. the G rollouts of a TGPO group; default 1 each);
    `teachers`: an ensemble's stores (their union index taken as teachers x K wide);
    `uniform_groups`: every group gives each block the same number of records (`store_shape`).
    `--cross-tokenizer`: `seq_len`/`prompt_len` are the student's tokens; `xtok_ratio` says
    how they were found (shown with the settings).
    `progress(msg)` hears of each simulation before it runs (seconds to minutes on one core)."""
    hf_config = hf_config if hf_config is not None else model_config(cfg)
    gpu = gpu_bytes or DEFAULT_GPU
    prompt_len = prompt_len if prompt_len is not None else max(1, seq_len // 8)
    run = simulate_cached if cache else simulate
    t0 = time.perf_counter()

    def one(c: TrainConfig, s: int) -> dict:
        p = min(prompt_len, s // 2) if s != seq_len else prompt_len
        shape = dict(seq_len=s, prompt_len=max(1, p), k=k, per_block=tuple(per_block))
        return run(c, hf_config, **shape, **({"teachers": teachers} if teachers > 1 else {}))

    if progress:
        progress("simulating the step as configured")
    r = one(cfg, seq_len)
    need = r["peak"] + allowance(r["peak"])
    est = MemoryEstimate(
        model=getattr(hf_config, "_name_or_path", "") or hf_config.model_type,
        params=r["params"], trainable=r["trainable"], sequences=r["sequences"], seq_len=seq_len, k=k,
        peak_gib=r["peak"] / GIB, peak_where=r["peak_where"],
        breakdown_gib={c: v / GIB for c, v in r["breakdown"].items()},
        largest_gib=r["largest"] / GIB, largest_where=r["largest_where"],
        phase_gib={p: v / GIB for p, v in r["phases"].items()},
        allowance_gib=allowance(r["peak"]) / GIB, needed_gib=need / GIB, gpu_gib=gpu / GIB,
        fits=need <= gpu, config={**memory_settings(cfg), **({"teachers": teachers} if teachers > 1 else {}),
                                  **({"student_tokens": xtok_ratio} if xtok_ratio else {})})
    if not est.fits and auto_fit:
        est.auto_fit_note = split_blocker(cfg, uniform_groups)
        if not est.auto_fit_note:
            est.auto_fit = _largest_split(cfg, seq_len, one, gpu, progress)
            if est.auto_fit is None:
                est.auto_fit_note = "no smaller micro-batch fits either (--batch-groups 1 included)"
    if not est.runs and suggest:
        est.switches = _try_switches(cfg, seq_len, one, gpu, stop_at_fit, progress)
    est.seconds = time.perf_counter() - t0
    return est


def same_step_splits(cfg: TrainConfig) -> list[tuple[int, int]]:
    """(batch_groups, grad_accum) of every smaller micro-batch that takes the same groups per
    optimizer step as cfg (an exact divisor of --batch-groups), largest micro-batch first."""
    b = cfg.batch_groups
    return [(d, cfg.grad_accum * (b // d)) for d in range(b - 1, 0, -1) if b % d == 0]


def split_blocker(cfg: TrainConfig, uniform_groups: bool = True) -> str:
    """Why a smaller micro-batch would change the optimizer step's math ("" when it would not).

    `train_step` averages the micro-batches' losses, and every paper-form loss is a mean of
    per-sequence (or per-pair, per-prompt) terms over the micro-batch; split into equal parts,
    the mean of the parts' means is the whole batch's mean: the same gradient, up to float
    summation order. Equal parts need every group to supply the same records; a token mean
    over the micro-batch (the released-code variants) would weight tokens differently."""
    if cfg.batch_groups <= 1:
        return "the micro-batch is already one group (--batch-groups 1)"
    if (cfg.objective == "dckd" and cfg.dckd_released_code) or (cfg.objective == "adpa" and cfg.adpa_released_code):
        return (f"{cfg.objective}'s released-code loss is a token mean over the micro-batch, so a smaller "
                "micro-batch would weight tokens differently: only suggested below")
    if not uniform_groups:
        return ("the store's groups give the objective unequal numbers of records, so a smaller micro-batch "
                "would weight them differently: only suggested below")
    return ""


def _largest_split(cfg: TrainConfig, seq_len: int, one: Callable, gpu: int,
                   progress: Callable[[str], None] | None) -> Switch | None:
    """The largest same-step micro-batch that fits, by bisection over `same_step_splits`
    (a smaller micro-batch never needs more memory): log2(#splits) simulations."""
    splits = same_step_splits(cfg)
    lo, hi, best = 0, len(splits) - 1, None  # find the first (largest) index that fits
    while lo <= hi:
        mid = (lo + hi) // 2
        b, a = splits[mid]
        if progress:
            progress(f"simulating --batch-groups {b} --grad-accum {a}")
        r = one(_variant(cfg, batch_groups=b, grad_accum=a), seq_len)
        need = r["peak"] + allowance(r["peak"])
        if need <= gpu:
            best, hi = Switch("same step, smaller micro-batch", f"--batch-groups {b} --grad-accum {a}",
                              r["peak"] / GIB, need / GIB, True, {"batch_groups": b, "grad_accum": a}), mid - 1
        else:
            lo = mid + 1
    return best


def _try_switches(cfg: TrainConfig, seq_len: int, one: Callable, gpu: int, stop_at_fit: bool,
                  progress: Callable[[str], None] | None) -> list[Switch]:
    """Each switch alone; if none fits alone, the switches stacked in order until one fits."""
    found: list[Switch] = []

    def run(name: str, flags: str, c: TrainConfig, s: int) -> bool:
        if progress:
            progress(f"simulating with {name}")
        try:
            r = one(c, s)
        except (ValueError, RuntimeError) as e:
            log.warning("estimate for %s failed: %s", name, e)
            return False
        need = r["peak"] + allowance(r["peak"])
        found.append(Switch(name, flags.replace("{half}", str(s)), r["peak"] / GIB, need / GIB, need <= gpu))
        return need <= gpu

    switches = _switches(cfg)
    for name, flags, changes in switches:
        if run(name, flags, *_apply(cfg, seq_len, changes)) and stop_at_fit:
            return found
    if any(s.fits for s in found):
        return found
    c, s = cfg, seq_len
    for i, (name, flags, changes) in enumerate(switches):
        c, s = _apply(c, s, changes)
        if i and run("+ " + name, flags, c, s):  # the first is the same as alone
            break
    return found


# ----------------------------------------------------------------------------- the trainer's hook
def store_shape(store, cfg: TrainConfig) -> dict:
    """seq_len / prompt_len / k / per_block of the worst micro-batch the store can produce:
    its longest record, its largest role block per group (read from the records tables only),
    and `uniform`: whether every group gives each block of the objective the same number of
    records (then a smaller micro-batch keeps the step's math: `split_blocker`).
    Several stores (a list): the worst of each, and for --ensemble `teachers` = their number
    (the union index J x K wide); a mixture's groups come from one store each."""
    if isinstance(store, list | tuple):
        shapes = [store_shape(s, cfg) for s in store]
        worst = max(shapes, key=lambda x: x["seq_len"])
        return {**worst, "k": max(x["k"] for x in shapes),
                "per_block": tuple(max(x["per_block"][b] for x in shapes) for b in range(len(worst["per_block"]))),
                "uniform": all(x["uniform"] for x in shapes) and len({x["per_block"] for x in shapes}) == 1,
                "teachers": len(store) if cfg.ensemble else 1}
    longest, prompt = 0, 1
    spec = OBJECTIVE_SPECS[cfg.objective]
    per_block = [1] * len(spec.blocks)
    layouts: set[tuple[int, ...]] = set()  # records per block, per group
    n = len(store.shards)
    picked = range(n) if n <= MAX_SHARDS_READ else np.linspace(0, n - 1, MAX_SHARDS_READ).astype(int)
    if n > MAX_SHARDS_READ:
        log.warning("memory estimate: the longest record of %d of the store's %d shards sets the sequence "
                    "length; pass --estimate-seq-len to set it", MAX_SHARDS_READ, n)
    for i in picked:
        shard = store.load_shard(int(i), fields=())  # the records table only
        plens = shard.lengths("prompt_ids")
        total = plens + shard.column("n_tokens")
        j = int(np.argmax(total))
        if int(total[j]) > longest:
            longest, prompt = int(total[j]), int(plens[j])
        counts: dict = {}
        for e, r in zip(shard.column("example_id"), shard.column("role"), strict=True):
            c = counts.setdefault(e, [0] * len(spec.blocks))
            for b, rs in enumerate(spec.blocks):
                if r in rs:
                    c[b] += 1
                    break
        for c in counts.values():
            # a paired objective takes one record per block, and skips a group missing one
            layouts.add(tuple(min(x, 1) for x in c) if spec.paired else tuple(c))
            if not spec.paired:
                per_block = [max(p, x) for p, x in zip(per_block, c, strict=True)]
    ratio_note = ""
    if cfg.cross_tokenizer != "off" and longest and not cfg.estimate_seq_len:
        ratio, ratio_note = xtok_ratio(store, cfg, picked)
        longest, prompt = math.ceil(longest * ratio), math.ceil(prompt * ratio)  # in student tokens
    elif cfg.cross_tokenizer != "off":
        ratio_note = "--estimate-seq-len" if cfg.estimate_seq_len else "2048 (no records)"
    seq = cfg.estimate_seq_len or longest or 2048
    return {"seq_len": seq, "prompt_len": max(1, min(prompt, seq - 1)) if longest else max(1, seq // 8),
            "k": int(store.meta.k or 1), "per_block": tuple(per_block), "betas": tuple(store.meta.betas or (1.0,)),
            "uniform": len(layouts) <= 1, "teachers": 1, "xtok_ratio": ratio_note}


def xtok_ratio(store, cfg: TrainConfig, picked) -> tuple[float, str]:
    """Student tokens per store token for `--cross-tokenizer`, and how it was found: the
    largest ratio (prompt in the student's template + response, over the store's prompt +
    response) among the longest records of the `picked` shards (XTOK_SAMPLE // shards each,
    at least one), re-tokenized as the data loader will (`CrossTokenizer`), so the scaled
    longest record bounds every sampled one in student tokens; XTOK_RATIO when the store
    carries no tokenizer or text, or cfg.model no tokenizer (a config-only directory)."""
    from .xtok.setup import store_tokenizer
    from .xtok.translate import AlignStats, CrossTokenizer, MissingText

    why = "no tokenizer files in the store"
    if store.has_tokenizer_files:
        try:
            from transformers import AutoTokenizer

            student = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=False)
            xt = CrossTokenizer(store_tokenizer(store), student, torch.zeros(0, dtype=torch.int64), "map")
        except (OSError, ValueError) as e:
            why = f"no student tokenizer ({type(e).__name__})"
        else:
            picked = list(picked)
            per_shard = max(1, XTOK_SAMPLE // len(picked))
            ratios = []
            try:
                for i in picked:
                    shard = store.load_shard(int(i), fields=())
                    total = shard.lengths("prompt_ids") + np.asarray(shard.column("n_tokens"))
                    for j in np.argsort(-total, kind="stable")[:per_shard]:
                        rec = shard.record(int(j))
                        n = len(xt.prompt_ids(rec)) + len(xt.response(rec, AlignStats())[0])
                        ratios.append(n / max(1, int(total[j])))
            except MissingText:
                why = "records without text"
            else:
                if ratios:
                    return max(ratios), f"x{max(ratios):.3f} measured on {len(ratios)} records"
    log.warning("memory estimate: --cross-tokenizer: %s, so the student's sequence is taken as %.2fx the "
                "store's; pass --estimate-seq-len (student tokens) to set it", why, XTOK_RATIO)
    return XTOK_RATIO, f"x{XTOK_RATIO} assumed ({why})"


def detected_gpu_bytes(cfg: TrainConfig) -> int | None:
    if cfg.gpu_memory:
        return parse_size(cfg.gpu_memory)
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    return None


def fit_or_fail(cfg: TrainConfig, store) -> TrainConfig:
    """The trainer's up-front check on CUDA (before any weight is loaded); returns the config
    to run.

    Rule (a few simulations of seconds to minutes each, cached on disk per settings, model
    config and store shape, so a resumed or repeated run pays nothing):
    - simulate the step as configured, with grad checkpointing ON if it was left on auto;
    - auto and it fits with room to spare (needed < half the GPU): simulate it OFF too and
      keep it off if that fits (checkpointing costs ~30% more compute);
    - it does not fit: with --auto-fit (the default) run the same optimizer step as smaller
      micro-batches with more accumulation, the largest that fits, and say so in one line;
      when none fits (or the split would change the math, or --no-auto-fit): stop with the
      estimate and the switches tried in order of preference (alone, then stacked) up to the
      first that fits, so no run OOMs after loading weights. Switches that change what is
      trained (shorter sequences, another optimizer, LoRA) are only ever suggested."""
    gpu = detected_gpu_bytes(cfg)
    hf_config = model_config(cfg)
    shape = store_shape(store, cfg)
    kw = dict(seq_len=shape["seq_len"], prompt_len=shape["prompt_len"], k=shape["k"],
              per_block=shape["per_block"], teachers=shape["teachers"], gpu_bytes=gpu,
              xtok_ratio=shape["xtok_ratio"])
    auto_gc = cfg.grad_checkpointing is None
    c = _variant(cfg, grad_checkpointing=True) if auto_gc else cfg
    est = estimate_memory(c, hf_config, suggest=False, auto_fit=cfg.auto_fit, uniform_groups=shape["uniform"], **kw)
    if est.fits and auto_gc and est.needed_gib < est.gpu_gib / 2:
        off = estimate_memory(_variant(cfg, grad_checkpointing=False), hf_config, suggest=False, **kw)
        if off.fits:
            c, est = _variant(cfg, grad_checkpointing=False), off
    if est.fits:
        log.info("memory: step peak %.2f GiB + %.2f allowance of %.2f GiB (grad checkpointing %s)",
                 est.peak_gib, est.allowance_gib, est.gpu_gib, "on" if c.grad_checkpointing else "off")
        return c
    if est.auto_fit is not None:
        a = est.auto_fit
        log.warning("memory: --batch-groups %d --grad-accum %d needs %.2f GiB of %.2f; running %s instead, the "
                    "same optimizer step of %d groups (%.2f GiB; --no-auto-fit refuses instead)",
                    c.batch_groups, c.grad_accum, est.needed_gib, est.gpu_gib, a.flags,
                    c.batch_groups * c.grad_accum, a.needed_gib)
        return _variant(c, **a.changes)
    est = estimate_memory(c, hf_config, suggest=True, stop_at_fit=True, auto_fit=cfg.auto_fit,
                          uniform_groups=shape["uniform"], **kw)
    raise ValueError("this training step does not fit the GPU; nothing was loaded.\n" + est.format()
                     + "\nuse a setting marked FITS (or pass --no-fit-check to try anyway)")


def estimate_for_cli(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> MemoryEstimate:
    """`kdcache train --estimate-memory`: the store (when given) sets the shape."""
    if not cfg.model:
        raise ValueError("--estimate-memory needs --model DIR (a local HF directory; its config.json is enough)")
    cfg = cfg.validated(need_store=False)  # the entry point: checked here, once
    shape = {"seq_len": cfg.estimate_seq_len or 2048, "prompt_len": None, "k": 50, "per_block": (),
             "uniform_groups": True, "teachers": 1,
             "xtok_ratio": "" if cfg.cross_tokenizer == "off" else (
                 "--estimate-seq-len" if cfg.estimate_seq_len else "2048 (no --store)")}
    if cfg.store:
        from kdcache.store import open_store

        stores = [open_store(u, root=cfg.store_root) for u in cfg.store]
        s = store_shape(stores if len(stores) > 1 else stores[0], cfg)
        shape.update({k: s[k] for k in ("seq_len", "prompt_len", "k", "per_block", "teachers", "xtok_ratio")},
                     uniform_groups=s["uniform"])
    gpu = detected_gpu_bytes(cfg) or DEFAULT_GPU
    if cfg.grad_checkpointing is None:  # auto: the estimate shows what the trainer would start with
        cfg = _variant(cfg, grad_checkpointing=True)
    return estimate_memory(cfg, model_config(cfg), gpu_bytes=gpu, progress=progress, auto_fit=cfg.auto_fit, **shape)
