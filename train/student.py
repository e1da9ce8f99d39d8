"""Loading the student (full fine-tune or LoRA) and its memory-light forward.

The forward stops at the final hidden states; `gather_logprobs` then projects only the
response rows through lm_head, one chunk at a time, so full-vocab logits for the whole
batch never exist (forward or backward). Training calls it one way, as the module
`StudentForward(model, chunk_size)(batch)`, which DDP/FSDP wrap in distributed runs.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .batch import SeqBatch, scatter_rows
from .chunked import gather_logprobs
from .config import TrainConfig
from .xtok.student_topk import student_topk_ids


@dataclass
class StudentOut:
    token_logprobs: torch.Tensor  # [S, T] log π_θ(y_t|s_t)
    topk_logprobs: torch.Tensor | None  # [S, T, K] log π_θ(topk_ids|s_t), full-vocab normalised
    own_topk_logprobs: torch.Tensor | None = None  # [S, T, K'] the student's K' largest (ULD)


def weights_dtype(cfg: TrainConfig, device: torch.device | str) -> torch.dtype:
    """bf16 when asked, or under "auto" whenever the forward runs in bf16 anyway (CUDA by
    default): a frozen LoRA base loses nothing, and a full fine-tune keeps its small updates
    through the optimizer's fp32 moments and stochastic rounding (optim.py). Under FSDP "auto"
    keeps fp32: the shards are the fp32 masters and FSDP's mixed-precision policy gathers
    them in bf16 for the forward (train/distributed.py)."""
    bf16 = cfg.bf16 if cfg.bf16 is not None else torch.device(device).type == "cuda"
    auto_bf16 = bf16 and not cfg.load_in_4bit and not cfg.fsdp
    if cfg.weights_dtype == "bf16" or (cfg.weights_dtype == "auto" and auto_bf16):
        return torch.bfloat16
    return torch.float32


def load_student(cfg: TrainConfig, device: torch.device):
    """The student model (LoRA-wrapped when cfg.lora_r > 0) and its tokenizer."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load the student tokenizer from {cfg.model!r}: {e.__class__.__name__}: "
            f"pass --model a local HF model directory"
        ) from e
    kwargs: dict = {"trust_remote_code": False, "dtype": weights_dtype(cfg, device)}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except (pickle.UnpicklingError, EOFError) as e:  # transformers loads *.bin weights_only
        raise ValueError(
            f"cannot load the student weights from {cfg.model!r} ({type(e).__name__}: "
            f"{str(e).split('. ')[0][:120]}): a weights file is damaged or holds code, which is "
            f"never run; pass a model directory with model.safetensors") from None
    if not cfg.load_in_4bit:
        model.to(device)
    return prepare_student(model, cfg), tokenizer


def prepare_student(model, cfg: TrainConfig):
    """Gradient checkpointing and LoRA wiring of a loaded model; the memory estimate applies
    it to its fake-tensor model, so both train the same modules."""
    if cfg.grad_checkpointing:
        # transformers 5 renamed the switch; 4.x only has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.load_in_4bit:
            model = prepare_model_for_kbit_training(model, cfg.grad_checkpointing)
        elif cfg.grad_checkpointing:
            model.enable_input_require_grads()
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def base_causal_lm(model):
    """The underlying *ForCausalLM, through a peft wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def student_forward(model, batch: SeqBatch, chunk_size: int) -> StudentOut:
    """Student log-probs at the response tokens and at the stored teacher top-K ids,
    normalised over the ids the teachers scored (`batch.vocab`; all head rows if unset)."""
    lm = base_causal_lm(model)
    decoder = lm.get_decoder()
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids, use_cache=False,
    ).last_hidden_state
    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if batch.vocab is not None and batch.vocab < weight.shape[0]:  # padded rows: no token
        weight, bias = weight[: batch.vocab], None if bias is None else bias[: batch.vocab]
    rows_h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.rows)
    index, own = batch.index, batch.own_topk
    if own:  # ULD: the student's own top ids, found chunk by chunk without gradient
        index = torch.cat([index, student_topk_ids(rows_h, weight, bias, own, chunk_size)], dim=1)
    gathered = gather_logprobs(rows_h, weight, index, chunk_size=chunk_size, bias=bias)
    gathered = scatter_rows(gathered, batch.mask, batch.mask_pos)  # [S, T, M]
    own_lp = gathered[..., -own:] if own else None
    gathered = gathered[..., : gathered.shape[-1] - own]
    topk = gathered[..., 1:] if gathered.shape[-1] > 1 else None
    return StudentOut(token_logprobs=gathered[..., 0], topk_logprobs=topk, own_topk_logprobs=own_lp)


class StudentForward(torch.nn.Module):
    """`student_forward` as a module taking a batch: what `train_step` calls.

    DDP and FSDP only see a step through their own module's __call__ (that is where DDP
    prepares the gradient all-reduce and FSDP gathers the root's parameters and registers
    their reduce-scatter), so the student is called with the batch itself, wrapped or not
    (train/distributed.py: `wrap`). It adds no parameters: its state-dict keys are the
    model's under a `model.` prefix (`KEY_PREFIX`: what an FSDP export strips)."""

    KEY_PREFIX = "model."  # the attribute name below, as it appears in state-dict keys

    def __init__(self, model: torch.nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: SeqBatch) -> StudentOut:
        return student_forward(self.model, batch, self.chunk_size)
