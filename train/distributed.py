"""Data-parallel training on torch.distributed: `kdcache train` under torchrun (or srun).

One process per device. The launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `setup` joins the process group (NCCL on CUDA, gloo on CPU) and the trainer
then runs the same loop on every rank:

- each rank streams its own windows of the store (StreamReader rank/world_size), and every
  rank takes the same number of groups per epoch (`epoch_budget`: the least any rank
  holds), so all ranks run the same number of steps and cross epoch boundaries together;
- the student is wrapped in DDP (gradients all-reduced once per optimizer step, averaged over
  ranks) or, with --fsdp, sharded with FSDP2 per decoder layer (`wrap`);
- the loss of one optimizer step is the mean over ranks of each rank's micro-batch mean:
  exactly gradient accumulation over world_size x grad_accum micro-batches in one process;
- rank 0 logs and writes checkpoints; the other ranks wait at barriers; reader position and
  RNG differ per rank, so they are gathered into the checkpoint (`rank_states`);
- a rank that fails records why in the rendezvous store before exiting; a rank whose
  collective fails because a peer vanished waits a moment, reads those records, and raises
  `PeerFailure` naming the rank that died, crashed or hung (`explain_failure`).

docs/DISTRIBUTED.md has the recipes (2 GPUs, Slurm), what is saved where, and the batch
arithmetic.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.store import StreamReader

from .config import TrainConfig
from .student import StudentForward, base_causal_lm

log = logging.getLogger(__name__)

GRACE_S = 3.0  # how long a survivor waits for the other ranks' failure records
_runs = 0  # train() calls in this process: keys in the rendezvous store are per run


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, crashed or hung."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run joined the process group, so it also leaves it
    run: int = 0  # per-run namespace for failure records in the rendezvous store

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank) if self.enabled else torch.device("cuda")
        return torch.device("cpu")


def setup(cfg: TrainConfig) -> Dist:
    """Join the launcher's process group (or reuse one already joined); single process when
    WORLD_SIZE is unset or 1. The options are checked before any process group is joined."""
    global _runs
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.dist_timeout_s <= 0:
        raise ValueError(f"--dist-timeout-s {cfg.dist_timeout_s}: must be > 0 (seconds)")
    if cfg.world_size not in (0, world):
        raise ValueError(f"--world-size {cfg.world_size}, but the launcher started {world} "
                         f"process(es): launch {cfg.world_size} (torchrun --nproc-per-node ...) "
                         f"or leave --world-size at 0")
    if cfg.fsdp and world < 2:
        raise ValueError("--fsdp shards the student across processes: launch with "
                         "`torchrun --nproc-per-node N -m kdcache.cli train ...` (N >= 2), or drop --fsdp")
    if cfg.fsdp and cfg.lora_r > 0:
        raise ValueError("--fsdp with --lora-r is not supported: LoRA adapters are small, "
                         "train them with DDP (drop --fsdp)")
    _runs += 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if joined:
        return Dist(dist.get_rank(), world, local_rank, owns_group=False, run=_runs)
    if world <= 1:
        return Dist(run=_runs)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    # env:// reads MASTER_ADDR/PORT, RANK, WORLD_SIZE (torchrun sets them; so can srun)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True, run=_runs)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- data agreement
def epoch_budget(store, fields, seed: int, world_size: int) -> Callable[[int], int]:
    """Groups every rank takes from epoch e: the least any rank holds that epoch.

    StreamReader deals whole windows (shards) to ranks, so per-rank counts differ by up to a
    window; taking the minimum keeps every rank on the same step and epoch. The surplus
    groups of the larger ranks are skipped that epoch (a new shard permutation next epoch
    skips others). Computed from the manifest alone: no communication."""
    cache: dict[int, int] = {}

    def budget(epoch: int) -> int:
        if epoch not in cache:
            cache[epoch] = min(len(StreamReader(store, fields=fields, seed=seed, epoch=epoch, rank=r,
                                                world_size=world_size)) for r in range(world_size))
        return cache[epoch]

    return budget


def check_budget(store, url: str, budget: Callable[[int], int], world_size: int) -> None:
    if world_size > 1 and budget(0) == 0:
        n = len(store.shards)
        raise ValueError(
            f"store {url} has {n} shard(s) for {world_size} processes: each rank reads whole "
            f"shards, so some rank would get nothing; launch at most {n} processes or precompute "
            f"with a smaller --shard-records"
        )


def skipped_share(store, budget: Callable[[int], int], world_size: int) -> float:
    """Fraction of the store's groups that the per-epoch minimum leaves out of epoch 0."""
    return 1.0 - budget(0) * world_size / max(1, store.num_groups)


# --------------------------------------------------------------------------- collectives
def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def agree(d: Dist, what: str, **values: int) -> None:
    """Every rank must hold the same `values` (step count, resume step): a rank that opened
    another store or checkpoint would otherwise train out of step. Also the first handshake."""
    if not d.enabled:
        return
    t = torch.tensor(list(values.values()), dtype=torch.int64, device=comm_device(d))
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        mine = ", ".join(f"{k} {v}" for k, v in values.items())
        raise ValueError(f"ranks disagree on {what} (this rank: {mine}; range {lo.tolist()}..{hi.tolist()}): "
                         f"every rank must open the same store and the same --out")


def reduce_metrics(d: Dist, metrics: dict[str, torch.Tensor], tokens: int) -> tuple[dict[str, float], int]:
    """Metrics averaged over ranks (each rank's value is its micro-batch mean) and tokens
    summed: one collective, at log steps only (it syncs the device anyway)."""
    if not d.enabled:
        return {k: float(v) for k, v in metrics.items()}, tokens
    keys = sorted(metrics)
    dev = comm_device(d)
    # FSDP's grad_norm is a DTensor (equal on every rank once materialised)
    local = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in metrics.items()}
    t = torch.stack([local[k].detach().to(dev, torch.float64).reshape(()) for k in keys]
                    + [torch.tensor(float(tokens), dtype=torch.float64, device=dev)])
    dist.all_reduce(t)
    vals = t.tolist()
    return {k: vals[i] / d.world_size for i, k in enumerate(keys)}, int(round(vals[-1]))


def sum_int(d: Dist, value: int) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device(d))
    dist.all_reduce(t)
    return int(t.item())


def rank_states(d: Dist, reader) -> list[dict]:
    """Every rank's reader position and RNG state, gathered (all ranks call; all get the list)."""
    dev = comm_device(d)
    mine = _rank_state(reader)
    if not d.enabled:
        return [mine]
    pos = torch.tensor([mine["reader"]["epoch"], mine["reader"]["consumed"]], dtype=torch.int64, device=dev)
    rng = mine["torch_rng"].to(dev)
    out_pos = [torch.empty_like(pos) for _ in range(d.world_size)]
    out_rng = [torch.empty_like(rng) for _ in range(d.world_size)]
    dist.all_gather(out_pos, pos)
    dist.all_gather(out_rng, rng)
    out_cuda = None
    if mine["cuda_rng"].numel():
        cr = mine["cuda_rng"].to(dev)
        out_cuda = [torch.empty_like(cr) for _ in range(d.world_size)]
        dist.all_gather(out_cuda, cr)
    states = []
    for r in range(d.world_size):
        epoch, consumed = out_pos[r].tolist()
        states.append({"reader": {**mine["reader"], "epoch": epoch, "consumed": consumed},
                       "torch_rng": out_rng[r].cpu(),
                       "cuda_rng": out_cuda[r].cpu() if out_cuda else torch.empty(0, dtype=torch.uint8)})
    return states


def _rank_state(reader) -> dict:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)
    return {"reader": reader.state_dict(), "torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def rank_reader_state(d: Dist, state: dict) -> dict:
    """This rank's saved reader position."""
    ranks = state.get("ranks")
    return ranks[d.rank]["reader"] if ranks else state["reader"]


def restore_rank_state(d: Dist, state: dict, reader=None) -> None:
    """This rank's saved reader position (unless `reader` is None: the trainer restores it
    before the model loads, see train/prefetch.py) and, for ranks > 0, its RNG; rank 0
    restores the full single-process RNG state from state["rng"]."""
    if reader is not None:
        reader.load_state_dict(rank_reader_state(d, state))
    if d.rank > 0:
        mine = state["ranks"][d.rank]
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"].numel() and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda_rng"])


def comm_device(d: Dist) -> torch.device:
    """Where collective inputs must live: the GPU under NCCL, else the CPU."""
    return d.device() if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- the wrapped student
def wrap(d: Dist, student: StudentForward, cfg: TrainConfig, bf16: bool) -> torch.nn.Module:
    """The student module (train/student.py) in DDP, or sharded by FSDP2 (`fully_shard` per
    decoder layer, then the root) with --fsdp; called with the batch, as unwrapped.

    DDP: `broadcast_buffers=False` because the only buffers are rotary tables, equal on every
    rank (otherwise each forward broadcasts them); no find_unused_parameters/static_graph:
    every trainable parameter gets a gradient every micro-batch (LoRA and non-reentrant
    gradient checkpointing included), so neither is needed. FSDP: under bf16 the gathered
    parameters are bf16 and gradients are reduced in fp32 (the sharded fp32 master weights
    and an fp32 reduction keep AdamW's small updates); in fp32 runs nothing is cast."""
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
        for layer in base_causal_lm(student.model).get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(student, mp_policy=mp)  # the root: embeddings, final norm, lm_head
        return student
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    dev = d.device()
    # torch 2.13 renamed broadcast_buffers (older torch only has the old name)
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


# --------------------------------------------------------------------------- failures
def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no group, or a torch without this helper: failures are then unnamed
        return None


def _collective_error(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe",
                            "Timed out", "timed out", "Socket Timeout"))


def explain_failure(d: Dist, exc: BaseException, hint: str) -> BaseException | None:
    """Called on any exception in a distributed run. A failure of this rank's own is recorded
    in the rendezvous store (so survivors can name it) and gets the rank in its message;
    returns None (re-raise it). A collective that failed because a peer vanished returns a
    PeerFailure naming the ranks that recorded an error or never answered."""
    if not d.enabled:
        return None
    store = _store()
    key = f"kdcache/run{d.run}/rank{{}}"
    if not _collective_error(exc):
        _record(store, key.format(d.rank), f"{type(exc).__name__}: {exc}"[:500])
        if len(exc.args) == 1 and isinstance(exc.args[0], str) and not exc.args[0].startswith("rank "):
            exc.args = (f"rank {d.rank}: {exc.args[0]}",)
        return None
    _record(store, key.format(d.rank), "")  # "" = I am alive and lost a peer
    failed, silent, unreachable = {}, [], store is None
    deadline = time.monotonic() + GRACE_S
    others = [r for r in range(d.world_size) if r != d.rank]
    while not unreachable:
        try:
            silent = [r for r in others if not store.check([key.format(r)])]
        except Exception:
            unreachable = True
            break
        if not silent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not unreachable:
        for r in others:
            if r not in silent:
                msg = store.get(key.format(r)).decode(errors="replace")
                if msg:
                    failed[r] = msg
    parts = [f"rank {r} failed: {m}" for r, m in sorted(failed.items())]
    if silent:
        parts.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} "
                     f"stopped answering (killed, out of memory, crashed or hung)")
    if unreachable:
        parts.append("the rendezvous store is unreachable: the process or node hosting it "
                     "(rank 0, or torchrun's agent) is gone")
    if not parts:
        parts.append("a collective failed while every other rank was still alive")
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return PeerFailure(f"rank {d.rank}: {'; '.join(parts)} ({first}); {hint}")


def _record(store, key: str, value: str) -> None:
    if store is None:
        return
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
        store.set(key, value)
    except Exception:  # the store went with its host: survivors report it unreachable
        pass


# --------------------------------------------------------------------------- quiet ranks
class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return self.rank == 0
        if not str(record.msg).startswith("rank "):
            record.msg = f"rank {self.rank}: {record.msg}"
        return True


@contextlib.contextmanager
def rank_logging(d: Dist):
    """Ranks > 0 log only warnings and errors; those carry the rank. (Rank 0 logs as usual.)"""
    if not d.enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    handlers = list(logging.getLogger().handlers)
    filt = _RankFilter(d.rank)
    for h in handlers:
        h.addFilter(filt)
    bars = hf_logging.is_progress_bar_enabled()
    if d.rank > 0:  # transformers' weight loading/saving bars
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)
        if bars and d.rank > 0:
            hf_logging.enable_progress_bar()
