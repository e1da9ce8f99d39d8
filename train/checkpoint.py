"""Checkpoints and the exported model.

`out/last/` holds HF-loadable weights (or the LoRA adapter), the tokenizer, the run's config
and `training_state.pt` (optimizer, scheduler, RNG, reader position, step, tokens, seconds).
The reader position is the StreamReader's `{epoch, seed, consumed}` for one store; for
several (train/teachers.py) it is `{seed, stores: [one reader position per --store]}`, plus
the mixture sampler's `draws` (how many groups it has drawn: its whole state).
It is written to a temporary directory and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the new one. `out/model/` is the final student as
a plain HF directory (LoRA merged).

Distributed runs (train/distributed.py): rank 0 writes; `training_state.pt` also holds
`world_size` and `ranks` (every rank's reader position and RNG state, gathered). Under
--fsdp the weights and optimizer state are sharded: every rank writes its shards with
torch.distributed.checkpoint into `last/dcp/` (no HF weights in `last/`), and the final
`out/model/` is gathered to rank 0 and written as HF safetensors.

A checkpoint folder is untrusted input (it may have been copied from elsewhere): nothing in
it is unpickled with plain pickle. `training_state.pt` and every byte item of `last/dcp/` are
read with `torch.load(weights_only=True)`; `last/dcp/.metadata` (which torch reads with plain
`pickle.load`) with an unpickler that admits only the checkpoint metadata classes
(`SafeDCPReader`), and the data files it names must be plain files inside `last/dcp/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import shutil
import stat
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .distributed import Dist, barrier
from .student import StudentForward

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
LAST, MODEL = "last", "model"

# options that may change between a run and its resumption without changing what it computes
RESUME_FREE = {"resume", "progress", "log_every", "save_every", "report_to", "run_name", "wandb_project", "dist_timeout_s",
               "fit_check", "auto_fit", "estimate_memory", "gpu_memory", "require_fit", "estimate_seq_len"}
# options left unset (None: auto) that the run resolves at start; a resume that leaves them
# unset matches whatever the first run resolved them to
RESOLVED_AT_START = {"grad_checkpointing", "tvkd_beta"}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(d: Dist, seed: int) -> None:
    """Give ranks > 0 their own RNG stream (dropout must differ across ranks); rank 0 keeps
    the single-process stream. Called after the model is built: DDP copies rank 0's weights."""
    if d.rank == 0:
        return
    set_seed(int(np.random.SeedSequence([seed, d.rank]).generate_state(1)[0]))


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


def check_same_run(cfg: TrainConfig, out: Path) -> TrainConfig:
    """Refuse to resume a run whose saved config differs: it would silently mix two runs.
    Returns cfg, with the saved micro-batch split when only the split differs and the
    optimizer step is the same (on CUDA the fit check may have split the step: auto-fit), so
    the run goes on exactly as it ran."""
    import yaml

    from kdcache import plainyaml

    path = out / LAST / "config.yaml"
    _regular_file(path)
    try:
        saved = plainyaml.load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, _short(e)) from None
    if not isinstance(saved, dict):
        raise _damaged(path, f"a YAML {type(saved).__name__}, not a mapping of options")
    if isinstance(saved.get("store"), str):  # saved before --store could be given several times
        saved["store"] = [saved["store"]] if saved["store"] else []
    try:  # options renamed since (dckd_reference_code: dckd_released_code), compared by today's names
        saved = TrainConfig.upgrade_keys(saved)
    except ValueError as e:
        raise _damaged(path, str(e)) from None
    now = cfg.to_dict()
    ws = int(saved.get("world_size") or 1)  # runs saved before world_size existed had one process
    if now.get("world_size") and ws != now["world_size"]:
        # which shards a rank reads depends on the world size: the order cannot continue
        raise ValueError(
            f"{out / LAST} was saved by a {ws}-process run and this run has {now['world_size']}: "
            f"resume with {ws} processes (torchrun --nproc-per-node/--nnodes so that "
            f"WORLD_SIZE={ws}), or start over with --no-resume or a new --out"
        )
    split = ("batch_groups", "grad_accum")
    saved_split = tuple(int(saved.get(k, now[k])) for k in split)
    same_step = saved_split[0] * saved_split[1] == cfg.batch_groups * cfg.grad_accum
    diff = sorted(k for k in now if k not in RESUME_FREE and saved.get(k, now[k]) != now[k]
                  and not (k in RESOLVED_AT_START and now[k] is None) and not (k in split and same_step))
    if diff:
        raise ValueError(
            f"{cfg.out} holds a run with different settings ({', '.join(diff)}): "
            f"use a new --out, or --no-resume to start over"
        )
    if saved_split != (cfg.batch_groups, cfg.grad_accum):
        log.info("resuming with the run's micro-batch split --batch-groups %d --grad-accum %d (the same "
                 "optimizer step of %d groups)", *saved_split, saved_split[0] * saved_split[1])
        cfg = dataclasses.replace(cfg, batch_groups=saved_split[0], grad_accum=saved_split[1])
    return cfg


def _damaged(path: Path, why: str) -> ValueError:
    last = next((p for p in path.parents if p.name == LAST), path.parent)
    return ValueError(f"{path} cannot be loaded ({why}): the checkpoint is damaged or was not "
                      f"written by kdcache; delete {last} or pass --no-resume (or a new --out) "
                      f"to start over")


def load_state(out: Path) -> dict:
    """The saved training state (tensors and plain containers only: no pickled objects)."""
    path = out / LAST / STATE_FILE
    _regular_file(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, TypeError,
            KeyError, IndexError, ImportError) as e:
        raise _damaged(path, _short(e)) from None


def _short(e: BaseException, limit: int = 200) -> str:
    """`Type: first line` of an exception, cut to `limit` characters (a hostile file's
    message may quote unbounded data)."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _regular_file(path: Path) -> None:
    """Only plain files are read: a FIFO would block, a device would never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _damaged(path, "the file is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise _damaged(path, "not a regular file")


# What a torch.distributed.checkpoint `.metadata` pickle may name (torch 2.x's
# FileSystemWriter writes these and nothing else); anything else is refused before it runs.
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a dict lookup of torch's layouts by name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module[:80]}.{name[:80]} is not a checkpoint metadata "
                                     f"class (refused, not run)")


def read_dcp_metadata(path: Path):
    """The `Metadata` of a DCP checkpoint directory `path`, read with the restricted
    unpickler and checked: every data file it names is one plain file inside `path`,
    with no load-time transforms (kdcache writes none)."""
    from torch.distributed.checkpoint.metadata import Metadata

    meta_path = path / ".metadata"
    _regular_file(meta_path)
    try:
        with open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, KeyError, IndexError,
            ValueError, ImportError, RecursionError, MemoryError) as e:
        raise _damaged(meta_path, _short(e)) from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise _damaged(meta_path, f"holds a {type(md).__name__[:80]}, not DCP metadata")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if (not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel
                or rel in (".", "..") or rel.startswith(".")):
            raise _damaged(meta_path, f"it names the data file {str(rel)[:80]!r}, which is not "
                                      f"a plain file name inside {path.name}/")
        if getattr(info, "transform_descriptors", None):
            raise _damaged(meta_path, "it asks for load-time transforms kdcache never writes")
        _regular_file(path / rel)
    return md


def safe_dcp_reader(path: Path):
    """A FileSystemReader whose `read_metadata` uses the restricted unpickler, and a load
    planner whose byte items are read with `torch.load(weights_only=True)` (torch's
    default planner uses weights_only=False)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDCPReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_dcp_metadata(Path(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True, map_location="cpu")
            except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError) as e:
                raise _damaged(path, _short(e)) from None
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, weights_only
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeDCPReader(str(path)), SafeLoadPlanner()


def save_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, reader, step: int,
                    tokens: int, cfg: TrainConfig, seconds: float = 0.0,
                    loss: float = float("nan"), ranks: list[dict] | None = None) -> Path:
    """HF-loadable weights + training state, written to a temp dir and renamed into place.
    `ranks`: every rank's reader/RNG state in a distributed run (rank 0 calls this)."""
    tmp = out / f".last-tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    state = _state(optimizer.state_dict(), scheduler, reader, step, tokens, seconds, loss, ranks)
    return _commit(out, tmp, state, cfg)


def _state(optimizer_state: dict | None, scheduler, reader, step: int, tokens: int, seconds: float,
           loss: float, ranks: list[dict] | None) -> dict:
    state = {
        "step": step,
        "tokens": tokens,
        "seconds": seconds,
        "loss": loss,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "reader": reader.state_dict(),
        "world_size": len(ranks) if ranks else 1,
    }
    if optimizer_state is not None:  # under FSDP it is sharded in last/dcp
        state["optimizer"] = optimizer_state
    if ranks and len(ranks) > 1:
        state["ranks"] = ranks
    return state


def _commit(out: Path, tmp: Path, state: dict, cfg: TrainConfig) -> Path:
    """Write the state and config into `tmp`, then swap it in as `out/last`."""
    final = out / LAST
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


def save_sharded_checkpoint(out: Path, d, module, tokenizer, optimizer, scheduler, reader, step: int,
                            tokens: int, cfg: TrainConfig, seconds: float, loss: float,
                            ranks: list[dict]) -> Path:
    """FSDP: every rank writes its shards of weights and optimizer state with
    torch.distributed.checkpoint; rank 0 adds the rest and swaps the directory in. All ranks
    call this; it returns when the checkpoint is complete everywhere."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict


    tmp = out / f".last-tmp-{step}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    if d.main:
        tokenizer.save_pretrained(tmp)
        _commit(out, tmp, _state(None, scheduler, reader, step, tokens, seconds, loss, ranks), cfg)
    barrier(d)
    return out / LAST


def load_dcp(path: Path, sd: dict, no_dist: bool = False) -> None:
    """`dcp.load` of `sd` from `path` through the safe reader and planner. A refusal is our
    ValueError naming the file, not torch's CheckpointException (a BaseException that
    wraps it, traceback included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(path)  # refused here, before torch reads anything
    reader, planner = safe_dcp_reader(path)
    try:
        dcp.load(sd, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as e:
        ours = [f[0] for f in e.failures.values()
                if isinstance(f, tuple) and f and isinstance(f[0], ValueError)]
        if ours:
            raise ours[0] from None
        raise


def load_sharded(out: Path, module, optimizer) -> None:
    """FSDP resume: each rank reads its shards of weights and optimizer state from last/dcp."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    load_dcp(out / LAST / "dcp", sd)
    set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


def export_sharded(out: Path, d, module, model, tokenizer) -> Path:
    """FSDP: gather the full weights to rank 0 (on CPU) and write out/model as HF
    safetensors, loadable with from_pretrained. All ranks call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dest = out / MODEL
    if d.main:
        prefix = StudentForward.KEY_PREFIX
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        tmp = out / ".model-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
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
        except (json.JSONDecodeError, RecursionError):  # a line cut short by the kill
            continue
        if isinstance(row, dict) and isinstance(row.get("step", 0), int) \
                and row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
