"""Checkpoints and the exported model.

`out/last/` holds HF-loadable weights (or the LoRA adapter), the tokenizer, the run's config
and `training_state.pt` (optimizer, scheduler, RNG, reader position, step, tokens, seconds).
It is written to a temporary directory and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the new one. `out/model/` is the final student as
a plain HF directory (LoRA merged).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig

STATE_FILE = "training_state.pt"
LAST, MODEL = "last", "model"

# options that may change between a run and its resumption without changing what it computes
RESUME_FREE = {"resume", "progress", "log_every", "save_every", "tensorboard",
               "fit_check", "estimate_memory", "gpu_memory", "require_fit", "estimate_seq_len"}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_checkpoint(out: Path) -> bool:
    return (out / LAST / STATE_FILE).exists()


def check_same_run(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a run whose saved config differs: it would silently mix two runs."""
    import yaml

    saved = yaml.safe_load((out / LAST / "config.yaml").read_text()) or {}
    now = cfg.to_dict()
    # an option left on auto (None) matches whatever the first run resolved it to
    diff = sorted(k for k in now if k not in RESUME_FREE and now[k] is not None
                  and saved.get(k, now[k]) != now[k])
    if diff:
        raise ValueError(
            f"{cfg.out} holds a run with different settings ({', '.join(diff)}): "
            f"use a new --out, or --no-resume to start over"
        )


def load_state(out: Path) -> dict:
    """The saved training state (tensors and plain containers only: no pickled objects)."""
    return torch.load(out / LAST / STATE_FILE, weights_only=True, map_location="cpu")


def save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, reader, step: int,
                    tokens: int, cfg: TrainConfig, seconds: float = 0.0,
                    loss: float = float("nan")) -> Path:
    """HF-loadable weights + training state, written to a temp dir and renamed into place."""
    final = out / LAST
    tmp = out / f".last-tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "tokens": tokens,
        "seconds": seconds,
        "loss": loss,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
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
    dest = out / MODEL
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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the log rows after `step` (written between the checkpoint and a kill), so a
    resumed run's metrics.jsonl has each step once. Atomic: temp file, then rename."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
