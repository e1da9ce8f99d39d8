"""The training recipe: one linear loop, read top to bottom.

setup (store, student, optimizer) -> stream groups -> `next_batches` -> `train_step`
(forward, loss, backward, clip, optimizer step: train/step.py) -> log / checkpoint.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache.store import StreamReader, open_store

from . import distributed as D
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
    set_rng_state,
    set_seed,
    truncate_metrics,
)
from .config import TrainConfig
from .data import group_stream, next_batches
from .objectives import OBJECTIVE_SPECS
from .optim import make_optimizer, make_scheduler
from .prefetch import FirstAhead
from .step import Precision, train_step
from .student import base_causal_lm, load_student

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


def _check_fields(cfg: TrainConfig, store) -> None:
    """Up front, before the reader opens: the objective's fields are stored."""
    spec = OBJECTIVE_SPECS[cfg.objective]
    missing = [f for f in spec.fields if f not in store.fields]
    if missing:
        raise ValueError(
            f"objective {cfg.objective!r} needs stored fields {missing}, which store "
            f"{cfg.store!r} lacks: re-run `kdcache precompute` with a teacher"
            + (" and a --reference" if any(f.startswith("ref_") for f in missing) else "")
        )


def _check_store(cfg: TrainConfig, store, tokenizer, head_rows: int) -> None:
    """Once the student is loaded: it reads the same ids as the store's teacher."""
    store_vocab = store.meta.scored_vocab
    if store_vocab is not None and store_vocab != len(tokenizer):
        raise ValueError(
            f"teacher vocab {store_vocab} != student vocab {len(tokenizer)}: the store's ids "
            f"would mean other tokens to this student; use a student that shares the teachers' "
            f"tokenizer (same model family)"
        )
    if store_vocab is not None and store_vocab > head_rows:
        raise ValueError(
            f"teacher vocab {store_vocab} > student output rows {head_rows}: the student's "
            f"lm_head cannot score every stored id; resize its embeddings or pick another student"
        )
    if cfg.objective == "tvkd" and not any(abs(b - cfg.tvkd_beta) < 1e-9 for b in store.meta.betas):
        raise ValueError(
            f"--tvkd-beta {cfg.tvkd_beta} is not among the store's soft-value betas "
            f"{list(store.meta.betas)}: pick one of those or precompute with --betas"
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
    cfg.validate()
    d = D.setup(cfg)
    try:
        with D.rank_logging(d):
            return _train(dataclasses.replace(cfg, world_size=d.world_size), d, stop_after)
    except BaseException as e:
        out = Path(cfg.out)
        hint = (f"{out / LAST} is intact: run the same command again to resume from it"
                if has_checkpoint(out) else "no checkpoint was written: run the command again")
        failure = D.explain_failure(d, e, hint)
        if failure is not None:
            raise failure from e
        raise
    finally:
        D.teardown(d)


def _train(cfg: TrainConfig, d: D.Dist, stop_after: int | None) -> TrainResult:
    out = Path(cfg.out)
    resuming = cfg.resume and has_checkpoint(out)
    if resuming:
        check_same_run(cfg, out)
        if cfg.fsdp:  # refuse a damaged or hostile DCP checkpoint before any weight loads
            read_dcp_metadata(out / LAST / "dcp")
    store = open_store(cfg.store, root=cfg.store_root)
    budget = None
    if d.enabled:  # every rank takes the same number of groups from each epoch
        budget = D.epoch_budget(store, list(OBJECTIVE_SPECS[cfg.objective].fields), cfg.seed, d.world_size)
        D.check_budget(store, cfg.store, budget, d.world_size)
    total = total_steps(cfg, store.num_groups, budget)
    state = load_state(out) if resuming else None
    D.agree(d, "the step count and the resume step", total=total, start=state["step"] if state else 0)
    if state is not None:
        if state["step"] >= total and (out / MODEL).exists():  # finished: nothing to do
            return TrainResult(str(out), state["step"], state["tokens"], float(state.get("seconds", 0.0)),
                               float(state.get("loss", float("nan"))), d.rank)
    _check_fields(cfg, store)
    # the reader at its (restored) position; the first group is read while the student loads
    reader = StreamReader(store, fields=list(OBJECTIVE_SPECS[cfg.objective].fields), shuffle=True,
                          seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    if state is not None:
        reader.load_state_dict(D.rank_reader_state(d, state))
    start = state["step"] if state else 0
    groups = group_stream(reader, budget)
    if start < total and (stop_after is None or start < stop_after):  # a step will take it
        groups = FirstAhead(groups)
    set_seed(cfg.seed)
    device = d.device()
    # before any weight is loaded (FSDP shards the step: the one-GPU estimate does not apply)
    if device.type == "cuda" and cfg.fit_check and not cfg.fsdp:
        from .memory import fit_or_fail

        cfg = fit_or_fail(cfg, store)
    if resuming and not cfg.fsdp:  # under FSDP the weights are in last/dcp, loaded after sharding
        model, tokenizer = _load_resumed(cfg, device)
    else:
        model, tokenizer = load_student(cfg, device)
    _check_store(cfg, store, tokenizer, base_causal_lm(model).get_output_embeddings().weight.shape[0])
    if d.main:
        per_rank = cfg.batch_groups * cfg.grad_accum
        log.info("effective batch: %d groups per optimizer step = %d per micro-batch x %d micro-batches "
                 "x %d process(es); %d steps", per_rank * d.world_size, cfg.batch_groups, cfg.grad_accum,
                 d.world_size, total)
        if budget is not None and D.skipped_share(store, budget, d.world_size) > 0:
            log.info("each rank takes %d groups per epoch (the least any rank holds): %.1f%% of the "
                     "store's groups sit out epoch 0", budget(0), 100 * D.skipped_share(store, budget, d.world_size))

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
            return _loop(cfg, out, store, reader, groups, model, tokenizer, device, total, state,
                         stop_after, d, reporter)
        finally:
            if reporter is not None:
                reporter.close()
    except BaseException:
        if d.main and not has_checkpoint(out):  # nothing to resume from: leave nothing behind
            _remove_run_files(out, created)
        raise


def _loop(cfg: TrainConfig, out: Path, store, reader: StreamReader, groups: Iterator[list[dict]],
          model, tokenizer, device, total: int, state: dict | None, stop_after: int | None,
          d: D.Dist, reporter=None) -> TrainResult:
    precision = Precision.for_run(cfg, device)
    step_model = D.wrap(d, model, cfg, precision.bf16) if d.enabled else model  # what train_step calls
    params = [p for p in step_model.parameters() if p.requires_grad]  # FSDP: the sharded ones
    optimizer = make_optimizer(cfg, params)
    scheduler = make_scheduler(cfg, optimizer, total)
    step, tokens, pending, prior_s, last_loss = 0, 0, 0, 0.0, float("nan")
    row_tps = 0.0  # tokens/s at the last log row (the progress bar shows it)
    metrics_path = out / METRICS
    if state is not None:
        if cfg.fsdp:
            load_sharded(out, step_model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        D.restore_rank_state(d, state)  # RNG on ranks > 0 (the reader was restored in _train)
        if d.main:
            set_rng_state(state["rng"])
        step, tokens, prior_s = state["step"], state["tokens"], float(state.get("seconds", 0.0))
        last_loss = float(state.get("loss", float("nan")))
        if d.main:
            truncate_metrics(metrics_path, step)
        log.info("resumed %s at step %d", out / LAST, step)
    else:
        D.seed_rank(d, cfg.seed)
        if d.main and metrics_path.exists():
            metrics_path.unlink()

    pad_id = tokenizer.pad_token_id or 0
    betas = tuple(store.meta.betas)
    vocab = store.meta.scored_vocab  # a padded student head normalises over these ids only
    model.train()
    t0, tokens0, saved_at = time.perf_counter(), tokens, step
    metrics: dict[str, torch.Tensor] = {}
    progress = _progress(cfg, total, step) if d.main else None

    def checkpoint() -> None:
        nonlocal tokens, pending
        tokens, pending = tokens + D.sum_int(d, pending), 0
        ranks = D.rank_states(d, reader) if d.enabled else None
        seconds = prior_s + time.perf_counter() - t0
        if cfg.fsdp:
            save_sharded_checkpoint(out, d, step_model, tokenizer, optimizer, scheduler, reader, step,
                                    tokens, cfg, seconds, last_loss, ranks)
            return
        if d.main:
            save_checkpoint(out, model, tokenizer, optimizer, scheduler, reader, step, tokens, cfg,
                            seconds, last_loss, ranks)
        D.barrier(d)  # nobody goes on before the checkpoint is complete

    while step < total and (stop_after is None or step < stop_after):
        batches, step_tokens = next_batches(groups, cfg, pad_id, betas, device, vocab)
        metrics = train_step(step_model, optimizer, scheduler, params, batches, cfg, step, precision)
        step += 1
        pending += step_tokens  # this rank's; summed over ranks when logged or saved
        if step % cfg.log_every == 0 or step == total:
            row, new = D.reduce_metrics(d, metrics, pending)  # the one device sync per log row
            tokens, pending = tokens + new, 0
            last_loss = row["loss"]
            elapsed = time.perf_counter() - t0
            row_tps = (tokens - tokens0) / max(elapsed, 1e-9)
            row = {"step": step, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                   "tokens_per_s": row_tps, **row}
            if d.main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if reporter is not None:
                reporter.log(row)
        if progress is not None:
            progress.update(1, loss=last_loss, tps=row_tps)
        if cfg.save_every and step % cfg.save_every == 0:
            checkpoint()
            saved_at = step
    if progress is not None:
        progress.close()
    if metrics:
        last_loss = D.reduce_metrics(d, {"loss": metrics["loss"]}, 0)[0]["loss"]
    tokens, pending = tokens + D.sum_int(d, pending), 0
    # rank 0 decides (its view of out/ is the one that counts when --out is not shared)
    if D.sum_int(d, int(saved_at != step or not has_checkpoint(out)) if d.main else 0):
        checkpoint()
    seconds = prior_s + time.perf_counter() - t0
    if step >= total:
        if cfg.fsdp:
            export_sharded(out, d, step_model, model, tokenizer)
        elif d.main:
            export_model(out, model, tokenizer)
        D.barrier(d)
    return TrainResult(str(out), step, tokens, seconds, last_loss, d.rank)


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
