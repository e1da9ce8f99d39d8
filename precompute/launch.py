"""The multi-process layer of precompute, above the one-process run (`run.run_one`).

`run_precompute(cfg)` is the entry point (`kdcache precompute`, `kdcache.precompute.
run_precompute`): it checks the options, then runs
- `--partition auto`: this process's part from torchrun (`RANK`/`WORLD_SIZE`, device from
  `LOCAL_RANK`) or a Slurm array (`SLURM_ARRAY_TASK_ID`, `..._COUNT`, `..._MIN`, `..._STEP`);
  both at once (torchrun inside each array task) give array_index * WORLD_SIZE + RANK;
- `--devices 0,1,2,3`: `launch`, one subprocess per device over partitions, then a merge;
- `--merge-parts N`: `merge_parts`, the N complete partition stores merged into the store an
  unpartitioned run writes;
- otherwise `run.run_one` (the whole run, or an explicit `--partition i/N`).

`launch(cfg)` starts one subprocess per device with `CUDA_VISIBLE_DEVICES=<id>` and
`partition=(i, N)`, waits for all of them, and merges the N partition stores with
`merge_parts`: same key (`<out_root>/<store_key>`, no partition in its meta), same records in
the same order. Why processes and not threads or torchrun: a teacher per GPU needs no
communication, a process per device isolates CUDA contexts and memory, and a failed device
only loses its own partition (every partition resumes from its last committed shard on the
next launch).

`merge_parts(cfg)` is also the last step after partitions ran elsewhere (a Slurm array,
torchrun). It needs no GPU and loads no model: it tokenizes the dataset to recompute the keys
and the single run's write order, checks that all N partition stores are complete, and
interleaves their groups in that order (each partition is written in the same order
restricted to its examples), so the merged shards are cut exactly where the single run cuts
them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from .data import DataStats
from .models import resolve_device
from .partitions import partition_plan, partitioned, unpartitioned
from .run import (
    PrecomputeConfig,
    cache_hit,
    check_data,
    default_url,
    iter_batches,
    log,
    out_option,
    prepare,
    report_data,
    run_one,
)
from .storeapi import NoStoreError, StoreMeta, check_output, merge, open_store, store_key

__all__ = ["launch", "merge_parts", "parse_devices", "partition_from_env", "run_precompute"]


def run_precompute(cfg: PrecomputeConfig) -> str:
    """Score and store; returns the store URL. Re-running with identical inputs is a no-op.
    The entry point: the config is checked here, once (`validated()`), and `--partition auto`
    resolved from the environment; everything below reads that frozen copy."""
    cfg = cfg.validated()
    if cfg.partition == "auto":
        part, device = partition_from_env(os.environ)
        if device is not None and cfg.device == "auto":
            cfg = dataclasses.replace(cfg, device=device)
        cfg = dataclasses.replace(cfg, partition=part)
        log.info("--partition auto: part %d/%d on device %s", part[0], part[1], cfg.device)
    if cfg.devices:
        return launch(cfg)
    if cfg.merge_parts:
        return merge_parts(cfg)
    return run_one(cfg)


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    v = env.get(name)
    if v is None or not v.strip():
        if default is None:
            raise ValueError(f"--partition auto: {name} is not set")
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"--partition auto: {name}={v!r} is not an integer") from None


def partition_from_env(env: Mapping[str, str]) -> tuple[tuple[int, int], str | None]:
    """(index, count) of this process for `--partition auto`, and the CUDA device torchrun's
    LOCAL_RANK picks (None outside torchrun or without CUDA).

    Slurm array: index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP,
    count = SLURM_ARRAY_TASK_COUNT (so --array=1-8 or --array=0-14:2 work; a list such as
    --array=1,3,7 has no fixed step and is refused). torchrun: RANK of WORLD_SIZE. Both: the
    array task's WORLD_SIZE processes split its share (index = array_index * WORLD_SIZE + RANK).
    """
    parts: list[tuple[int, int]] = []
    if env.get("SLURM_ARRAY_TASK_ID", "").strip():
        tid = _env_int(env, "SLURM_ARRAY_TASK_ID")
        lo = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP", 1)
        spanned = None  # tasks between MIN and MAX: a list (--array=1,3,7) has fewer
        if env.get("SLURM_ARRAY_TASK_MAX", "").strip():
            spanned = (_env_int(env, "SLURM_ARRAY_TASK_MAX") - lo) // max(step, 1) + 1
        count = (_env_int(env, "SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in env
                 else spanned if spanned is not None  # older Slurm: from the bounds
                 else _env_int(env, "SLURM_ARRAY_TASK_COUNT"))
        if (step < 1 or count < 1 or (spanned is not None and spanned != count)
                or (tid - lo) % step or not 0 <= (tid - lo) // step < count):
            raise ValueError(
                f"--partition auto: Slurm array task {tid} is not one of {count} evenly spaced "
                f"tasks from {lo} by {step} (SLURM_ARRAY_TASK_MIN/STEP/COUNT); submit a range "
                "(--array=0-7 or --array=0-14:2, not a list), or pass --partition i/N")
        parts.append(((tid - lo) // step, count))
    device = None
    if env.get("WORLD_SIZE", "").strip() or env.get("RANK", "").strip():
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"--partition auto: RANK={rank} is not in [0, WORLD_SIZE={world})")
        parts.append((rank, world))
        device = _local_device(_env_int(env, "LOCAL_RANK", rank))
    if not parts:
        raise ValueError(
            "--partition auto found neither torchrun (RANK, WORLD_SIZE) nor a Slurm array "
            "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) in the environment; run it under "
            "torchrun or in an `sbatch --array` job, or pass --partition i/N")
    index, count = 0, 1
    for i, n in parts:  # array task first, then the torchrun rank inside it
        index, count = index * n + i, count * n
    return (index, count), device


def _local_device(local_rank: int) -> str | None:
    """torchrun does not set CUDA_VISIBLE_DEVICES: LOCAL_RANK picks the GPU of this process."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    if local_rank < n:
        return f"cuda:{local_rank}"
    if n == 1:  # the launcher already restricted each process to its GPU
        return "cuda:0"
    raise ValueError(f"--partition auto: LOCAL_RANK={local_rank} but only {n} CUDA devices are "
                     "visible; start at most that many processes per node")


def parse_devices(devices: list[str]) -> list[str]:
    """["0", "cuda:1", "all", "cpu"] -> CUDA ordinals as strings, or "cpu" entries."""
    out: list[str] = []
    for d in devices:
        d = str(d).strip().lower()
        if d == "all":
            import torch

            n = torch.cuda.device_count()
            if n == 0:
                raise ValueError("devices=all: no CUDA device is visible; list devices "
                                 "explicitly (e.g. cpu,cpu) or check CUDA_VISIBLE_DEVICES")
            out += [str(i) for i in range(n)]
        elif d == "cpu":
            out.append("cpu")
        elif d.removeprefix("cuda:").isdigit():
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(d.removeprefix("cuda:")) >= n:
                raise ValueError(f"--devices: CUDA device {d} is not visible here ({n} are: "
                                 f"{', '.join(map(str, range(n))) or 'none'}); use --devices "
                                 "cpu,cpu on a machine without GPUs")
            out.append(d.removeprefix("cuda:"))
        else:
            raise ValueError(f"devices: cannot parse {d!r}; use CUDA ordinals (0,1,2,3), "
                             "cuda:N, all, or cpu")
    kinds = {d == "cpu" for d in out}
    if len(kinds) > 1:
        raise ValueError(f"devices {devices}: mix of cpu and CUDA devices; the teacher's dtype "
                         "(part of the store key) would differ between partitions")
    if not out:
        raise ValueError("devices: empty list")
    return out


def _worker_cfg(cfg: PrecomputeConfig, i: int, n: int, device: str) -> PrecomputeConfig:
    # the data was checked by the launcher: a worker streams it once (ids still checked).
    # The worker process reads this from a file and checks it at its own entry (`run_one`).
    return dataclasses.replace(cfg, partition=(i, n), devices=None, merge_parts=None, out=None,
                               device="cpu" if device == "cpu" else "cuda", progress=False,
                               check_data=False)


def launch(cfg: PrecomputeConfig) -> str:
    """Run one partition per device in its own process, then merge; returns the store URL.
    An entry point: checks `cfg` unless `run_precompute` did."""
    cfg = cfg.validated()
    devices = parse_devices(cfg.devices or [])
    n = len(devices)
    # the dtype in the key follows the device the workers use, not this process's device
    base = dataclasses.replace(cfg, devices=None, device="cpu" if devices[0] == "cpu" else "cuda")
    prep = prepare(base)
    meta = prep.meta
    url = default_url(cfg, meta)
    if cache_hit(url, meta):
        log.info("%s: complete store with these inputs already exists; nothing to do", url)
        return url
    stats = check_data(base, prep) if cfg.check_data else None
    check_output(url, out_option(cfg))
    check_output(cfg.out_root, "--out-root", may_hold="anything")  # the workers' logs
    if stats is not None:
        report_data(base, stats)
    logdir = _logdir(cfg, meta)
    procs: list[tuple[int, str, subprocess.Popen, str]] = []
    try:
        for i, dev in enumerate(devices):
            wcfg = _worker_cfg(base, i, n, dev)
            pmeta = partitioned(meta, (i, n), partition_plan(base))
            if cache_hit(default_url(wcfg, pmeta), pmeta):
                continue  # this partition finished in an earlier launch
            spec = os.path.join(logdir, f"part-{i}-of-{n}.json")
            with open(spec, "w") as f:
                json.dump(dataclasses.asdict(wcfg), f)
            env = dict(os.environ)
            if dev == "cpu":
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
            else:
                env["CUDA_VISIBLE_DEVICES"] = dev
            logf = os.path.join(logdir, f"part-{i}-of-{n}.log")
            with open(logf, "wb") as out:
                p = subprocess.Popen([sys.executable, "-m", "kdcache.precompute.launch", spec],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
            procs.append((i, dev, p, logf))
            log.info("partition %d/%d on device %s: pid %d, log %s", i, n, dev, p.pid, logf)
        failed = []
        for i, dev, p, logf in procs:
            rc = p.wait()
            if rc != 0:
                failed.append(f"partition {i}/{n} on device {dev} exited {rc} "
                              f"({_last_line(logf)}; log {logf})")
    finally:  # interrupted (Ctrl-C, an error above): stop the workers we started
        for _, _, p, _ in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    if not failed:
        import shutil

        shutil.rmtree(logdir, ignore_errors=True)
    if failed:
        raise ValueError("; ".join(failed) + "; committed shards are kept: fix the cause and "
                         "re-run the same command to resume")
    return merge_parts(dataclasses.replace(base, merge_parts=n))


def _logdir(cfg: PrecomputeConfig, meta: StoreMeta) -> str:
    root = cfg.out_root
    if "://" in root and not root.startswith("file://"):
        return tempfile.mkdtemp(prefix="kdcache-launch-")
    d = os.path.join(root.removeprefix("file://"), f".launch-{store_key(meta)}")
    os.makedirs(d, exist_ok=True)
    return d


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else "no output"


def _candidates(cfg: PrecomputeConfig, meta: StoreMeta) -> list[StoreMeta]:
    """With dtype="auto" the dtype in the key depends on the machine (bf16 on GPU, fp32 on CPU),
    and a merge usually runs on a CPU node: the partitions' dtype is taken from what exists."""
    candidates = [meta]
    if cfg.dtype == "auto" and meta.options.get("dtype") is not None:
        for dt in ("bfloat16", "float32", "float16"):
            if dt != meta.options["dtype"]:
                m = meta.to_dict()
                m["options"] = dict(m["options"], dtype=dt)
                candidates.append(StoreMeta.from_dict(m))
    return candidates


def _find_parts(cfg: PrecomputeConfig, meta: StoreMeta, n: int) -> tuple[StoreMeta, list[Any]]:
    """The N complete partition stores (default URLs under out_root) and the full meta."""
    root = cfg.out_root.rstrip("/")
    for full in _candidates(cfg, meta):
        urls = [f"{root}/{store_key(partitioned(full, (i, n), partition_plan(cfg)))}" for i in range(n)]
        stores: list[Any] = []
        for u in urls:
            try:
                stores.append(open_store(u))
            except NoStoreError:
                stores.append(None)
        if all(s is None for s in stores):
            continue
        problems = []
        for i, (u, st) in enumerate(zip(urls, stores, strict=True)):
            if st is None:
                problems.append(f"partition {i}/{n} has no store at {u}")
            elif not st.complete:
                problems.append(f"partition {i}/{n} at {u} is incomplete")
        if problems:
            raise ValueError("; ".join(problems) + f"; run (or resume) `kdcache precompute` with "
                             f"the same settings and --partition i/{n} for those, then merge again")
        return full, stores
    raise ValueError(f"no partition store of this run under {root} (looked for --partition i/{n} "
                     f"of these exact settings); run the partitions first, with the same config "
                     f"and --out-root")


def merge_parts(cfg: PrecomputeConfig) -> str:
    """Merge the complete partition stores i/N (N = cfg.merge_parts) into the full store.

    The store's merge writes them in the single run's batch plan, streamed again (the
    dataset is tokenized, no model loaded): batch b is the next len(b) groups of partition
    b mod N, checked id by id, so the merged store is written in the single run's order. It
    is written in place and resumable: a killed merge continues after its committed shards."""
    cfg = cfg.validated()  # an entry point: checks `cfg` unless its caller did
    n = int(cfg.merge_parts or 0)
    base = dataclasses.replace(cfg, merge_parts=None, devices=None, partition=None)
    prep = prepare(base)
    for cand in _candidates(base, prep.meta):
        if cache_hit(default_url(cfg, cand), cand):
            log.info("%s: already merged; nothing to do", default_url(cfg, cand))
            return default_url(cfg, cand)
    meta, parts = _find_parts(base, prep.meta, n)
    url = default_url(cfg, meta)
    stats = DataStats()

    def plan():  # (partition, example id) of each group, in the single run's write order
        for b, batch in enumerate(iter_batches(base, prep.source.groups(stats, check_ids=False))):
            for g in batch:
                yield b % n, g[0].example_id

    t0 = time.perf_counter()
    merge([st.url for st in parts], url, order=plan(), meta=meta, agree=unpartitioned,
          shard_records=cfg.shard_records, report_key="precompute_report",
          report=lambda: _merged_report(parts, stats, n), resume=True, option=out_option(cfg))
    log.info("merged %d partitions into %s in %.1fs", n, url, time.perf_counter() - t0)
    if not cfg.keep_parts:
        for st in parts:
            _remove_store(st.url)
    return url


def _merged_report(parts: list[Any], stats: DataStats, n: int) -> dict[str, Any]:
    rep: dict[str, Any] = {"rows": stats.rows, "truncated": stats.truncated,
                           "skipped": stats.skipped, "merged_partitions": n}
    for key in ("tokens", "topk_mass", "ref_paper_abs_err"):
        rep[f"sum_{key}"] = sum(float(st.manifest.get("precompute_report", {}).get(f"sum_{key}", 0.0))
                                for st in parts)
    if any("sum_tokens" in st.manifest.get("precompute_report", {}) for st in parts):
        tokens = max(rep["sum_tokens"], 1.0)
        rep["mean_topk_mass"] = rep["sum_topk_mass"] / tokens
        rep["mean_ref_paper_abs_err"] = rep["sum_ref_paper_abs_err"] / tokens
    return rep


def _remove_store(url: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.rm(path, recursive=True)
    except OSError as e:  # the merged store is complete; a leftover part only costs disk
        log.warning("could not remove partition store %s (%s)", url, e)


def _worker(spec_path: str) -> int:
    """Subprocess entry: run one partition from a JSON PrecomputeConfig."""
    import torch

    with open(spec_path) as f:
        d = json.load(f)
    if d.get("partition") is not None:
        d["partition"] = tuple(d["partition"])
    cfg = PrecomputeConfig(**d)
    if resolve_device(cfg.device).type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(run_one(cfg), flush=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
