"""The optimizer and the learning-rate schedule of a run.

Which AdamW runs (`make_optimizer`):

| weights | --optim | --optim-states | update |
|---|---|---|---|
| fp32 | adamw | (fp32) | `torch.optim.AdamW`, fused (CUDA and CPU) |
| bf16 | adamw | fp32 (auto) | `AdamW` below: fp32 moments, the new weight rounded stochastically to bf16 |
| bf16 | adamw | bf16 | `AdamW` below with bf16 moments (stochastically rounded too): 4 B/param less |
| any | adamw8bit | (8-bit) | torchao `AdamW8bit`: 1-byte moments + a scale per 256 values; bf16 weights rounded stochastically |

Why stochastic rounding: with lr ~1e-5 an update moves a weight by ~1e-5 relative, far below
bf16's half-ulp (2^-9 ~ 2e-3), so round-to-nearest drops it and the model stops learning;
rounding up with probability (remainder / ulp) keeps every update in expectation.
`--no-stochastic-rounding` gives plain round-to-nearest (what `torch.optim.AdamW` does on bf16
weights), for comparison.
"""

from __future__ import annotations

import math

import torch

from .config import OptimSettings, ScheduleSettings

SLICE = 1 << 23  # elements per fp32 working slice: bounds the update's temporaries (~100 MB)


def warmup_steps(sched: ScheduleSettings, total: int) -> int:
    """Warm-up length: `warmup_steps`, or `warmup_ratio` of the run (as HF's TrainingArguments
    rounds it: ceil)."""
    return sched.warmup_steps or math.ceil(sched.warmup_ratio * total)


def lr_lambda(sched: ScheduleSettings, total: int):
    """The learning-rate factor at each step: linear warm-up from lr/warmup to lr, then
    `linear` decay to 0 at step `total`, `cosine` decay to 0 (half a cosine, as HF's
    get_cosine_schedule_with_warmup and the papers' recipes), or `constant`."""
    warm = warmup_steps(sched, total)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if sched.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if sched.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def stochastic_round_(x32: torch.Tensor) -> torch.Tensor:
    """Round float32 `x32` IN PLACE to a bf16-representable value, up (away from zero) with
    probability (dropped low 16 bits) / 2^16, so E[round(x)] = x. Returns x32 (exact in bf16)."""
    bits = x32.view(torch.int32)
    bits.add_(torch.randint_like(bits, 0, 1 << 16))
    bits.bitwise_and_(-(1 << 16))  # keep sign, exponent and the top 7 mantissa bits
    return x32


class AdamW(torch.optim.Optimizer):
    """AdamW for low-precision weights: torch's own fused AdamW arithmetic on float32 working
    copies, one slice of <= `SLICE` elements at a time, then the new weight (and bf16 moments)
    written back with stochastic rounding (`stochastic=True`) or round-to-nearest.

    `state_dtype` is the moments' dtype (float32 or bfloat16). For float32 weights and float32
    moments this is exactly `torch.optim.AdamW(fused=True)` (tested bitwise on CPU)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_dtype: torch.dtype = torch.float32,
                 stochastic: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.stochastic = stochastic

    def _store(self, dst: torch.Tensor, src32: torch.Tensor) -> None:
        if dst.dtype != torch.float32 and self.stochastic and dst.dtype == torch.bfloat16:
            stochastic_round_(src32)
        dst.copy_(src32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                flat = [p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
                for s in range(0, p.numel(), SLICE):
                    w, g, m, v = (t[s:s + SLICE] for t in flat)
                    w32, m32, v32 = (t if t.dtype == torch.float32 else t.float() for t in (w, m, v))
                    torch._fused_adamw_([w32], [g.float()], [m32], [v32], [], [state["step"]],
                                        lr=group["lr"], beta1=beta1, beta2=beta2,
                                        weight_decay=group["weight_decay"], eps=group["eps"],
                                        amsgrad=False, maximize=False)
                    for dst, src in ((w, w32), (m, m32), (v, v32)):
                        if dst is not src:
                            self._store(dst, src)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts every floating state to its parameter's dtype, which
        # would round float32 moments of bf16 weights to bf16: put the saved dtypes back.
        saved = {i: {k: v for k, v in s.items() if torch.is_tensor(v)}
                 for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, tensors in saved.items():
            p = params[int(i)]
            for k, v in tensors.items():
                self.state[p][k] = v.to(p.device)


def state_dtype(opt: OptimSettings) -> torch.dtype:
    return torch.bfloat16 if opt.optim_states == "bf16" else torch.float32


def make_optimizer(opt: OptimSettings, params, device_type: str | None = None):
    """The run's optimizer (`opt`: a run's `TrainConfig.optim_settings`). `device_type` is where
    the parameters live ("cuda" picks the fused kernel); the memory estimate passes "cuda"
    while running on CPU fake tensors."""
    params = list(params)
    device_type = device_type or (params[0].device.type if params else "cpu")
    low = any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    if opt.optim == "adamw8bit":
        return adamw8bit(opt, params, low)
    if opt.optim != "adamw":
        raise ValueError(f"unknown --optim {opt.optim!r}: use adamw or adamw8bit")
    sdt = state_dtype(opt)
    if low and not (sdt == torch.bfloat16 and not opt.stochastic_rounding):
        return AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay, state_dtype=sdt,
                     stochastic=opt.stochastic_rounding)
    # fp32 weights (or bf16 weights with plain round-to-nearest bf16 states): torch's AdamW,
    # fused on CUDA (foreach would hold a second copy of the states during the step) and on
    # CPU (one vectorised pass per tensor: 4-6x faster than the default per-op loop there,
    # e.g. ~0.9 s -> ~0.15 s a step for a 45M-parameter student on 2 cores)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay,
                             fused=True if device_type in ("cuda", "cpu") else None)


def adamw8bit(opt: OptimSettings, params, low: bool):
    """torchao's block-wise 8-bit AdamW (1 byte per moment + one fp32 scale per 256 values;
    tensors under 4096 values keep full-precision moments), with stochastic rounding into bf16
    weights. Its update is a torch.compile'd kernel, so in practice it needs CUDA."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        raise ValueError("--optim adamw8bit needs torchao: pip install 'kdcache[gpu]' (or torchao)") from e
    return AdamW8bit(params, lr=opt.lr, weight_decay=opt.weight_decay,
                     bf16_stochastic_round=low and opt.stochastic_rounding)


def make_scheduler(sched: ScheduleSettings, optimizer, total: int):
    """The learning-rate schedule over `total` steps (`sched`: a run's
    `TrainConfig.schedule_settings`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(sched, total))
