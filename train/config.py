"""Typed training config. YAML files mirror these fields one to one; CLI flags override.

A `TrainConfig` is frozen: built once (from flags, a config file and a recipe, or in Python),
checked once where a run enters (`validated()`, called by `train()`, the memory estimate's
entry and nothing below them), then only read. A step that resolves a setting at run time
(the store's β, auto-fit's micro-batch split) makes a new copy with `dataclasses.replace`.
Components that need a few settings get a slice (`optim_settings`, `schedule_settings`), so
their signatures say what they read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from .recipe import RECIPE_HELP

log = logging.getLogger(__name__)

OBJECTIVES = ("sft", "seqkd", "kd", "dckd", "adpa", "tvkd", "dpo", "tgpo", "pbsd")


def renamed(values: dict, renames: dict[str, str], where: str | None = None, *, flags: bool = False) -> dict:
    """`values` with each old key of `renames` under its new name, and a one-line note on
    stderr for each (where it was read: `where`, or as command-line `flags`; neither: none)."""
    values = dict(values)
    name = (lambda k: "--" + k.replace("_", "-")) if flags else (lambda k: k)
    at = "" if flags or where is None else f"{where}: "
    for old, new in renames.items():
        if old not in values:
            continue
        if new in values:
            raise ValueError(f"{at}both {name(old)} and {name(new)} are given: {name(old)} is the old "
                             f"name of {name(new)}; keep only {name(new)}")
        values[new] = values.pop(old)
        if flags or where is not None:
            log.warning("note: %s%s is deprecated: use %s (the same option)", at, name(old), name(new))
    return values


def _init_takes_old_names(cls: type) -> type:
    """`TrainConfig(dckd_reference_code=True)`, as Python code wrote it before the rename,
    still builds (with the note); the dataclass's own __init__ does the rest."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        init(self, *args, **renamed(kwargs, cls.RENAMED, cls.__name__))

    cls.__init__ = __init__
    return cls


@dataclass(frozen=True)
class OptimSettings:
    """What `make_optimizer` reads (train/optim.py): `TrainConfig.optim_settings`."""

    optim: str
    lr: float
    weight_decay: float
    optim_states: str
    stochastic_rounding: bool


@dataclass(frozen=True)
class ScheduleSettings:
    """What `make_scheduler` reads, the learning-rate factor over the run's steps:
    `TrainConfig.schedule_settings`."""

    lr_schedule: str
    warmup_steps: int
    warmup_ratio: float


@_init_takes_old_names
@dataclass(frozen=True)
class TrainConfig:
    """Every field is a `kdcache train --flag` and a key of its YAML config. `metadata`
    holds the flag's one-line help, its help panel and, where the values are a fixed set,
    its choices (tests/test_cli.py checks that every field has help)."""

    # Options renamed since they first shipped, old name -> new. The old name still works as
    # a flag (hidden from --help), a key of a config file or recipe and a keyword of
    # TrainConfig(...), with a one-line note on stderr (`renamed`), and in the config.yaml a
    # run directory saved (no note: its next checkpoint saves the new name).
    RENAMED: ClassVar[dict[str, str]] = {
        "dckd_reference_code": "dckd_released_code",  # "reference" is the reference model elsewhere
        "adpa_reference_code": "adpa_released_code",
    }

    model: str = field(default="", metadata={
        "help": "student to train: a local HF model directory (or a cached hub id)", "panel": "Essentials"})
    # one store, or several (METHODS §4): a mixture, or with --ensemble one teacher each
    store: list[str] = field(default_factory=list, metadata={
        "help": "teacher-signal store(s): URL, path, or content key under --store-root (from `kdcache "
                "precompute`); repeat the flag (or comma-separate) to mix stores, or to ensemble with --ensemble",
        "panel": "Essentials", "multiple": True})
    store_weights: list[float] = field(default_factory=list, metadata={
        "help": "one weight per --store, normalised to sum 1; unset: mixing weighs each store by its groups, "
                "--ensemble weighs the teachers equally", "panel": "Essentials"})
    ensemble: bool = field(default=False, metadata={
        "help": "the --store stores score the SAME examples with different teachers: one student forward, "
                "the weighted sum of the per-teacher terms (kd, dckd, adpa, tvkd); off: the stores are mixed",
        "panel": "Essentials"})
    out: str = field(default="runs/student", metadata={
        "help": "run directory: checkpoints, metrics.jsonl, config.yaml and the final model/ (a plain HF model; "
                "LoRA adapters merged into its weights)", "panel": "Essentials"})
    objective: str = field(default="sft", metadata={
        "help": "loss to train with (docs/LOSSES.md)", "panel": "Essentials", "choices": OBJECTIVES})
    # a paper's published setting (train/recipes/NAME.yaml); its values sit below --config and flags
    recipe: str = field(default="", metadata={"help": RECIPE_HELP, "panel": "Essentials"})
    store_root: str = field(default="", metadata={
        "help": "directory or URL where a bare --store content key is looked up", "panel": "Run"})

    # optimisation
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (linear warm-up, then linear decay to 0)", "panel": "Optimisation"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "panel": "Optimisation"})
    lr_schedule: str = field(default="linear", metadata={
        "help": "learning rate after the warm-up: linear or cosine decay to 0 at the last step, or constant",
        "panel": "Optimisation", "choices": ("linear", "cosine", "constant")})
    warmup_steps: int = field(default=0, metadata={"help": "optimizer steps of linear learning-rate warm-up", "panel": "Optimisation"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "warm-up as a fraction of the run's steps (instead of --warmup-steps), in [0, 1)",
        "panel": "Optimisation"})
    max_steps: int = field(default=0, metadata={
        "help": "optimizer steps to run; 0 runs --epochs epochs instead", "panel": "Essentials"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the store when --max-steps is 0 (fractions allowed)", "panel": "Optimisation"})
    batch_groups: int = field(default=8, metadata={
        "help": "example groups (a pair, or G rollouts) per micro-batch", "panel": "Optimisation"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "panel": "Optimisation"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping; 0 turns it off", "panel": "Optimisation"})
    optim: str = field(default="adamw", metadata={
        "help": "optimizer; adamw8bit: torchao's 8-bit AdamW (pip install 'kdcache[gpu]')", "panel": "Optimisation",
        "choices": ("adamw", "adamw8bit")})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout", "panel": "Optimisation"})

    # memory
    chunk_size: int = field(default=1024, metadata={
        "help": "positions per lm_head chunk in the loss: full-vocabulary logits exist for one chunk at a time",
        "panel": "Memory"})
    packing: bool = field(default=False, metadata={
        "help": "pack a micro-batch into one row without padding (best with flash_attention_2)", "panel": "Memory"})
    grad_checkpointing: bool | None = field(default=None, metadata={
        "help": "recompute activations in the backward pass: less memory, ~30% more time; unset: auto (on "
                "CUDA the fit check turns it on when the step needs it, else off)", "panel": "Memory"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast; unset: on when CUDA is available", "panel": "Memory"})
    # weights: fp32 | bf16 | auto (bf16 whenever bf16 autocast is on, i.e. on CUDA: full
    # fine-tunes then keep fp32 AdamW moments and round each update stochastically, train/optim.py)
    weights_dtype: str = field(default="auto", metadata={
        "help": "dtype of the weights; auto: bf16 whenever bf16 autocast is on (CUDA), else fp32",
        "panel": "Memory", "choices": ("auto", "fp32", "bf16")})
    optim_states: str = field(default="auto", metadata={
        "help": "AdamW moments' dtype; auto: fp32 (bf16: 4 B/param less; adamw8bit: 1 byte)",
        "panel": "Memory", "choices": ("auto", "fp32", "bf16")})
    stochastic_rounding: bool = field(default=True, metadata={
        "help": "bf16 weights: round each update stochastically (off: round-to-nearest loses small updates)",
        "panel": "Memory"})
    fit_check: bool = field(default=True, metadata={
        "help": "CUDA: estimate the step's memory before loading weights; refuse, naming the switch to use, "
                "if it cannot fit", "panel": "Memory estimate"})
    auto_fit: bool = field(default=True, metadata={
        "help": "CUDA: when the step does not fit, run it as smaller micro-batches with more --grad-accum (the "
                "same optimizer step) and say so; off: refuse instead", "panel": "Memory estimate"})
    estimate_memory: bool = field(default=False, metadata={
        "help": "print the simulated GPU memory of one training step (loads no weights) and exit",
        "panel": "Memory estimate"})
    gpu_memory: str = field(default="", metadata={
        "help": "card size for the estimate and the fit check, e.g. 24GiB; \"\": the CUDA device's free "
                "memory, else 24GiB", "panel": "Memory estimate"})
    require_fit: bool = field(default=False, metadata={
        "help": "with --estimate-memory: exit 1 when the step does not fit (for scripts)",
        "panel": "Memory estimate"})
    estimate_seq_len: int = field(default=0, metadata={
        "help": "tokens per sequence the estimate assumes; 0: the store's longest record",
        "panel": "Memory estimate"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight (full fine-tune)", "panel": "Memory"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha", "panel": "Memory"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)", "panel": "Memory"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={
        "help": "module names LoRA adapts, comma-separated", "panel": "Memory"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: 4-bit base weights (needs --lora-r, bitsandbytes and CUDA)", "panel": "Memory"})

    # objectives (METHODS.md §2)
    kd_mode: str = field(default="renorm", metadata={
        "help": "kd/dckd: renormalise both over the teacher's top-K, or add the rest as a (K+1)-th bucket",
        "panel": "Objective: KD / DCKD", "choices": ("renorm", "tail")})
    cross_tokenizer: str = field(default="off", metadata={
        "help": "a student with another tokenizer than the store's (METHODS §5): map = KD on the "
                "byte-string vocabulary map at aligned positions (tail mode), uld = sorted-probability "
                "distance, no map; off refuses a tokenizer mismatch",
        "panel": "Objective: KD / DCKD", "choices": ("off", "map", "uld")})
    kd_divergence: str = field(default="forward", metadata={
        "help": "kd/dckd: divergence between teacher and student on the top-K", "panel": "Objective: KD / DCKD",
        "choices": ("forward", "reverse", "jsd")})
    # A method's released-code variant (the authors' public trainer, METHODS §2) has its own
    # weights; None = the published default of the variant in use (docs/LOSSES.md).
    dckd_alpha: float | None = field(default=None, metadata={
        "help": "dckd (paper form): weight alpha of the top-K KD terms on y_w and y_l (Eq. 7); unset: 0.2",
        "panel": "Objective: KD / DCKD"})
    dckd_released_code: bool = field(default=False, metadata={
        "help": "dckd: the authors' released code ((K+1)-bucket KL, clamps, token means) instead of Eq. 7",
        "panel": "Objective: KD / DCKD"})
    dckd_sft_weight: float | None = field(default=None, metadata={
        "help": "dckd (released code): weight of the SFT term; unset: 1", "panel": "Objective: KD / DCKD"})
    dckd_chosen_weight: float | None = field(default=None, metadata={
        "help": "dckd (released code): weight of the KL on y_w; unset: 0.1", "panel": "Objective: KD / DCKD"})
    dckd_rejected_weight: float | None = field(default=None, metadata={
        "help": "dckd (released code): weight of the KL on y_l; unset: 0.1", "panel": "Objective: KD / DCKD"})
    adpa_gamma: float | None = field(default=None, metadata={
        "help": "adpa (paper form): gamma, weight of the advantage term of Eq. 10; unset: 3.0", "panel": "Objective: ADPA"})
    adpa_released_code: bool = field(default=False, metadata={
        "help": "adpa: the authors' released code instead of Eq. 10 (probabilities and advantages clamped "
                "to [1e-8, 1-1e-8], token means)", "panel": "Objective: ADPA"})
    adpa_weight: float | None = field(default=None, metadata={
        "help": "adpa (released code): weight w of the advantage term; unset: 1.6", "panel": "Objective: ADPA"})
    tvkd_alpha: float = field(default=0.7, metadata={
        "help": "tvkd: weight alpha of the teacher's value shaping psi in the token reward", "panel": "Objective: TVKD"})
    tvkd_beta: float | None = field(default=None, metadata={
        "help": "tvkd: which stored soft-value beta to use (one of the store's --betas); unset: the store's beta "
                "when it holds one (the paper's best, 2, is in --recipe tvkd)", "panel": "Objective: TVKD"})
    tvkd_beta_s: float = field(default=1.0, metadata={
        "help": "tvkd: beta_s, the weight of the student's log-prob in the token reward", "panel": "Objective: TVKD"})
    tvkd_gamma: float = field(default=1.0, metadata={
        "help": "tvkd: discount gamma in the shaping psi = gamma*V(s_t+1) - V(s_t); 1 is the paper's",
        "panel": "Objective: TVKD"})
    tvkd_maxent: bool = field(default=False, metadata={
        "help": "tvkd: MaxEnt form (Eq. 12), beta_s*(log pi_theta - log pi_ref); needs ref fields", "panel": "Objective: TVKD"})
    dpo_beta: float = field(default=0.1, metadata={
        "help": "dpo: beta of the sequence log-ratio margin", "panel": "Objective: DPO / PBSD"})
    dpo_nll: float = field(default=0.0, metadata={
        "help": "dpo: weight w of an added w*NLL(y_w)/|y_w| (RPO); keeps DPO from only pushing y_l down",
        "panel": "Objective: DPO / PBSD"})
    pbsd_beta: float = field(default=0.1, metadata={
        "help": "pbsd: beta of the self-distillation margin", "panel": "Objective: DPO / PBSD"})
    tgpo_w_init: float = field(default=2e-3, metadata={
        "help": "tgpo: w_init of the guidance weight w = max(w_init - delta*step, 0)", "panel": "Objective: TGPO"})
    tgpo_delta: float = field(default=1e-5, metadata={
        "help": "tgpo: delta, the guidance weight's decrease per optimizer step", "panel": "Objective: TGPO"})
    tgpo_clip: float = field(default=0.2, metadata={
        "help": "tgpo: PPO clip range of the importance ratio", "panel": "Objective: TGPO"})
    tgpo_shaping: bool = field(default=False, metadata={
        "help": "tgpo: TGPO_R, reward shaping instead of the guidance loss", "panel": "Objective: TGPO"})
    tgpo_lambda: float = field(default=0.1, metadata={
        "help": "tgpo: lambda of the shaped advantage A + lambda*log pi_theta(teacher token)", "panel": "Objective: TGPO"})
    tgpo_step_offset: int = field(default=0, metadata={
        "help": "tgpo: global step this run starts at (offline rounds continue the guidance schedule)",
        "panel": "Objective: TGPO"})

    # bookkeeping
    log_every: int = field(default=10, metadata={"help": "optimizer steps per metrics.jsonl row", "panel": "Run"})
    save_every: int = field(default=0, metadata={"help": "optimizer steps per checkpoint; 0: only at the end", "panel": "Run"})
    resume: bool = field(default=True, metadata={
        "help": "continue from the run directory's last checkpoint (a finished run is not re-run)", "panel": "Run"})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "trackers that get metrics.jsonl's rows, the resolved config and the store's key and "
                "provenance, comma-separated: none, tensorboard (<out>/tb), wandb (pip install wandb)",
        "panel": "Run"})
    run_name: str | None = field(default=None, metadata={
        "help": "the run's name in the trackers; unset: the --out directory's name", "panel": "Run"})
    wandb_project: str | None = field(default=None, metadata={
        "help": "W&B project; unset: $WANDB_PROJECT, else kdcache", "panel": "Run"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr (only on a terminal)", "panel": "Run"})

    # distributed: torchrun / srun (docs/DISTRIBUTED.md)
    world_size: int = field(default=0, metadata={
        "help": "processes; 0: the launcher's WORLD_SIZE (torchrun). Saved resolved: a resume needs the same",
        "panel": "Distributed"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard params, grads and optimizer state per decoder layer (FSDP2) instead of DDP",
        "panel": "Distributed"})
    dist_timeout_s: int = field(default=1800, metadata={
        "help": "seconds a collective may wait before the job fails (a lost or hung rank)", "panel": "Distributed"})

    def __post_init__(self) -> None:
        # normalised as it is built (so every dataclasses.replace copy is too): one store given
        # as a string is a list of one, and the list fields are this config's own copies
        if isinstance(self.store, str):
            object.__setattr__(self, "store", [self.store] if self.store else [])
        for name in ("store", "store_weights", "lora_targets", "report_to"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, name, list(value))

    @property
    def optim_settings(self) -> OptimSettings:
        return OptimSettings(optim=self.optim, lr=self.lr, weight_decay=self.weight_decay,
                             optim_states=self.optim_states, stochastic_rounding=self.stochastic_rounding)

    @property
    def schedule_settings(self) -> ScheduleSettings:
        return ScheduleSettings(lr_schedule=self.lr_schedule, warmup_steps=self.warmup_steps,
                                warmup_ratio=self.warmup_ratio)

    def validated(self, *, need_store: bool = True) -> TrainConfig:
        """The config a run reads, checked: one clear error for anything wrong, else this
        (frozen, normalised) config. Called once, where a run enters: `train()` and the memory
        estimate (`need_store=False`: the store only sets its shape)."""
        for f in dataclasses.fields(self):  # every option with a fixed set of values
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: "
                                 f"use one of {', '.join(allowed)}")
        if not self.model:
            raise ValueError("no student model: pass --model DIR (a local HF directory)")
        if need_store and not self.store:
            raise ValueError("no store: pass --store URL (from `kdcache precompute`)")
        check_stores(self)
        if self.batch_groups < 1 or self.grad_accum < 1:
            raise ValueError("--batch-groups and --grad-accum must be >= 1")
        checks = [
            ("max-steps", self.max_steps, self.max_steps >= 0, ">= 0 (0: run --epochs epochs)"),
            ("epochs", self.epochs, self.epochs > 0, "> 0 (or set --max-steps)"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("warmup-steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
            ("warmup-ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "in [0, 1)"),
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
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("--warmup-steps and --warmup-ratio both set: give the warm-up one way")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError("--load-in-4bit trains LoRA adapters on a 4-bit base: also pass --lora-r (e.g. 16)")
        check_variant_weights(self)
        check_cross_tokenizer(self)
        from .report import check_available, parse_report_to

        check_available(parse_report_to(self.report_to))  # one line naming what to install
        return self

    @classmethod
    def upgrade_keys(cls, values: dict, where: str | None = None, *, flags: bool = False) -> dict:
        """A config's keys from older versions, in today's names: `RENAMED` options (`renamed`:
        a note on stderr saying where they were read, e.g. `--config c.yaml`, or as `flags`;
        neither: no note, for the config.yaml a run saved itself), and `tensorboard: true`,
        written before --report-to, as `report_to: [tensorboard]`."""
        values = renamed(values, cls.RENAMED, where, flags=flags)
        if values.get("tensorboard") is not None:
            if values.pop("tensorboard") and "report_to" not in values:
                values["report_to"] = ["tensorboard"]
        else:
            values.pop("tensorboard", None)
        return values

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# For each method with a released-code variant: (switch, the paper form's weights, the
# released variant's weights). A weight of the variant not in use would be silently ignored.
VARIANT_WEIGHTS = (
    ("adpa_released_code", ("adpa_gamma",), ("adpa_weight",)),
    ("dckd_released_code", ("dckd_alpha",), ("dckd_sft_weight", "dckd_chosen_weight", "dckd_rejected_weight")),
)


def check_variant_weights(cfg: TrainConfig) -> None:
    for switch, paper, released in VARIANT_WEIGHTS:
        on = getattr(cfg, switch)
        unused = [n for n in (paper if on else released) if getattr(cfg, n) is not None]
        if unused:
            flag = "--" + switch.replace("_", "-")
            use = ", ".join(released if on else paper)
            raise ValueError(
                f"{unused[0]} is a weight of the {'paper form' if on else 'released-code variant'}, "
                f"not used {'with' if on else 'without'} {flag}: set {use} instead"
                + ("" if on else f", or add {flag}")
            )


def check_cross_tokenizer(cfg: TrainConfig) -> None:
    """What --cross-tokenizer can combine with (METHODS §5; the rest is checked in
    train/xtok/setup.py once the store and the student are known)."""
    if cfg.cross_tokenizer == "off":
        return
    if cfg.objective in ("kd", "dckd") and cfg.cross_tokenizer == "map" and cfg.kd_mode != "tail":
        raise ValueError("--cross-tokenizer map distils in tail mode (the unmapped teacher mass is "
                         "the tail bucket, METHODS §5): add --kd-mode tail")
    if cfg.cross_tokenizer == "uld" and cfg.objective == "adpa":
        raise ValueError("--cross-tokenizer uld has no vocabulary map, and adpa's advantages are "
                         "per teacher id: use --cross-tokenizer map with --objective adpa")
    if cfg.dckd_released_code:
        raise ValueError("--dckd-released-code is not offered with --cross-tokenizer: use the "
                         "paper form (--dckd-alpha)")


# objectives whose teacher terms an ensemble weighs (METHODS §4); the others are refused
ENSEMBLE_OBJECTIVES = ("kd", "dckd", "adpa", "tvkd")


def check_stores(cfg: TrainConfig) -> None:
    """Several stores (METHODS §4): weights match and make sense; an ensemble has a teacher term."""
    n = max(1, len(cfg.store))  # none: a memory estimate without --store assumes one
    if cfg.store_weights and len(cfg.store_weights) != n:
        raise ValueError(f"--store-weights has {len(cfg.store_weights)} weights for {n} --store: give one "
                         f"weight per store, in the order of the --store flags")
    if any(not w >= 0 for w in cfg.store_weights) or (cfg.store_weights and sum(cfg.store_weights) <= 0):
        raise ValueError(f"--store-weights {','.join(map(str, cfg.store_weights))}: weights must be >= 0 "
                         f"with a positive sum (they are normalised to sum 1)")
    if n > 1 and cfg.cross_tokenizer != "off":
        raise ValueError("--cross-tokenizer with several --store is not supported yet: train from one store, "
                         "or use stores scored with the student's tokenizer")
    if cfg.ensemble and n < 2:
        raise ValueError("--ensemble needs at least two --store (one per teacher, over the same examples)")
    if cfg.ensemble and cfg.objective not in ENSEMBLE_OBJECTIVES:
        why = ("one reference per pair is the point of this loss" if cfg.objective in ("dpo", "pbsd")
               else "it has no per-teacher term to weigh")
        raise ValueError(f"--ensemble with objective {cfg.objective!r}: {why}; ensemble "
                         f"{', '.join(ENSEMBLE_OBJECTIVES)}, or mix the stores (drop --ensemble)")


def store_weights(cfg: TrainConfig, sizes: list[int]) -> tuple[float, ...]:
    """Normalised weights, one per store (sizes: each store's groups, for the mixing default)."""
    if cfg.store_weights:
        raw = [float(w) for w in cfg.store_weights]
    elif cfg.ensemble:
        raw = [1.0] * len(cfg.store)
    else:
        raw = [float(n) for n in sizes]
    total = sum(raw)
    return tuple(w / total for w in raw) if total > 0 else tuple(1.0 / len(raw) for _ in raw)
