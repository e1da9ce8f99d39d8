"""Typed training config. YAML files mirror these fields one to one; CLI flags override."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .recipe import RECIPE_HELP, with_recipe

OBJECTIVES = ("sft", "seqkd", "kd", "dckd", "adpa", "tvkd", "dpo", "tgpo", "pbsd")


@dataclass
class TrainConfig:
    model: str = ""  # student: local HF dir (or hub id)
    store: str = ""  # store URL, path or content key under store_root
    out: str = "runs/student"
    objective: str = "sft"
    # a paper's published setting (train/recipes/NAME.yaml); its values sit below --config and flags
    recipe: str = field(default="", metadata={"help": RECIPE_HELP})
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
    grad_checkpointing: bool = False
    bf16: bool | None = None  # None: on when CUDA is available
    # weights: fp32 | bf16 | auto (bf16 for a frozen LoRA base under bf16, else fp32: plain
    # AdamW on bf16 weights rounds small updates away, so full fine-tunes keep fp32 masters)
    weights_dtype: str = "auto"
    lora_r: int = 0  # 0: full fine-tune
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    load_in_4bit: bool = False  # QLoRA, needs bitsandbytes + CUDA

    # objectives (METHODS.md §2)
    kd_mode: str = "renorm"  # renorm | tail
    kd_divergence: str = "forward"  # forward | reverse | jsd
    # A method's released-code variant (the authors' public trainer, METHODS §2) has its own
    # weights; None = the published default of the variant in use (docs/LOSSES.md).
    dckd_alpha: float | None = None  # Eq. 7's α (paper form); None: 0.2
    dckd_reference_code: bool = False  # released-code DCKD: (K+1)-bucket KL, clamps, token means
    dckd_sft_weight: float | None = None  # released-code DCKD's SFT weight; None: 1
    dckd_chosen_weight: float | None = None  # released-code DCKD's KL weight on y_w; None: 0.1 (1 × 0.1)
    dckd_rejected_weight: float | None = None  # released-code DCKD's KL weight on y_l; None: 0.1
    adpa_gamma: float | None = None  # Eq. 10's γ (paper form); None: 3.0
    adpa_reference_code: bool = False  # released-code ADPA: probabilities and advantages clamped to [1e-8, 1-1e-8], token means
    adpa_weight: float | None = None  # released-code ADPA's advantage weight w; None: 1.6
    tvkd_alpha: float = 0.7
    tvkd_beta: float = 2.0  # which stored soft-value β to use
    tvkd_beta_s: float = 1.0
    tvkd_gamma: float = 1.0  # discount in the shaping ψ = γ·V(s_{t+1}) − V(s_t); 1 is the paper's
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
        if self.batch_groups < 1 or self.grad_accum < 1:
            raise ValueError("--batch-groups and --grad-accum must be >= 1")
        check_variant_weights(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# For each method with a released-code variant: (switch, the paper form's weights, the
# released variant's weights). A weight of the variant not in use would be silently ignored.
VARIANT_WEIGHTS = (
    ("adpa_reference_code", ("adpa_gamma",), ("adpa_weight",)),
    ("dckd_reference_code", ("dckd_alpha",), ("dckd_sft_weight", "dckd_chosen_weight", "dckd_rejected_weight")),
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


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Layers, lowest first: the recipe (named by the file or a flag), the config file, then
    explicit overrides (CLI flags the user actually set)."""
    values: dict = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of TrainConfig fields")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = with_recipe(values)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown}: valid keys are the TrainConfig fields "
            f"({', '.join(sorted(known))})"
        )
    return TrainConfig(**values)
