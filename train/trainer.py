"""The training recipe: one linear loop, read top to bottom.

setup (store, student, optimizer) -> stream groups -> collate -> student forward ->
objective loss -> accumulate -> step -> log / checkpoint. Resume restores model,
optimizer, scheduler, RNG and the reader position, so a stopped-and-resumed CPU run
ends bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.store import StreamReader, open_store

from .batch import collate
from .config import TrainConfig
from .objectives import OBJECTIVE_SPECS, select_records
from .student import base_causal_lm, load_student, student_forward

log = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"


@dataclass
class TrainResult:
    out: str
    steps: int
    tokens: int
    seconds: float  # training time of the whole run, summed over its resumed segments
    final_loss: float


def resolve_store(cfg: TrainConfig):
    """A store URL/path, or a content key looked up under cfg.store_root."""
    url = cfg.store
    if cfg.store_root and "/" not in url and "://" not in url:
        url = f"{cfg.store_root.rstrip('/')}/{url}"
    return open_store(url)


def _check_store(cfg: TrainConfig, store, tokenizer, head_rows: int) -> None:
    """Up front: the objective's fields are stored, and the student reads the same ids."""
    spec = OBJECTIVE_SPECS[cfg.objective]
    missing = [f for f in spec.fields if f not in store.fields]
    if missing:
        raise ValueError(
            f"objective {cfg.objective!r} needs stored fields {missing}, which store "
            f"{cfg.store!r} lacks: re-run `kdcache precompute` with a teacher"
            + (" and a --reference" if any(f.startswith("ref_") for f in missing) else "")
        )
    tok_meta = store.meta.tokenizer if isinstance(store.meta.tokenizer, dict) else {}
    store_vocab = tok_meta.get("vocab_size")
    if store_vocab is not None and int(store_vocab) != len(tokenizer):
        raise ValueError(
            f"teacher vocab {store_vocab} != student vocab {len(tokenizer)}: the store's ids "
            f"would mean other tokens to this student; use a student that shares the teachers' "
            f"tokenizer (same model family)"
        )
    if store_vocab is not None and int(store_vocab) > head_rows:
        raise ValueError(
            f"teacher vocab {store_vocab} > student output rows {head_rows}: the student's "
            f"lm_head cannot score every stored id; resize its embeddings or pick another student"
        )
    if cfg.objective == "tvkd" and not any(abs(b - cfg.tvkd_beta) < 1e-9 for b in store.meta.betas):
        raise ValueError(
            f"--tvkd-beta {cfg.tvkd_beta} is not among the store's soft-value betas "
            f"{list(store.meta.betas)}: pick one of those or precompute with --betas"
        )


# options that may change between a run and its resumption without changing what it computes
_RESUME_FREE = {"resume", "progress", "log_every", "save_every", "tensorboard"}


def _check_same_run(cfg: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume a run whose saved config differs: it would silently mix two runs."""
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k, now[k]) != now[k])
    if diff:
        raise ValueError(
            f"{cfg.out} holds a run with different settings ({', '.join(diff)}): "
            f"use a new --out, or --no-resume to start over"
        )


def _check_blocks(objective: str, block_ids: list[int]) -> None:
    blocks = OBJECTIVE_SPECS[objective].blocks
    for b, roles in enumerate(blocks):
        if b not in block_ids:
            raise ValueError(
                f"objective {objective!r} found no records of role {'/'.join(roles)} in a batch: "
                + ("it trains on rollouts: run `kdcache rollout`, then `kdcache precompute` on them"
                   if any("rollout" in r for r in roles) else
                   "the store needs groups with " + " and ".join("/".join(x) for x in blocks))
            )


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))

    return f


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optim == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("--optim adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim != "adamw":
        raise ValueError(f"unknown --optim {cfg.optim!r}: use adamw or adamw8bit")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, reader, step, tokens, cfg,
                    seconds: float = 0.0) -> Path:
    """HF-loadable weights + training state, written to a temp dir and renamed into place."""
    final = out / "last"
    tmp = out / f".last-tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "tokens": tokens,
        "seconds": seconds,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "reader": reader.state_dict(),
    }
    torch.save(state, tmp / STATE_FILE)
    cfg.save(tmp / "config.yaml")
    old = out / ".last-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def export_model(out: Path, model, tokenizer) -> Path:
    """The final student as a plain HF directory (LoRA merged), loadable with from_pretrained."""
    dest = out / "model"
    tmp = out / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def train(cfg: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Run cfg to completion (or `stop_after` optimizer steps, for resume tests)."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")  # the resolved config, saved with every run
    _set_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"

    store = resolve_store(cfg)
    resume_dir = out / "last"
    resuming = cfg.resume and (resume_dir / STATE_FILE).exists()
    if resuming:
        _check_same_run(cfg, resume_dir / "config.yaml")
    if resuming:
        model_cfg = TrainConfig(**{**cfg.to_dict(), "model": str(resume_dir)})
        model, tokenizer = _load_resumed(model_cfg, cfg, device)
    else:
        model, tokenizer = load_student(cfg, device)
    _check_store(cfg, store, tokenizer, base_causal_lm(model).get_output_embeddings().weight.shape[0])

    spec = OBJECTIVE_SPECS[cfg.objective]
    reader = StreamReader(store, fields=list(spec.fields), shuffle=True, seed=cfg.seed)
    n_groups = store.num_groups
    per_step = cfg.batch_groups * cfg.grad_accum
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n_groups / per_step))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total))
    step, tokens, prior_s = 0, 0, 0.0
    if resuming:
        state = torch.load(resume_dir / STATE_FILE, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        reader.load_state_dict(state["reader"])
        _set_rng_state(state["rng"])
        step, tokens, prior_s = state["step"], state["tokens"], float(state.get("seconds", 0.0))
        log.info("resumed %s at step %d", resume_dir, step)

    tb = _tensorboard(out) if cfg.tensorboard else None
    metrics_path = out / "metrics.jsonl"
    if not resuming and metrics_path.exists():
        metrics_path.unlink()
    model.train()
    groups = _group_stream(reader)
    t0, last_loss = time.perf_counter(), float("nan")
    progress = _progress(cfg, total, step)
    while step < total and (stop_after is None or step < stop_after):
        optimizer.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        step_tokens = 0
        for _ in range(cfg.grad_accum):
            records, block_ids = select_records(cfg.objective, [next(groups) for _ in range(cfg.batch_groups)])
            _check_blocks(cfg.objective, block_ids)
            batch = collate(records, pad_id=tokenizer.pad_token_id or 0, packed=cfg.packing)
            batch.block_ids, batch.betas = block_ids, tuple(store.meta.betas)
            batch = batch.to(device)
            # with checkpointing, autocast's cache of bf16 weight copies would outlive the
            # forward for nothing (the recompute casts again): keep it off then
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16,
                                cache_enabled=not cfg.grad_checkpointing):
                student = student_forward(model, batch, cfg.chunk_size)
            loss, metrics = spec.loss(student, batch, cfg, step)
            (loss / cfg.grad_accum).backward()
            step_tokens += batch.num_tokens
            for k, v in {"loss": loss.detach(), **metrics}.items():
                agg[k] = agg.get(k, 0.0) + float(v) / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            agg["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        step += 1
        tokens += step_tokens
        last_loss = agg["loss"]
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == total:
            row = {"step": step, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                   "tokens_per_s": tokens / max(elapsed, 1e-9), **agg}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if tb is not None:
                for k, v in row.items():
                    tb.add_scalar(f"train/{k}", v, step)
        if progress is not None:
            progress.update(1, loss=last_loss)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(out, model, tokenizer, optimizer, scheduler, reader, step, tokens, cfg,
                            prior_s + time.perf_counter() - t0)
    if progress is not None:
        progress.close()
    seconds = prior_s + time.perf_counter() - t0
    save_checkpoint(out, model, tokenizer, optimizer, scheduler, reader, step, tokens, cfg, seconds)
    if step >= total:
        export_model(out, model, tokenizer)
    return TrainResult(str(out), step, tokens, seconds, last_loss)


def _load_resumed(model_cfg: TrainConfig, cfg: TrainConfig, device):
    """Resume from out/last: full weights, or the base model plus the saved LoRA adapter."""
    if cfg.lora_r > 0:
        from peft import PeftModel

        base, tokenizer = load_student(TrainConfig(**{**cfg.to_dict(), "lora_r": 0}), device)
        if cfg.grad_checkpointing:
            base.enable_input_require_grads()
        model = PeftModel.from_pretrained(base, model_cfg.model, is_trainable=True)
        return model, tokenizer
    return load_student(model_cfg, device)


def _group_stream(reader):
    """Groups forever: epoch after epoch, the reader reshuffling from (seed, epoch)."""
    while True:
        produced = False
        for group in reader:
            produced = True
            yield group
        if not produced:
            raise ValueError("the store yielded no groups: it is empty or holds no committed shard")
        reader.set_epoch(reader.epoch + 1)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(out / "tb"))


def _progress(cfg: TrainConfig, total: int, start: int):
    if not cfg.progress:
        return None
    from .progress import StepProgress

    return StepProgress(total, start, desc=f"train {cfg.objective}")
