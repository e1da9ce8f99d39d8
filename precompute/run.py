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
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .checks import (
    check_choice,
    check_codec,
    check_device,
    check_int,
    check_template,
    parse_betas,
    parse_partition,
)
from .data import (
    DataError,
    DataOptions,
    DataStats,
    Sequence,
    data_files,
    dataset_fingerprint,
    files_sha256,
    iter_rows,
    tokenize_rows,
)
from .models import (
    check_same_tokenizer,
    load_model,
    load_tokenizer,
    model_fingerprint,
    model_vocab_size,
    resolve_device,
    resolve_dtype,
    tokenizer_fingerprint,
    verify_head,
)
from .storeapi import NoStoreError, StoreMeta, open_store, store_key
from .writing import GroupWriter

log = logging.getLogger("kdcache.precompute")


def code_version() -> str:
    try:
        from importlib.metadata import version

        return f"kdcache {version('kdcache')}"
    except Exception:  # noqa: BLE001 - provenance only
        return "kdcache unknown"


@dataclass
class PrecomputeConfig:
    """Everything `run_precompute` needs. Models are local HF dirs or cached hub ids."""

    teacher: str | None = None  # the preference-aligned (DPO) teacher; None -> tokenized-only store
    reference: str | None = None  # pi_ref (the pre-DPO SFT model); None -> no ref_* fields
    data: str | None = None  # JSONL/Parquet URL (or glob) ...
    input_store: str | None = None  # ... or rollout store(s) to score, comma-separated (joined by example id)
    out: str | None = None  # store URL; default <out_root>/<store_key>
    out_root: str = "stores"
    student: str | None = None  # only checked to share the teacher's tokenizer
    tokenizer: str | None = None  # tokenizer dir; default: the teacher's (needed if teacher=None)
    k: int = 50
    betas: list[float] = field(default_factory=lambda: [1.0])
    ref_mode: str = "exact"  # "exact" (gather at DPO ids) | "paper" (ADPA's approximation)
    # data (see precompute/data.py)
    kind: str = "auto"  # preference | sft | auto
    max_length: int | None = 2048
    truncate: str = "truncate"  # truncate | skip | fail
    chat_template: bool = True
    use_context: bool = True
    context_template: str = "{context}\n\n{prompt}"
    limit: int | None = None
    partition: tuple[int, int] | str | None = None  # (index, count) or "i/N": this process's share
    # one box, several devices: one subprocess per device over partitions, then merged
    # (precompute/launch.py); e.g. ["0", "1", "2", "3"] (CUDA ids), ["all"], ["cpu", "cpu"]
    devices: list[str] | None = None
    merge_parts: int | None = None  # merge the N complete partition stores into the full store
    keep_parts: bool = False  # keep the partition stores after a merge
    # execution
    batch_tokens: int = 16384  # padded tokens per forward (packed: real tokens)
    max_batch_seqs: int = 256
    chunk_size: int | None = None  # scored positions per logits chunk; None -> ~1 GiB budget
    packed: bool = False  # one packed row per batch (position_ids restart per sequence)
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False
    verify_head: bool = True  # compare our head with the model's own logits once
    # store
    shard_records: int = 1024
    codec: str = "compact"  # compact (bounded error) | lossless
    error_bound: float | None = None
    resume: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Check every option before anything is read, loaded or written (ValueError naming
        the flag); normalises `betas` to floats and `partition` to (i, N)."""
        if (self.data is None) == (self.input_store is None):
            raise ValueError("pass exactly one of --data FILE (a dataset) or --input-store URL "
                             "(a rollout store to score)")
        if self.teacher is None and self.reference is not None:
            raise ValueError("--reference needs a --teacher (without a teacher, precompute writes "
                             "a tokenized-only store with no teacher signals)")
        if self.teacher is None and self.tokenizer is None:
            raise ValueError("no --teacher: pass --teacher DIR (the DPO teacher) to score the "
                             "data, or only --tokenizer DIR for a tokenized-only store (token "
                             "ids, no teacher signals; e.g. SFT data)")
        check_int("k", self.k, 1)
        self.betas = parse_betas(self.betas)
        check_choice("truncate", self.truncate, ("truncate", "skip", "fail"))
        check_choice("kind", self.kind, ("auto", "preference", "sft"))
        check_int("max_length", self.max_length, 1, optional=True)
        check_int("limit", self.limit, 1, optional=True)
        check_template("context_template", self.context_template, ("context", "prompt"))
        self.partition = parse_partition(self.partition)
        if self.devices is not None:
            if isinstance(self.devices, str):
                self.devices = [d for d in self.devices.split(",")]
            if not self.devices or any(not str(d).strip() for d in self.devices):
                raise ValueError(f"--devices {self.devices!r} has an empty entry; e.g. --devices "
                                 "0,1,2,3, --devices all or --devices cpu,cpu")
        check_int("merge_parts", self.merge_parts, 1, optional=True)
        modes = [name for name, v in (("--partition", self.partition), ("--devices", self.devices),
                                      ("--merge-parts", self.merge_parts)) if v]
        if len(modes) > 1:
            raise ValueError(f"set only one of {' / '.join(modes)}: --devices runs every partition "
                             "itself and merges them; --merge-parts merges partitions run elsewhere")
        check_int("batch_tokens", self.batch_tokens, 1)
        check_int("max_batch_seqs", self.max_batch_seqs, 1)
        check_int("chunk_size", self.chunk_size, 1, optional=True)
        check_int("shard_records", self.shard_records, 1)
        check_codec(self.codec, self.error_bound)
        resolve_dtype(self.dtype, resolve_device("cpu"))  # names the accepted dtypes
        if not self.devices:  # the launcher picks each worker's device itself
            check_device(self.device)


def _groups_from_store(urls: str) -> tuple[list[list[Sequence]], dict[str, Any], bool]:
    """Groups of one rollout store, or of several (comma-separated) joined by example id:
    e.g. PBSD's teacher-with-context rollouts (y+) and student rollouts (y-) of one prompt
    become one group, scored together."""
    stores = [open_store(u.strip()) for u in urls.split(",") if u.strip()]
    if not stores:
        raise ValueError(f"--input-store {urls!r} names no store")
    for st in stores:
        if not st.complete:
            raise ValueError(f"input store {st.url} is incomplete; finish the rollout run first")
    has_behavior = all("behavior_logprob" in st.fields for st in stores)
    joined: dict[str, list[Sequence]] = {}
    for store in stores:
        for recs in store.groups():
            for r in recs:
                extra: dict[str, Any] = {"reward": r.get("reward")}
                if has_behavior:
                    extra["behavior_logprob"] = np.asarray(r["behavior_logprob"], np.float32)
                tp = r.get("teacher_prompt_ids")
                joined.setdefault(str(r["example_id"]), []).append(Sequence(
                    str(r["example_id"]), str(r["role"]), int(r.get("group", 0)),
                    np.asarray(r["prompt_ids"], np.int32), np.asarray(r["response_ids"], np.int32),
                    None if tp is None else np.asarray(tp, np.int32), extra))
    fps = [{"input_store": st.manifest.get("store_key"), "checksum": st.manifest.get("checksum")}
           for st in stores]
    return list(joined.values()), (fps[0] if len(fps) == 1 else {"input_stores": fps}), has_behavior


def _data_options(cfg: PrecomputeConfig) -> DataOptions:
    return DataOptions(kind=cfg.kind, max_length=cfg.max_length, truncate=cfg.truncate,
                       chat_template=cfg.chat_template, use_context=cfg.use_context,
                       context_template=cfg.context_template, limit=cfg.limit)


def _no_rows_left(cfg: PrecomputeConfig, stats: DataStats) -> DataError:
    long_prompt = stats.skipped_long_prompt
    return DataError(
        f"{cfg.data or cfg.input_store}: no rows left to score: all {stats.rows} rows were dropped "
        f"({long_prompt} with a prompt of >= max_length {cfg.max_length} tokens, "
        f"{stats.skipped - long_prompt} longer than max_length with --truncate skip); raise "
        "--max-length")


def prepare(cfg: PrecomputeConfig) -> tuple[StoreMeta, list[list[Sequence]], Any, DataStats]:
    """Tokenize and fingerprint everything (no model weights loaded): meta, ALL groups of the
    dataset (a partition's share is chosen from the batch plan by run_precompute), tokenizer.
    Every check that needs no model runs here, before anything is written."""
    cfg.validate()
    main_role = "teacher" if cfg.teacher else "tokenizer"
    tok = load_tokenizer(cfg.tokenizer or cfg.teacher, cfg.trust_remote_code, role=main_role)
    t_vocab = model_vocab_size(cfg.teacher) if cfg.teacher else None
    checks = [(cfg.reference, "reference"), (cfg.student, "student")]
    if cfg.tokenizer and cfg.teacher:
        checks.append((cfg.teacher, "teacher"))
    for name, role in checks:
        if name:
            other = load_tokenizer(name, cfg.trust_remote_code, role=role)
            check_same_tokenizer(tok, other, main_role, role, t_vocab, model_vocab_size(name))
    vocab = t_vocab or len(tok)
    if cfg.teacher and cfg.k > vocab:
        raise ValueError(f"--k {cfg.k} > the teacher's vocabulary of {vocab} tokens; pass a "
                         f"--k of at most {vocab} (typically 20-100)")
    tok_fp = tokenizer_fingerprint(tok)
    stats = DataStats()
    has_behavior = False
    if cfg.data is not None:
        files = data_files(cfg.data)
        file_sha = files_sha256(files)
        opts = _data_options(cfg)
        groups = list(tokenize_rows(iter_rows(files, cfg.limit), tok, opts, stats))
        ds_fp = {"sha256": dataset_fingerprint(file_sha, opts, tok_fp)}
    else:
        groups, ds_fp, has_behavior = _groups_from_store(cfg.input_store)
        groups = groups[: cfg.limit] if cfg.limit else groups
        stats.rows = len(groups)
        stats.sequences = sum(len(g) for g in groups)
        ds_fp = dict(ds_fp, limit=cfg.limit)
    if not groups:
        raise _no_rows_left(cfg, stats)

    fields, models = [], {}
    if cfg.teacher:
        fields = ["topk_ids", "topk_logprobs", "token_logprob", "soft_value"]
        models["dpo"] = model_fingerprint(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    if cfg.reference:
        fields += ["ref_topk_logprobs", "ref_token_logprob"]
        models["ref"] = model_fingerprint(cfg.reference, trust_remote_code=cfg.trust_remote_code)
    if has_behavior:
        fields.append("behavior_logprob")
    dev = resolve_device(cfg.device)
    options: dict[str, Any] = {
        "codec": cfg.codec,
        "ref_mode": cfg.ref_mode if cfg.reference else None,
        # the teacher's numeric precision changes the stored numbers, so it is in the key
        "dtype": str(resolve_dtype(cfg.dtype, dev)).replace("torch.", "") if cfg.teacher else None,
        "partition": list(cfg.partition) if cfg.partition else None,
    }
    if cfg.partition is not None:  # which examples a part holds depends on the batch plan
        options["partition_plan"] = {"batch_tokens": cfg.batch_tokens, "packed": cfg.packed,
                                     "max_batch_seqs": cfg.max_batch_seqs}
    if cfg.error_bound is not None:
        options["error_bound"] = cfg.error_bound
    meta = StoreMeta(k=cfg.k, betas=list(cfg.betas), fields=fields, models=models,
                     tokenizer={"sha256": tok_fp, "vocab_size": t_vocab or len(tok)},
                     dataset=ds_fp, options=options, code_version=code_version())
    return meta, groups, tok, stats


def _progress(enabled: bool, total: int, label: str = "precompute"):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("seqs"), TextColumn("{task.fields[tps]} tok/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def plan_batches(cfg: PrecomputeConfig, groups: list[list[Sequence]]) -> list[list[list[Sequence]]]:
    """The forward batches of a run, in write order. They depend only on the groups and the
    settings (never on what a killed run already committed), so a resumed run recomputes
    exactly the batches an uninterrupted run computes. A partition (i, n) is batches i, i+n,
    ... of the full plan, so its forwards are the single run's forwards, number for number."""
    if cfg.teacher is None:
        return [[g] for g in groups]  # tokenized-only: data order, no forwards
    from .engine import bucket_batches

    return bucket_batches(groups, cfg.batch_tokens, cfg.max_batch_seqs, cfg.packed)


def default_url(cfg: PrecomputeConfig, meta: StoreMeta) -> str:
    return cfg.out or f"{cfg.out_root.rstrip('/')}/{store_key(meta)}"


def cache_hit(url: str, meta: StoreMeta) -> bool:
    """A complete store with this content already exists at `url`."""
    try:
        existing = open_store(url)
    except (NoStoreError, NotADirectoryError, PermissionError):
        return False  # nothing (readable) there; check_writable names a bad location
    return existing.complete and existing.meta.content_dict() == meta.content_dict()


def check_writable(url: str) -> None:
    """Fail before any model is loaded when a local output location cannot be written.
    Leaves nothing behind: directories it had to create for the probe are removed again
    (the store's writer creates them when it commits its first shard)."""
    if "://" in url and not url.startswith("file://"):
        return  # object stores: the first write reports its own error
    path = os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)
    created = []
    d = path
    while not os.path.exists(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    probe = os.path.join(path, f".kdcache-write-probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"output directory {path!r} is not writable ({e.strerror or e}); pass a "
                      "writable --out / --out-root, or fix its permissions") from None
    finally:
        for c in created:  # deepest first
            try:
                os.rmdir(c)
            except OSError:
                break


def run_one(cfg: PrecomputeConfig) -> str:
    """The whole run, or partition (i, N) of it, in this process; returns the store URL.
    Re-running with identical inputs is a no-op (no model is loaded)."""
    cfg.validate()
    if cfg.partition == "auto" or cfg.devices or cfg.merge_parts:
        raise ValueError("run_one runs one process; --partition auto, --devices and "
                         "--merge-parts go through kdcache.precompute.run_precompute")
    meta, groups, tok, stats = prepare(cfg)
    plan = plan_batches(cfg, groups)
    if cfg.partition is not None:  # this process's share: every n-th batch of the full plan
        plan = plan[cfg.partition[0]::cfg.partition[1]]
    groups = [g for b in plan for g in b]
    url = default_url(cfg, meta)
    if cache_hit(url, meta):
        log.info("%s: complete store with these inputs already exists; nothing to do", url)
        return url  # content-addressed cache hit: nothing to do, no model loaded
    check_writable(url)
    report_data(cfg, stats)
    try:
        with GroupWriter(url, meta, cfg.shard_records, cfg.resume, "precompute_report") as writer:
            done = writer.done
            if done:
                log.info("%s: resuming, %d of %d groups already committed", url,
                         len(done & {g[0].example_id for g in groups}), len(groups))
            if cfg.teacher is None:
                _tokenized_into(writer, [g for g in groups if g[0].example_id not in done],
                                tok.eos_token_id)
            elif len(done) < len(groups):
                _score_into(cfg, writer, plan, done, tok)
            writer.close({"rows": stats.rows, "truncated": stats.truncated,
                          "skipped": stats.skipped})
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(f"no space left on the device writing {url} ({e.strerror or e}); the "
                          "shards committed so far are kept: free space (`kdcache store gc` "
                          "removes uncommitted leftovers) and re-run the same command to "
                          "resume") from None
        raise
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


def _score_into(cfg: PrecomputeConfig, writer: GroupWriter, plan: list[list[list[Sequence]]],
                done: set[str], tok: Any) -> None:
    from . import engine

    dev = resolve_device(cfg.device)
    kw = dict(device=dev, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
              attn_implementation=cfg.attn_implementation)
    dpo = engine.Scorer.from_model(load_model(cfg.teacher, "teacher", **kw))
    ref = (engine.Scorer.from_model(load_model(cfg.reference, "reference", **kw))
           if cfg.reference else None)
    if cfg.verify_head:
        verify_head(dpo.model, dpo.head)
        if ref is not None:
            verify_head(ref.model, ref.head)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    floor = -255.0 if cfg.codec == "compact" else None  # store's compact codec bound (|x|<=256)
    report = writer.existing_report()
    acc = {"tokens": 0.0, "topk_mass": 0.0, "ref_paper_abs_err": 0.0}
    for key in acc:  # accumulate over resumed runs
        acc[key] = float(report.get(f"sum_{key}", 0.0))
    # The batches of the WHOLE run: a batch a killed run half committed is scored again in
    # full (same batch -> same numbers on every backend) and only its missing groups written.
    batches = [b for b in plan if any(g[0].example_id not in done for g in b)]
    n_seqs = sum(len(g) for b in batches for g in b if g[0].example_id not in done)
    t0, toks = time.perf_counter(), 0
    with _progress(cfg.progress, n_seqs) as bar:
        task = bar.add_task("precompute", total=n_seqs, tps="-")
        for batch in batches:
            seqs = [s for g in batch for s in g]
            per_seq: list[dict[str, float]] = []
            recs, _ = engine.score_sequences(seqs, dpo, ref, cfg.k, cfg.betas, pad,
                                             tok.eos_token_id, cfg.chunk_size, cfg.ref_mode,
                                             cfg.packed, per_seq=per_seq)
            if floor is not None:
                _clamp(recs, floor)
            it: Iterator[tuple[dict, dict]] = iter(zip(recs, per_seq, strict=True))
            n_new = 0
            for g in batch:
                pairs = [next(it) for _ in g]
                if g[0].example_id in done:
                    continue
                writer.add_group([r for r, _ in pairs])
                for _, st in pairs:
                    for key in acc:
                        acc[key] += st[key]
                n_new += len(g)
                toks += sum(s.length for s in g)
            rate = toks / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=n_new, tps=f"{rate:,.0f}")
            if n_new:
                _write_report(writer.report, acc)


def _tokenized_into(writer: GroupWriter, todo: list[list[Sequence]], eos_id: int) -> None:
    """No teacher: records carry only token ids (and carried rollout fields), e.g. for SFT."""
    for g in todo:
        recs = []
        for s in g:
            rec: dict[str, Any] = {
                "example_id": s.example_id, "role": s.role, "group": int(s.group),
                "prompt_ids": np.asarray(s.prompt_ids, np.int32),
                "response_ids": np.asarray(s.response_ids, np.int32),
                "teacher_prompt_ids": (None if s.teacher_prompt_ids is None
                                       else np.asarray(s.teacher_prompt_ids, np.int32)),
                "is_terminal": bool(len(s.response_ids) and s.response_ids[-1] == eos_id),
                "reward": s.extra.get("reward"), "n_tokens": len(s.response_ids),
            }
            if s.extra.get("behavior_logprob") is not None:
                rec["behavior_logprob"] = np.asarray(s.extra["behavior_logprob"], np.float32)
            recs.append(rec)
        writer.add_group(recs)


def _clamp(recs: list[dict], floor: float) -> None:
    """Log-probs below -255 nats (p < 1e-110) are stored as -255: the compact codec's range."""
    for r in recs:
        for key in ("topk_logprobs", "token_logprob", "ref_topk_logprobs", "ref_token_logprob"):
            if key in r:
                np.maximum(r[key], floor, out=r[key])


def _write_report(report: dict, acc: dict[str, float]) -> None:
    for key, v in acc.items():
        report[f"sum_{key}"] = v
    n = max(acc["tokens"], 1.0)
    report["mean_topk_mass"] = acc["topk_mass"] / n
    report["mean_ref_paper_abs_err"] = acc["ref_paper_abs_err"] / n


def config_dict(cfg: PrecomputeConfig) -> dict[str, Any]:
    return asdict(cfg)
