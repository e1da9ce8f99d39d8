"""One precompute process: score a dataset (or a rollout store) with the DPO teacher and the
reference ONCE and write every METHODS.md §1 field into a content-addressed store.

Flow of `run_one(cfg)`: tokenize -> fingerprints -> StoreMeta -> (no-op if that store is
already complete) -> load models -> length-bucketed batches -> engine.score_sequences ->
GroupWriter. Resume: groups already committed are skipped, so a killed run continues where
its last committed shard ended and produces the same store.
Partition: `partition=(i, n)` keeps batches i, i+n, ... of the run's batch plan (length-sorted,
so every part gets a similar mix of lengths); each part is its own store (the partition and
the batch settings are in the options, hence in the key), so n machines can precompute one
dataset without sharing a writer.

This module is the single-process layer and imports nothing above it: the multi-process
layer (`launch.py`: `run_precompute`, `--partition auto`, `--devices`, `--merge-parts`) calls
`run_one`, never the other way round.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import (
    CheckedPrecomputeConfig,
    InputSettings,
    ModelSettings,
    PrecomputeConfig,
    ScoreSettings,
)
from .data import (
    DataError,
    DataOptions,
    DataStats,
    Sequence,
    dataset_fingerprint,
    tokenize_rows,
)
from .engine import needs_teacher
from .models import (
    check_same_tokenizer,
    check_vocab_rows,
    load_model,
    load_tokenizer,
    model_fingerprint,
    model_vocab_size,
    resolve_device,
    resolve_dtype,
    tokenizer_files,
    tokenizer_fingerprint,
    tokenizer_size,
    verify_head,
)
from .partitions import partition_plan
from .records import sequence_record
from .sources import open_data
from .storeapi import (
    REF_FIELDS,
    TEACHER_FIELDS,
    TOKENIZER_FILE_NAMES,
    TOPK_FIELDS,
    NoStoreError,
    StoreMeta,
    check_output,
    describe_files,
    open_store,
    store_key,
)
from .writing import GroupWriter

log = logging.getLogger("kdcache.precompute")


def code_version() -> str:
    try:
        from importlib.metadata import version

        return f"kdcache {version('kdcache')}"
    except Exception:  # noqa: BLE001 - provenance only
        return "kdcache unknown"


# ------------------------------------------------------------------------------- inputs

@dataclass
class Vocab:
    """The ids precompute scores: [0, size), the shared tokenizer's ids. A model may have more
    output rows (vocabulary padding: Qwen2.5-7B has 152,064, its 0.5B-3B siblings 151,936,
    one tokenizer of 151,665); no tokenizer emits those ids, so their logits are dropped
    before log_softmax, top-K and soft values."""

    size: int
    rows: dict[str, int] = field(default_factory=dict)  # "dpo"/"ref" -> lm_head rows (config)

    @property
    def padded(self) -> bool:
        return any(r != self.size for r in self.rows.values())


class GroupSource:
    """The groups of a run, streamed again on every call of `groups()`: a dataset (rows
    tokenized as they are read with `opts`) or rollout store(s)."""

    def __init__(self, inputs: InputSettings, opts: DataOptions, tok: Any) -> None:
        self.inputs, self.opts, self.tok = inputs, opts, tok
        self.has_behavior = False
        if inputs.data is not None:
            self.source = open_data(inputs.data, inputs.data_config, inputs.split)
        else:
            self.stores = [open_store(u.strip()) for u in inputs.input_store.split(",") if u.strip()]
            if not self.stores:
                raise ValueError(f"--input-store {inputs.input_store!r} names no store")
            for st in self.stores:
                if not st.complete:
                    raise ValueError(f"input store {st.url} is incomplete; finish the rollout "
                                     "run first")
            self.has_behavior = all("behavior_logprob" in st.fields for st in self.stores)

    def fingerprint(self, tok_fp: str) -> dict[str, Any]:
        """The dataset part of the store key (reads every data file once, in blocks)."""
        if self.inputs.data is not None:
            return {"sha256": dataset_fingerprint(self.source.sha256(), self.opts, tok_fp)}
        fps = [{"input_store": st.manifest.get("store_key"),
                "checksum": st.manifest.get("checksum")} for st in self.stores]
        return dict(fps[0] if len(fps) == 1 else {"input_stores": fps}, limit=self.inputs.limit)

    def groups(self, stats: DataStats, check_ids: bool = True) -> Iterator[list[Sequence]]:
        if self.inputs.data is not None:
            yield from tokenize_rows(self.source.rows(self.inputs.limit), self.tok, self.opts,
                                     stats, check_ids=check_ids)
            return
        for i, g in enumerate(self._store_groups()):
            if self.inputs.limit is not None and i >= self.inputs.limit:
                return
            stats.rows += 1
            stats.sequences += len(g)
            stats.tokens += sum(len(s.response_ids) for s in g)
            yield g

    def _store_groups(self) -> Iterator[list[Sequence]]:
        """One store: its groups as stored (streamed). Several (comma-separated): joined by
        example id, e.g. PBSD's teacher-with-context rollouts (y+) and student rollouts (y-)
        of one prompt become one group, scored together (held in memory)."""
        if len(self.stores) == 1:
            for recs in self.stores[0].groups():
                yield [self._sequence(r) for r in recs]
            return
        joined: dict[str, list[Sequence]] = {}
        for store in self.stores:
            for recs in store.groups():
                for r in recs:
                    joined.setdefault(str(r["example_id"]), []).append(self._sequence(r))
        yield from joined.values()

    def _sequence(self, r: dict[str, Any]) -> Sequence:
        extra: dict[str, Any] = {"reward": r.get("reward"), "prompt_source": r.get("prompt_source"),
                                 "response_text": r.get("response_text")}
        if self.has_behavior:
            extra["behavior_logprob"] = np.asarray(r["behavior_logprob"], np.float32)
        tp = r.get("teacher_prompt_ids")
        return Sequence(str(r["example_id"]), str(r["role"]), int(r.get("group", 0)),
                        np.asarray(r["prompt_ids"], np.int32),
                        np.asarray(r["response_ids"], np.int32),
                        None if tp is None else np.asarray(tp, np.int32), extra)


@dataclass
class Prepared:
    """What a run knows before any model is loaded or anything is written."""

    meta: StoreMeta
    tok: Any
    vocab: Vocab
    source: GroupSource
    scored: tuple[str, ...] = ()  # the per-token fields the models compute
    same_model: bool = False  # teacher and reference have one fingerprint: one forward
    tok_files: dict[str, bytes] | None = None  # the tokenizer's files, stored (METHODS §5)


def _tokenizer_and_vocab(models: ModelSettings) -> tuple[Any, Vocab]:
    """The tokenizer all models must share, and the vocabulary precompute scores.
    Tokenizers must be identical; output rows may differ (padding) but must cover it."""
    main_name = models.tokenizer_source
    main_role = "teacher" if models.teacher else "tokenizer" if models.tokenizer else "reference"
    tok = load_tokenizer(main_name, models.trust_remote_code, role=main_role)
    size = tokenizer_size(tok)
    rows: dict[str, int] = {}
    for name, role, key in ((models.teacher, "teacher", "dpo"),
                            (models.reference, "reference", "ref"),
                            (models.student, "student", None)):
        if not name:
            continue
        if name != main_name or role != main_role:
            other = load_tokenizer(name, models.trust_remote_code, role=role)
            check_same_tokenizer(tok, other, main_role, role)
        n_rows = model_vocab_size(name)
        check_vocab_rows(role, name, n_rows, size)
        if key is not None and n_rows is not None:
            rows[key] = int(n_rows)
    return tok, Vocab(size, rows)


def prepare(cfg: CheckedPrecomputeConfig) -> Prepared:
    """Tokenizers, vocabulary and fingerprints (no model weights loaded, nothing written):
    the meta of the store this run writes, and its groups as a stream. Reads a config its
    entry point checked (`cfg.validated()`)."""
    if not isinstance(cfg, CheckedPrecomputeConfig):
        raise TypeError("prepare() reads a checked config: pass cfg.validated()")
    models = cfg.model_settings
    tok, vocab = _tokenizer_and_vocab(models)
    scored: tuple[str, ...] = ()
    if cfg.scores:
        scored = tuple(cfg.fields or TEACHER_FIELDS + (REF_FIELDS if cfg.reference else ()))
    topk = any(f in TOPK_FIELDS for f in scored)
    if topk and cfg.k > vocab.size:
        raise ValueError(f"--k {cfg.k} > the teacher's vocabulary of {vocab.size} tokens; pass a "
                         f"--k of at most {vocab.size} (typically 20-100)")
    tok_fp = tokenizer_fingerprint(tok)
    tok_files = tokenizer_files(models.tokenizer_source, TOKENIZER_FILE_NAMES)
    source = GroupSource(cfg.inputs, cfg.data_options, tok)
    ds_fp = source.fingerprint(tok_fp)

    fingerprints = {role: model_fingerprint(name, trust_remote_code=cfg.trust_remote_code)
                    for role, name in (("dpo", cfg.teacher), ("ref", cfg.reference)) if name}
    models = {}  # only the models whose outputs are stored shape the store
    if needs_teacher(scored):
        models["dpo"] = fingerprints["dpo"]
    if any(f in REF_FIELDS for f in scored):
        models["ref"] = fingerprints["ref"]
    fields = list(scored) + (["behavior_logprob"] if source.has_behavior else [])
    dev = resolve_device(cfg.device)
    options: dict[str, Any] = {
        "codec": cfg.codec,
        "ref_mode": cfg.ref_mode if "ref_topk_logprobs" in scored else None,
        # the teacher's numeric precision changes the stored numbers, so it is in the key
        "dtype": str(resolve_dtype(cfg.dtype, dev)).replace("torch.", "") if cfg.scores else None,
        "partition": list(cfg.partition) if cfg.partition else None,
    }
    if cfg.scores:  # the record order: groups are length-sorted within windows of rows
        options["bucket_window"] = cfg.bucket_window
    if cfg.partition is not None:  # which examples a part holds depends on the batch plan
        options["partition_plan"] = partition_plan(cfg)
    if cfg.error_bound is not None:
        options["error_bound"] = cfg.error_bound
    if cfg.scores and vocab.padded:  # logits of padded rows dropped before log_softmax
        options["vocab"] = {"scored": vocab.size, "model_rows": dict(vocab.rows)}
    if cfg.fields is not None:  # a chosen subset: K and betas only count when stored
        options["fields"] = list(scored)
    meta = StoreMeta(k=cfg.k if topk or cfg.fields is None else 0,
                     betas=list(cfg.betas) if "soft_value" in scored or cfg.fields is None else [],
                     fields=fields, models=models,
                     tokenizer={"sha256": tok_fp, "vocab_size": vocab.size,
                                **({"files": describe_files(tok_files)} if tok_files else {})},
                     dataset=ds_fp, options=options, code_version=code_version())
    same = len(fingerprints) == 2 and fingerprints["dpo"] == fingerprints["ref"]
    return Prepared(meta, tok, vocab, source, scored, same, tok_files or None)


def _no_rows_left(cfg: PrecomputeConfig, stats: DataStats) -> DataError:
    long_prompt = stats.skipped_long_prompt
    return DataError(
        f"{cfg.data or cfg.input_store}: no rows left to score: all {stats.rows} rows were dropped "
        f"({long_prompt} with a prompt of >= max_length {cfg.max_length} tokens, "
        f"{stats.skipped - long_prompt} longer than max_length with --truncate skip); raise "
        "--max-length")


def check_data(cfg: PrecomputeConfig, prep: Prepared) -> DataStats:
    """One streamed pass over the whole dataset before anything is written: every data
    error (a bad row, a duplicate id, an over-long row with --truncate fail) surfaces now,
    and the totals feed the progress bar. Memory: one row at a time, ~8 bytes per id."""
    stats = DataStats()
    with progress(cfg.progress and cfg.data is not None, None, "checking data") as bar:
        task = bar.add_task("check", total=None, seqs=0, tokens=0, tps="-")
        for i, _ in enumerate(prep.source.groups(stats, check_ids=True)):
            if i % 1024 == 0:
                bar.update(task, completed=stats.rows, seqs=stats.sequences, tokens=stats.tokens)
    if stats.rows == stats.skipped:
        raise _no_rows_left(cfg, stats)
    return stats


def progress(enabled: bool, total: int | None, label: str = "precompute"):
    """The bar of precompute and rollout loops: rows, sequences, tokens, tokens/s, ETA."""
    from kdcache.progress import progress_bar

    return progress_bar(label, "rows, {task.fields[seqs]} seqs, {task.fields[tokens]} tokens",
                        "{task.fields[tps]} tok/s", enabled=enabled, eta_label=True)


# ------------------------------------------------------------------------------- the plan

def iter_batches(cfg: PrecomputeConfig, groups: Iterator[list[Sequence]]
                 ) -> Iterator[list[list[Sequence]]]:
    """The forward batches of a run, in write order, streamed: groups are sorted by length
    within each window of `bucket_window` rows and cut into batches there. The plan depends
    only on the data and the settings (never on what a killed run already committed), so a
    resumed run recomputes exactly the batches an uninterrupted run computes. A partition
    (i, n) is batches i, i+n, ... of this plan, so its forwards are the single run's forwards,
    number for number."""
    if not cfg.scores:  # tokenized-only: data order, no forwards
        for g in groups:
            yield [g]
        return
    from .engine import bucket_batches

    plan = cfg.batch_plan
    window: list[list[Sequence]] = []
    for g in groups:
        window.append(g)
        if len(window) == plan.bucket_window:
            yield from bucket_batches(window, plan.batch_tokens, plan.max_batch_seqs, plan.packed)
            window = []
    if window:
        yield from bucket_batches(window, plan.batch_tokens, plan.max_batch_seqs, plan.packed)


def default_url(cfg: PrecomputeConfig, meta: StoreMeta) -> str:
    return cfg.out or f"{cfg.out_root.rstrip('/')}/{store_key(meta)}"


def out_option(cfg: Any) -> str:
    """The option that names a run's output location, for error messages."""
    return "--out" if cfg.out else "--out-root"


def cache_hit(url: str, meta: StoreMeta) -> bool:
    """A complete store with this content already exists at `url`."""
    try:
        existing = open_store(url)
    except (NoStoreError, NotADirectoryError, PermissionError):
        return False  # nothing (readable) there; check_output names a bad location
    return existing.complete and existing.meta.content_dict() == meta.content_dict()


# ------------------------------------------------------------------------------- the run

SUM_KEYS = ("tokens", "topk_mass", "ref_paper_abs_err")
# Shards are encoded and written by a writer thread while the next batches are scored
# (writing.py). False writes inline (same store): benchmarks/bench_precompute.py compares both.
BACKGROUND_WRITER = True


def run_one(cfg: PrecomputeConfig, timings: dict[str, float] | None = None) -> str:
    """The whole run, or partition (i, N) of it, in this process; returns the store URL.
    Re-running with identical inputs is a no-op (no model is loaded). `timings`, if given,
    receives where the time went (wall_s, check_s, load_s, loop_s, writer_wait_s, ...).
    An entry point: checks `cfg` (`validated()`) unless its caller did."""
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    cfg = cfg.validated()
    if cfg.partition == "auto" or cfg.devices or cfg.merge_parts:
        raise ValueError("run_one runs one process; --partition auto, --devices and "
                         "--merge-parts go through kdcache.precompute.run_precompute")
    prep = prepare(cfg)
    url = default_url(cfg, prep.meta)
    if cache_hit(url, prep.meta):
        log.info("%s: complete store with these inputs already exists; nothing to do", url)
        return url  # content-addressed cache hit: nothing to do, no model loaded
    t0 = time.perf_counter()
    check_output(url, out_option(cfg))  # free and writable, before any model is loaded
    checked = check_data(cfg, prep) if cfg.check_data else None
    times["check_s"] = time.perf_counter() - t0
    if checked is not None:
        report_data(cfg, checked)
    try:
        with GroupWriter(url, prep.meta, cfg.shard_records, cfg.resume, "precompute_report",
                         SUM_KEYS, background=BACKGROUND_WRITER, clamp=True,
                         tokenizer_files=prep.tok_files) as writer:
            if writer.done:
                of = "" if cfg.partition or checked is None else \
                    f" of {checked.rows - checked.skipped}"
                log.info("%s: resuming, %d%s groups already committed", url, len(writer.done), of)
            t0 = time.perf_counter()
            stats = _write(cfg, prep, writer, checked, times)
            if stats.rows == stats.skipped:
                raise _no_rows_left(cfg, stats)
            if checked is None:
                report_data(cfg, stats)
            writer.close(lambda sums: _report(stats, sums))
            times.update(loop_s=time.perf_counter() - t0, writer_wait_s=writer.wait_s,
                         writer_drain_s=writer.drain_s, writer_busy_s=writer.busy_s)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(f"no space left on the device writing {url} ({e.strerror or e}); the "
                          "shards committed so far are kept and the failed one was removed: "
                          f"free space (`kdcache store gc {url} --min-age 0` removes any other "
                          "uncommitted leftovers of kdcache there; it skips a store whose "
                          "writer still runs) and re-run the same command to resume") from None
        raise
    times["wall_s"] = time.perf_counter() - t_start
    waited = times["writer_wait_s"] + times["writer_drain_s"]
    log.info("%s: %d tokens in %.1fs (%.1fs scoring loop); the scorer waited %.2fs (%.1f%% of "
             "the loop) on the writer", url, int(times.get("tokens", 0)), times["wall_s"],
             times["loop_s"], waited, 100 * waited / max(times["loop_s"], 1e-9))
    if timings is not None:
        timings.update(times)
    return url


def report_data(cfg: PrecomputeConfig, stats: DataStats) -> None:
    if stats.truncated:
        log.warning("truncated %d of %d sequences to max_length %s (responses cut, not terminal;"
                    " counted in the manifest's precompute_report; truncate='fail' refuses "
                    "instead)", stats.truncated, stats.sequences, cfg.max_length)
    if stats.skipped:
        log.warning("skipped %d of %d rows longer than max_length %s (%d of them: the prompt "
                    "alone fills max_length)", stats.skipped, stats.rows, cfg.max_length,
                    stats.skipped_long_prompt)


def _report(stats: DataStats, sums: dict[str, float]) -> dict[str, Any]:
    """The manifest's precompute_report: data counts and the means of the per-token sums
    (over every committed group, across resumes)."""
    n = max(sums.get("tokens", 0.0), 1.0)
    return {"rows": stats.rows, "truncated": stats.truncated, "skipped": stats.skipped,
            "mean_topk_mass": sums.get("topk_mass", 0.0) / n,
            "mean_ref_paper_abs_err": sums.get("ref_paper_abs_err", 0.0) / n}


def _load_scorers(models: ModelSettings, prep: Prepared) -> tuple[Any, Any]:
    """The teacher and the reference, each only if a stored field needs it, and ONE model
    when both have the same fingerprint (same config and weights): it runs once per batch
    and the reference's fields are the teacher's own."""
    from . import engine

    dev = resolve_device(models.device)
    kw = dict(device=dev, dtype=models.dtype, trust_remote_code=models.trust_remote_code,
              attn_implementation=models.attn_implementation)
    need_ref = any(f in REF_FIELDS for f in prep.scored)
    dpo = ref = None
    if needs_teacher(prep.scored):
        dpo = engine.Scorer.from_model(load_model(models.teacher, "teacher", **kw), prep.vocab.size)
    if need_ref and prep.same_model and dpo is not None:
        ref = dpo
        log.info("the teacher and the reference are one model (same fingerprint): one forward "
                 "per batch")
    elif need_ref:
        ref = engine.Scorer.from_model(load_model(models.reference, "reference", **kw),
                                       prep.vocab.size)
    if models.verify_head:
        for sc in {id(x): x for x in (dpo, ref) if x is not None}.values():
            verify_head(sc.model, sc.head)
    return dpo, ref


def _write(cfg: PrecomputeConfig, prep: Prepared, writer: GroupWriter,
           checked: DataStats | None, times: dict[str, float]) -> DataStats:
    """Stream the plan; score and hand over this process's batches. A batch a killed run
    half committed is scored again in full (same batch -> same numbers on every backend) and
    only its missing groups are written. Returns the data counts of the stream."""
    stats = DataStats()
    part, n_parts = cfg.partition or (0, 1)
    done = writer.done
    tok = prep.tok
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    scorers = None
    total = None if checked is None else checked.rows - checked.skipped
    t0, toks, seqs, n_groups = time.perf_counter(), 0, 0, 0
    groups = prep.source.groups(stats, check_ids=checked is None)
    with progress(cfg.progress, total) as bar:
        task = bar.add_task("precompute", total=total, seqs=0, tokens=0, tps="-")
        for b, batch in enumerate(iter_batches(cfg, groups)):
            n_groups += len(batch)
            todo = [g for g in batch if g[0].example_id not in done] if b % n_parts == part else []
            if todo and not cfg.scores:
                for g in todo:
                    writer.add_group([sequence_record(s, eos) for s in g])
            elif todo:
                if scorers is None:
                    t_load = time.perf_counter()
                    scorers = _load_scorers(cfg.model_settings, prep)
                    times["load_s"] = time.perf_counter() - t_load
                recs, per_seq = _score(cfg.score_settings, prep, batch, scorers, pad, eos)
                it = iter(zip(recs, per_seq, strict=True))
                for g in batch:
                    pairs = [next(it) for _ in g]
                    if g[0].example_id in done:
                        continue
                    sums = {k: sum(st[k] for _, st in pairs) for k in SUM_KEYS}
                    writer.add_group([r for r, _ in pairs], sums)
            for g in todo:
                seqs += len(g)
                toks += sum(len(s.response_ids) for s in g)
            rate = toks / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=n_groups, seqs=seqs, tokens=toks, tps=f"{rate:,.0f}")
    times["tokens"] = float(toks)
    return stats


def _score(score: ScoreSettings, prep: Prepared, batch: list[list[Sequence]],
           scorers: tuple[Any, Any], pad: int, eos: int
           ) -> tuple[list[dict], list[dict[str, float]]]:
    from . import engine

    dpo, ref = scorers
    per_seq: list[dict[str, float]] = []
    recs, _ = engine.score_sequences([s for g in batch for s in g], dpo, ref, score.k, score.betas,
                                     pad, eos, score.chunk_size, score.ref_mode, score.packed,
                                     per_seq=per_seq, fields=prep.scored)
    return recs, per_seq


def config_dict(cfg: PrecomputeConfig) -> dict[str, Any]:
    return asdict(cfg)
