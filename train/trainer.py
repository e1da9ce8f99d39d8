"""The training recipe: one linear loop, read top to bottom.

setup (store, student, optimizer) -> stream groups -> `next_batches` -> `train_step`
(forward, loss, backward, clip, optimizer step: train/step.py) -> log / checkpoint.
`_train` checks and loads everything; a `Run` holds the loop's state (the wrapped student,
optimizer, scheduler, reader, counters) and `_loop` drives its `step_once`, `log_row` and
`checkpoint`.
Resume restores model, optimizer, scheduler, RNG and the reader position, so a run stopped
after ANY step and resumed ends bitwise identical to an uninterrupted one on CPU.
Under torchrun the same loop runs on every rank (train/distributed.py: DDP or FSDP2, rank 0
logs and saves, every rank takes the same number of steps).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcache.store import StreamReader, open_store

from . import distributed
from .checkpoint import (
    LAST,
    MODEL,
    check_same_run,
    export_model,
    export_sharded,
    has_checkpoint,
    load_sharded,
    load_state,
    read_dcp_metadata,
    save_checkpoint,
    save_sharded_checkpoint,
    seed_rank,
    set_rng_state,
    set_seed,
    truncate_metrics,
)
from .config import TrainConfig, store_weights
from .data import group_stream, next_batches
from .objectives import OBJECTIVE_SPECS, objective_fields
from .optim import make_optimizer, make_scheduler
from .prefetch import FirstAhead
from .step import Precision, train_step
from .student import StudentForward, base_causal_lm, load_student
from .teachers import EnsembleGroups, MixedGroups, check_layout
from .xtok.setup import prepare as prepare_xtok
from .xtok.setup import xtok_cache_dir

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    out: str
    steps: int
    tokens: int
    seconds: float  # training time of the whole run, summed over its resumed segments
    final_loss: float
    rank: int = 0  # under torchrun only rank 0 reports (the CLI prints nothing on other ranks)


def resolve_stores(cfg: TrainConfig) -> list:
    """Every --store (URL, path, or content key under --store-root), in order."""
    return [open_store(u, root=cfg.store_root) for u in cfg.store]


def resolve_tvkd_beta(cfg: TrainConfig, store, url: str | None = None) -> TrainConfig:
    """TVKD reads one β column of the stored soft values: --tvkd-beta, or, unset, the store's
    only β (said in one line); refused, naming the store's betas, when it cannot be found."""
    if cfg.objective != "tvkd":
        return cfg
    betas = [float(b) for b in (store.meta.betas or ())]
    if cfg.tvkd_beta is None:
        if len(betas) != 1:
            raise ValueError(f"store {url or cfg.store[0]!r} holds soft values at betas {betas}: pick one with --tvkd-beta")
        log.info("tvkd: beta %g, the store's only soft-value beta (--tvkd-beta picks another store's)", betas[0])
        return dataclasses.replace(cfg, tvkd_beta=betas[0])
    if not any(abs(b - cfg.tvkd_beta) < 1e-9 for b in betas):
        raise ValueError(
            f"--tvkd-beta {cfg.tvkd_beta} is not among the store's soft-value betas "
            f"{betas}" + (f" (store {url!r})" if url else "") + ": pick one of those, leave it unset for a store of one beta, or precompute with --betas"
        )
    return cfg


def _check_fields(cfg: TrainConfig, store, url: str | None = None) -> None:
    """Up front, before the reader opens: the objective's fields are stored."""
    missing = [f for f in objective_fields(cfg) if f not in store.fields]
    if missing:
        raise ValueError(
            f"objective {cfg.objective!r} needs stored fields {missing}, which store "
            f"{url or cfg.store[0]!r} lacks: re-run `kdcache precompute` with a teacher"
            + (" and a --reference" if any(f.startswith("ref_") for f in missing) else "")
        )


def _check_several(cfg: TrainConfig, stores: list) -> None:
    """Several --store (METHODS §4), before the reader opens: one tokenizer for all; mixed
    groups collate together (one K, one β list); ensemble stores hold the same sequences."""
    first, url0 = stores[0], cfg.store[0]
    sha0 = (first.meta.tokenizer or {}).get("sha256") if isinstance(first.meta.tokenizer, dict) else None
    for s, url in zip(stores[1:], cfg.store[1:], strict=True):
        sha = (s.meta.tokenizer or {}).get("sha256") if isinstance(s.meta.tokenizer, dict) else None
        if (sha0 and sha and sha != sha0) or s.meta.scored_vocab != first.meta.scored_vocab:
            raise ValueError(f"store {url!r} was scored with another tokenizer than {url0!r}: every --store must "
                             f"share the student's tokenizer; precompute {url!r} with a teacher of the student's "
                             f"family (or train on the stores separately)")
        if cfg.ensemble:
            continue
        if "topk_ids" in OBJECTIVE_SPECS[cfg.objective].fields and s.meta.k != first.meta.k:
            raise ValueError(f"store {url!r} holds top-{s.meta.k} and {url0!r} top-{first.meta.k}: mixed stores "
                             f"share one K (their groups share micro-batches); precompute {url!r} with --k "
                             f"{first.meta.k}, or pass --ensemble if they score the same examples")
        if cfg.objective == "tvkd" and tuple(s.meta.betas) != tuple(first.meta.betas):
            raise ValueError(f"store {url!r} holds soft values at betas {list(s.meta.betas)} and {url0!r} at "
                             f"{list(first.meta.betas)}: mixed stores share one β list; precompute {url!r} with "
                             f"--betas {','.join(map(str, first.meta.betas))}")
    if cfg.ensemble:
        check_layout(stores, cfg.store)


def _check_store(cfg: TrainConfig, store, tokenizer, head_rows: int, xtok=None, url: str | None = None) -> None:
    """Once the student is loaded: it reads the same ids as the store's teacher (or, with
    --cross-tokenizer, its own ids, translated by `xtok`; train/xtok/setup.py)."""
    store_vocab = len(tokenizer) if xtok is not None else store.meta.scored_vocab
    if store_vocab is not None and store_vocab != len(tokenizer):
        raise ValueError(
            f"teacher vocab {store_vocab} != student vocab {len(tokenizer)}"
            + (f" (store {url!r})" if url else "") + ": the store's ids "
            "would mean other tokens to this student; pass --cross-tokenizer map (or uld) to "
            "align the two tokenizers, or use a student that shares the teachers' tokenizer"
        )
    if store_vocab is not None and store_vocab > head_rows:
        raise ValueError(
            f"teacher vocab {store_vocab} > student output rows {head_rows}: the student's "
            f"lm_head cannot score every stored id; resize its embeddings or pick another student"
        )


def total_steps(cfg: TrainConfig, n_groups: int, epoch_groups: Callable[[int], int] | None = None) -> int:
    """Optimizer steps of the run. `epoch_groups(e)`: groups each rank takes from epoch e
    (distributed runs); a step is `batch_groups x grad_accum` groups on every rank."""
    per_step = cfg.batch_groups * cfg.grad_accum
    if cfg.max_steps > 0:
        return cfg.max_steps
    if epoch_groups is None:
        return max(1, math.ceil(cfg.epochs * n_groups / per_step))
    full = int(cfg.epochs)
    groups = sum(epoch_groups(e) for e in range(full))
    if cfg.epochs > full:
        groups += (cfg.epochs - full) * epoch_groups(full)
    return max(1, math.ceil(groups / per_step))


def train(cfg: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Run cfg to completion (or `stop_after` optimizer steps, for resume tests).

    Everything that can be refused (options, store, student, their match) is checked before
    the output directory is touched; a run that fails before its first checkpoint removes
    what it wrote, so a failed command leaves nothing behind. Under torchrun every rank calls
    this; an error on one rank makes the others fail promptly, naming it (PeerFailure)."""
    cfg = cfg.validated()  # the entry point: checked here, once; nothing below re-checks
    d = distributed.setup(cfg)
    try:
        with distributed.rank_logging(d):
            return _train(dataclasses.replace(cfg, world_size=d.world_size), d, stop_after)
    except BaseException as e:
        out = Path(cfg.out)
        hint = (f"{out / LAST} is intact: run the same command again to resume from it"
                if has_checkpoint(out) else "no checkpoint was written: run the command again")
        failure = distributed.explain_failure(d, e, hint)
        if failure is not None:
            raise failure from e
        raise
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, d: distributed.Dist, stop_after: int | None) -> TrainResult:
    out = Path(cfg.out)
    resuming = cfg.resume and has_checkpoint(out)
    if resuming:
        cfg = check_same_run(cfg, out)
        if cfg.fsdp:  # refuse a damaged or hostile DCP checkpoint before any weight loads
            read_dcp_metadata(out / LAST / "dcp")
    stores = resolve_stores(cfg)
    store = stores[0]
    several = len(stores) > 1
    if several and d.enabled:
        raise ValueError("several --store under torchrun are not supported yet: train with several stores "
                         "in one process (without torchrun)")
    for s, url in zip(stores, cfg.store, strict=True):  # unset: the first store's only beta, in every store
        cfg = resolve_tvkd_beta(cfg, s, url if several else None)
    budget = None
    if d.enabled:  # every rank takes the same number of groups from each epoch
        budget = distributed.epoch_budget(store, list(objective_fields(cfg)), cfg.seed, d.world_size)
        distributed.check_budget(store, cfg.store[0], budget, d.world_size)
    # an epoch of a mixture is as many groups as all its stores hold (with the default
    # weights, one pass over each store in expectation); of an ensemble, one store's
    n_groups = sum(s.num_groups for s in stores) if several and not cfg.ensemble else store.num_groups
    total = total_steps(cfg, n_groups, budget)
    state = load_state(out) if resuming else None
    distributed.agree(d, "the step count and the resume step", total=total, start=state["step"] if state else 0)
    if state is not None:
        if state["step"] >= total and (out / MODEL).exists():  # finished: nothing to do
            return TrainResult(str(out), state["step"], state["tokens"], float(state.get("seconds", 0.0)),
                               float(state.get("loss", float("nan"))), d.rank)
    for s, url in zip(stores, cfg.store, strict=True):
        _check_fields(cfg, s, url)
    if several:
        _check_several(cfg, stores)
    # the reader at its (restored) position; the first group is read while the student loads
    readers = [StreamReader(s, fields=list(objective_fields(cfg)), shuffle=True,
                            seed=cfg.seed, rank=d.rank, world_size=d.world_size) for s in stores]
    reader = readers[0]
    if several:  # one position for all: the mixture's sampler, or the ensemble's lockstep
        weights = store_weights(cfg, [s.num_groups for s in stores])
        reader = EnsembleGroups(readers, cfg.store) if cfg.ensemble else MixedGroups(readers, weights, cfg.seed)
        log.info("%s of %d stores, weights %s", "ensemble" if cfg.ensemble else "mixture", len(stores),
                 ", ".join(f"{w:.3f}" for w in weights))
    if state is not None:
        reader.load_state_dict(distributed.rank_reader_state(d, state))
    start = state["step"] if state else 0
    groups = reader if several else group_stream(reader, budget)
    if start < total and (stop_after is None or start < stop_after):  # a step will take it
        groups = FirstAhead(groups)
    set_seed(cfg.seed)
    device = d.device()
    # before any weight is loaded (FSDP shards the step: the one-GPU estimate does not apply)
    if device.type == "cuda" and cfg.fit_check and not cfg.fsdp:
        from .memory import fit_or_fail

        cfg = fit_or_fail(cfg, stores if several else store)
    if resuming and not cfg.fsdp:  # under FSDP the weights are in last/dcp, loaded after sharding
        model, tokenizer = _load_resumed(cfg, device)
    else:
        model, tokenizer = load_student(cfg, device)
    head_rows = base_causal_lm(model).get_output_embeddings().weight.shape[0]
    xtok = None
    for s, url in zip(stores, cfg.store, strict=True):  # several stores: --cross-tokenizer is off (config)
        xtok = prepare_xtok(cfg, s, tokenizer, xtok_cache_dir(), url)
        _check_store(cfg, s, tokenizer, head_rows, xtok, url if several else None)
    if d.main and cfg.lora_r > 0:
        params = list(model.parameters())
        n_train, n_all = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        log.info("LoRA r=%d on %s: %s trainable parameters of %s (%.2f%%); model/ gets the merged weights",
                 cfg.lora_r, ",".join(cfg.lora_targets), f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(n_all, 1))
    if d.main:
        per_rank = cfg.batch_groups * cfg.grad_accum
        log.info("effective batch: %d groups per optimizer step = %d per micro-batch x %d micro-batches "
                 "x %d process(es); %d steps", per_rank * d.world_size, cfg.batch_groups, cfg.grad_accum,
                 d.world_size, total)
        if budget is not None and distributed.skipped_share(store, budget, d.world_size) > 0:
            log.info("each rank takes %d groups per epoch (the least any rank holds): %.1f%% of the "
                     "store's groups sit out epoch 0", budget(0), 100 * distributed.skipped_share(store, budget, d.world_size))

    created = not out.exists()
    try:
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.yaml")  # the resolved config, saved with every run
            with (out / "config.yaml").open("a") as f:
                f.write(f"# effective batch: {cfg.batch_groups * cfg.grad_accum * d.world_size} groups per "
                        f"optimizer step = batch_groups x grad_accum x world_size\n")
        reporter = None
        if d.main:  # rank 0 only: the trackers see the reduced metrics rows
            from .report import open_reporter, parse_report_to

            reporter = open_reporter(parse_report_to(cfg.report_to), out, cfg.to_dict(), store,
                                     resuming, cfg.run_name, cfg.wandb_project)
        try:
            run = Run(cfg, out, d, stores, reader, groups, model, tokenizer, device, total,
                      reporter=reporter, xtok=xtok)
            if state is not None:
                run.restore(state)
            else:
                run.fresh()
            return _loop(run, stop_after)
        finally:
            if reporter is not None:
                reporter.close()
    except BaseException:
        if d.main and not has_checkpoint(out):  # nothing to resume from: leave nothing behind
            _remove_run_files(out, created)
        raise


@dataclass(eq=False)
class Run:
    """One run's state while its loop goes: what `_train` set up, the step's pieces built
    from it (the wrapped student, optimizer, scheduler), and the counters that `step_once`
    advances, `log_row` reports and `checkpoint` saves."""

    cfg: TrainConfig
    out: Path
    d: distributed.Dist
    stores: list
    reader: Any  # StreamReader, MixedGroups or EnsembleGroups: its position is checkpointed
    groups: Iterator[list[dict]]
    model: torch.nn.Module  # the student as loaded (peft-wrapped with LoRA): what checkpoints save
    tokenizer: Any
    device: torch.device
    total: int  # optimizer steps of the whole run
    reporter: Any = None  # rank 0's trackers (train/report.py)
    xtok: Any = None  # --cross-tokenizer's translation (train/xtok)
    step: int = 0
    tokens: int = 0  # summed over ranks, up to the last log row or checkpoint
    pending: int = 0  # this rank's tokens since then
    prior_s: float = 0.0  # training seconds of the earlier segments of a resumed run
    last_loss: float = float("nan")
    row_tps: float = 0.0  # tokens/s at the last log row (the progress bar shows it)
    t0: float = 0.0  # when this segment's loop started (`begin`)
    tokens0: int = 0  # the tokens then
    saved_at: int = 0  # the step of this segment's last checkpoint
    precision: Precision = field(init=False)
    step_model: torch.nn.Module = field(init=False)  # what train_step calls: StudentForward, or DDP/FSDP of it
    params: list[torch.Tensor] = field(init=False)  # the trainable ones (FSDP: the sharded ones)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)
    pad_id: int = field(init=False)
    betas: tuple[float, ...] = field(init=False)  # the first store's soft-value betas
    vocab: int | None = field(init=False)  # the ids a step's log-probs normalise over
    ensemble: dict = field(init=False)  # --ensemble: each teacher's weight and betas

    def __post_init__(self) -> None:
        cfg, d = self.cfg, self.d
        self.precision = Precision.for_run(cfg, self.device)
        student = StudentForward(self.model, cfg.chunk_size)
        self.step_model = distributed.wrap(d, student, cfg, self.precision.bf16) if d.enabled else student
        self.params = [p for p in self.step_model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.optim_settings, self.params)
        self.scheduler = make_scheduler(cfg.schedule_settings, self.optimizer, self.total)
        store = self.stores[0]
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.betas = tuple(store.meta.betas)
        self.vocab = store.meta.scored_vocab  # a padded student head normalises over these ids only
        if self.xtok is not None:  # the student's own ids (train/xtok)
            self.vocab = len(self.tokenizer)
        self.ensemble = {}
        if cfg.ensemble:
            self.ensemble = {"teacher_weights": store_weights(cfg, [s.num_groups for s in self.stores]),
                             "teacher_betas": [tuple(s.meta.betas) for s in self.stores]}

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS

    def restore(self, state: dict) -> None:
        """A resumed run: optimizer, scheduler, RNG and counters as saved (the reader was
        restored in `_train`, before the student loaded); log rows after the checkpoint go."""
        cfg, d = self.cfg, self.d
        if cfg.fsdp:
            load_sharded(self.out, self.step_model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        distributed.restore_rank_state(d, state)  # RNG on ranks > 0
        if d.main:
            set_rng_state(state["rng"])
        self.step, self.tokens, self.prior_s = state["step"], state["tokens"], float(state.get("seconds", 0.0))
        self.last_loss = float(state.get("loss", float("nan")))
        if d.main:
            truncate_metrics(self.metrics_path, self.step)
        log.info("resumed %s at step %d", self.out / LAST, self.step)

    def fresh(self) -> None:
        """A new run: every rank's RNG from the seed, no earlier log rows."""
        seed_rank(self.d, self.cfg.seed)
        if self.d.main and self.metrics_path.exists():
            self.metrics_path.unlink()

    def begin(self) -> None:
        """This segment's clock starts: tokens/s and the run's seconds count from here."""
        self.model.train()
        self.t0, self.tokens0, self.saved_at = time.perf_counter(), self.tokens, self.step

    def seconds(self) -> float:
        return self.prior_s + time.perf_counter() - self.t0

    def step_once(self) -> dict[str, torch.Tensor]:
        """One optimizer step on the next batches; its metrics stay on the device."""
        batches, step_tokens = next_batches(self.groups, self.cfg, self.pad_id, self.betas, self.device,
                                            self.vocab, self.xtok, **self.ensemble)
        metrics = train_step(self.step_model, self.optimizer, self.scheduler, self.params, batches,
                             self.cfg, self.step, self.precision)
        self.step += 1
        self.pending += step_tokens  # this rank's; summed over ranks when logged or saved
        return metrics

    def log_row(self, metrics: dict[str, torch.Tensor]) -> None:
        """A metrics.jsonl row (rank 0) and the trackers': the step's metrics averaged over ranks."""
        row, new = distributed.reduce_metrics(self.d, metrics, self.pending)  # the one device sync per log row
        self.tokens, self.pending = self.tokens + new, 0
        self.last_loss = row["loss"]
        elapsed = time.perf_counter() - self.t0
        self.row_tps = (self.tokens - self.tokens0) / max(elapsed, 1e-9)
        row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens,
               "tokens_per_s": self.row_tps, **row}
        if self.xtok is not None:  # so far in this process (METHODS §5 report)
            row["aligned_fraction"] = self.xtok.stats.aligned_fraction
            if self.xtok.stats.topk_mass > 0:  # none with ULD: no map
                row["mapped_topk_mass"] = self.xtok.stats.mapped_mass_fraction
        if self.d.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.reporter is not None:
            self.reporter.log(row)

    def checkpoint(self) -> None:
        """out/last at this step. Every rank calls it: rank 0 writes (FSDP: every rank its shards)."""
        cfg, d, out = self.cfg, self.d, self.out
        self.tokens, self.pending = self.tokens + distributed.sum_int(d, self.pending), 0
        self.saved_at = self.step
        ranks = distributed.rank_states(d, self.reader) if d.enabled else None
        seconds = self.seconds()
        if cfg.fsdp:
            save_sharded_checkpoint(out, d, self.step_model, self.tokenizer, self.optimizer, self.scheduler,
                                    self.reader, self.step, self.tokens, cfg, seconds, self.last_loss, ranks)
            return
        if d.main:
            save_checkpoint(out, self.model, self.tokenizer, self.optimizer, self.scheduler, self.reader,
                            self.step, self.tokens, cfg, seconds, self.last_loss, ranks)
        distributed.barrier(d)  # nobody goes on before the checkpoint is complete

    def finish(self, metrics: dict[str, torch.Tensor]) -> TrainResult:
        """After this segment's last step: the final loss and tokens, a checkpoint unless that
        step has one, and out/model once the run is complete."""
        cfg, d, out = self.cfg, self.d, self.out
        if self.xtok is not None and d.main:
            mass = self.xtok.stats.mapped_mass_fraction
            log.info("cross-tokenizer (%s): %.1f%% of student tokens aligned%s", cfg.cross_tokenizer,
                     100 * self.xtok.stats.aligned_fraction,
                     "" if mass != mass else f", {100 * mass:.1f}% of the teacher's top-K mass at aligned "
                     "positions maps")
        if metrics:
            self.last_loss = distributed.reduce_metrics(d, {"loss": metrics["loss"]}, 0)[0]["loss"]
        self.tokens, self.pending = self.tokens + distributed.sum_int(d, self.pending), 0
        # rank 0 decides (its view of out/ is the one that counts when --out is not shared)
        if distributed.sum_int(d, int(self.saved_at != self.step or not has_checkpoint(out)) if d.main else 0):
            self.checkpoint()
        seconds = self.seconds()
        if self.step >= self.total:
            if cfg.fsdp:
                export_sharded(out, d, self.step_model, self.model, self.tokenizer)
            elif d.main:
                export_model(out, self.model, self.tokenizer)
            distributed.barrier(d)
        return TrainResult(str(out), self.step, self.tokens, seconds, self.last_loss, d.rank)


def _loop(run: Run, stop_after: int | None) -> TrainResult:
    """Step until the run's total (or `stop_after` steps, for resume tests), logging every
    --log-every steps and saving every --save-every."""
    cfg = run.cfg
    run.begin()
    metrics: dict[str, torch.Tensor] = {}
    progress = _progress(cfg, run.total, run.step) if run.d.main else None
    while run.step < run.total and (stop_after is None or run.step < stop_after):
        metrics = run.step_once()
        if run.step % cfg.log_every == 0 or run.step == run.total:
            run.log_row(metrics)
        if progress is not None:
            progress.update(1, loss=run.last_loss, tps=run.row_tps)
        if cfg.save_every and run.step % cfg.save_every == 0:
            run.checkpoint()
    if progress is not None:
        progress.close()
    return run.finish(metrics)


def _remove_run_files(out: Path, created: bool) -> None:
    """Undo a run that failed before its first checkpoint."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in ("config.yaml", METRICS, "tb", "report.json", ".model-tmp"):
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in out.glob(".last-tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _load_resumed(cfg: TrainConfig, device):
    """Resume from out/last: full weights, or the base model plus the saved LoRA adapter."""
    last = str(Path(cfg.out) / LAST)
    if cfg.lora_r > 0:
        from peft import PeftModel

        base, tokenizer = load_student(TrainConfig(**{**cfg.to_dict(), "lora_r": 0}), device)
        if cfg.grad_checkpointing:
            base.enable_input_require_grads()
        try:  # peft reads adapter_model.bin weights_only
            model = PeftModel.from_pretrained(base, last, is_trainable=True)
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"cannot load the LoRA adapter in {last} ({type(e).__name__}): the "
                             f"checkpoint is damaged or holds code, which is never run; delete "
                             f"{last} or pass --no-resume to start over") from None
        return model, tokenizer
    return load_student(TrainConfig(**{**cfg.to_dict(), "model": last}), device)


def _progress(cfg: TrainConfig, total: int, start: int):
    if not cfg.progress:
        return None
    from .progress import StepProgress

    return StepProgress(total, start, desc=f"train {cfg.objective}")
