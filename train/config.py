"""Typed training config. YAML files mirror these fields one to one; CLI flags override."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OBJECTIVES = ("sft", "seqkd", "kd", "dckd", "adpa", "tvkd", "dpo", "tgpo", "pbsd")


@dataclass
class TrainConfig:
    model: str = ""  # student: local HF dir (or hub id)
    store: str = ""  # store URL, path or content key under store_root
    out: str = "runs/student"
    objective: str = "sft"
    store_root: str = ""  # where content keys are resolved

    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: float = 1.0
    batch_groups: int = 8  # example groups per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    optim: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    seed: int = 0

    # memory
    chunk_size: int = 1024  # positions per lm_head chunk in the loss
    packing: bool = False  # one row per micro-batch, no padding (best with flash_attention_2)
    grad_checkpointing: bool | None = None  # None: auto (on CUDA the fit check turns it on when the step needs it)
    bf16: bool | None = None  # None: on when CUDA is available
    # weights: fp32 | bf16 | auto (bf16 whenever bf16 autocast is on, i.e. on CUDA: full
    # fine-tunes then keep fp32 AdamW moments and round each update stochastically, train/optim.py)
    weights_dtype: str = "auto"
    optim_states: str = "auto"  # AdamW moments: auto (fp32) | fp32 | bf16 (4 B/param less; adamw8bit: 1 byte)
    stochastic_rounding: bool = True  # bf16 weights: round each update stochastically (off: small updates are lost)
    fit_check: bool = True  # CUDA: estimate the step's memory before loading weights; refuse (with the switch to use) if it cannot fit
    estimate_memory: bool = False  # print the memory estimate of one training step (loads no weights) and exit
    gpu_memory: str = ""  # card size for the estimate / fit check, e.g. 24GiB ("": the CUDA device's free memory, else 24GiB)
    require_fit: bool = False  # with --estimate-memory: exit 1 when the step does not fit (for scripts)
    estimate_seq_len: int = 0  # tokens per sequence the estimate assumes (0: the store's longest record)
    lora_r: int = 0  # 0: full fine-tune
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    load_in_4bit: bool = False  # QLoRA, needs bitsandbytes + CUDA

    # objectives (METHODS.md §2)
    kd_mode: str = "renorm"  # renorm | tail
    kd_divergence: str = "forward"  # forward | reverse | jsd
    dckd_alpha: float = 0.2
    adpa_gamma: float = 3.0
    adpa_reference_code: bool = False  # the authors' released code, not Eq. 10: adv clamped to [0,1], token mean
    tvkd_alpha: float = 0.7
    tvkd_beta: float = 2.0  # which stored soft-value β to use
    tvkd_beta_s: float = 1.0
    tvkd_maxent: bool = False
    dpo_beta: float = 0.1
    dpo_nll: float = 0.0  # >0: add w·NLL(y_w)/|y_w| (RPO, Pang et al. 2024); keeps DPO from only pushing y_l down
    pbsd_beta: float = 0.1
    tgpo_w_init: float = 2e-3
    tgpo_delta: float = 1e-5
    tgpo_clip: float = 0.2
    tgpo_shaping: bool = False  # TGPO_R: reward shaping instead of the guidance loss
    tgpo_lambda: float = 0.1
    tgpo_step_offset: int = 0  # global step at which this run starts (TGPO rounds continue the w schedule)

    # bookkeeping
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    resume: bool = True
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}"
            )
        if not self.model:
            raise ValueError("no student model: pass --model DIR (a local HF directory)")
        if not self.store:
            raise ValueError("no store: pass --store URL (from `kdcache precompute`)")
        if self.weights_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--weights-dtype {self.weights_dtype!r}: use auto, fp32 or bf16")
        if self.optim_states not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--optim-states {self.optim_states!r}: use auto, fp32 or bf16")
        if self.batch_groups < 1 or self.grad_accum < 1:
            raise ValueError("--batch-groups and --grad-accum must be >= 1")
        checks = [
            ("max-steps", self.max_steps, self.max_steps >= 0, ">= 0 (0: run --epochs epochs)"),
            ("epochs", self.epochs, self.epochs > 0, "> 0 (or set --max-steps)"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("warmup-steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
            ("max-grad-norm", self.max_grad_norm, self.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
            ("chunk-size", self.chunk_size, self.chunk_size >= 1, ">= 1"),
            ("lora-r", self.lora_r, self.lora_r >= 0, ">= 0 (0: full fine-tune)"),
            ("lora-alpha", self.lora_alpha, self.lora_alpha > 0, "> 0"),
            ("lora-dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("log-every", self.log_every, self.log_every >= 1, ">= 1"),
            ("save-every", self.save_every, self.save_every >= 0, ">= 0 (0: only at the end)"),
            ("estimate-seq-len", self.estimate_seq_len, self.estimate_seq_len >= 0, ">= 0 (0: the store's longest)"),
        ]
        for flag, value, ok, rule in checks:
            if not ok:
                raise ValueError(f"--{flag} {value}: must be {rule}")
        for flag, value, allowed in (("optim", self.optim, ("adamw", "adamw8bit")),
                                     ("kd-mode", self.kd_mode, ("renorm", "tail")),
                                     ("kd-divergence", self.kd_divergence, ("forward", "reverse", "jsd"))):
            if value not in allowed:
                raise ValueError(f"--{flag} {value!r}: use one of {', '.join(allowed)}")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError("--load-in-4bit trains LoRA adapters on a 4-bit base: also pass --lora-r (e.g. 16)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Config file values, then explicit overrides (CLI flags the user actually set)."""
    values: dict = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of TrainConfig fields")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown}: valid keys are the TrainConfig fields "
            f"({', '.join(sorted(known))})"
        )
    return TrainConfig(**values)
