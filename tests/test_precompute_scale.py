"""Precompute at scale, on CPU: a real `kdcache precompute` process SIGKILLed at several
points and resumed, partitions merged (CLI), the one-process-per-device launcher, content
addressing (a re-run loads no model, `kdcache store ls`, training from a key)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.precompute import PrecomputeConfig, run_precompute
from kdcache.precompute import run as run_mod
from kdcache.store import open_store
from kdcache.train.tiny import save_tiny

runner = CliRunner()
WORDS = [str(d) for d in range(10)] + list("abcdef")
N_ROWS, SHARD = 60, 8  # 120 records -> 15 shards
WINDOW = 16  # rows per length-bucketing window: the 60 rows stream in 4 windows


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scale")
    save_tiny(d / "dpo", seed=1)
    save_tiny(d / "ref", seed=2)
    rnd = random.Random(0)
    rows = [{"id": f"e{i}", "prompt": "sort " + " ".join(rnd.choices(WORDS, k=rnd.randint(1, 6))),
             "chosen": " ".join(rnd.choices(WORDS, k=rnd.randint(1, 20))),
             "rejected": " ".join(rnd.choices(WORDS, k=rnd.randint(1, 20)))} for i in range(N_ROWS)]
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def _args(work: Path, *extra: str) -> list[str]:
    return ["precompute", "--teacher", str(work / "dpo"), "--reference", str(work / "ref"),
            "--data", str(work / "prefs.jsonl"), "--k", "4", "--betas", "1,2",
            "--shard-records", str(SHARD), "--batch-tokens", "64", "--codec", "lossless",
            "--bucket-window", str(WINDOW), "--no-progress", *extra]


def _cfg(work: Path, **kw) -> PrecomputeConfig:
    base = dict(teacher=str(work / "dpo"), reference=str(work / "ref"),
                data=str(work / "prefs.jsonl"), k=4, betas=[1.0, 2.0], shard_records=SHARD,
                batch_tokens=64, codec="lossless", progress=False, bucket_window=WINDOW,
                out_root=str(work / "stores"))
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def single(work) -> dict:
    """The uninterrupted single-process run everything else must reproduce."""
    return json.loads((Path(run_precompute(_cfg(work))) / "manifest.json").read_text())


def _cli(*args: str):
    res = runner.invoke(cli.app, list(args))
    assert res.exit_code == 0, res.output
    return res


def _kdcache() -> list[str]:
    exe = Path(sys.executable).parent / "kdcache"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kdcache.cli"]


def _manifest(url: Path) -> dict | None:
    try:
        return json.loads((url / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _run_and_kill(cmd: list[str], out: Path, at_shards: int | None) -> tuple[int, str]:
    """Start the CLI; SIGKILL it once `at_shards` shards are committed (None: let it finish).
    Returns (exit code, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if at_shards is not None:
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            m = _manifest(out)
            if m is not None and len(m["shards"]) >= at_shards:
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    _, err = p.communicate(timeout=120)
    return p.returncode, err.decode()


def test_sigkilled_process_resumes_to_the_same_store(work, single):
    """Kill before any shard, after the 1st, a middle and the last full shard; each re-run
    continues after the committed shards; the result equals the uninterrupted run."""
    out = work / "killed"
    cmd = _kdcache() + _args(work, "--out", str(out))
    n = len(single["shards"])
    assert n == 15
    kills, committed = 0, 0
    for at in (0, 1, n // 2, n - 1):
        m = _manifest(out)
        if m is not None and (m["complete"] or len(m["shards"]) >= max(at, 1)):
            continue  # a starved poll (busy machine) let the last run go past this point
        rc, err = _run_and_kill(cmd, out, at)
        if committed:  # the run resumed: it says so and kept what was committed
            assert f"resuming, {committed} of {N_ROWS} groups" in err, err[-2000:]
        m = _manifest(out)
        if rc == -signal.SIGKILL:
            kills += 1
            assert not m["complete"] and len(m["shards"]) >= at
        # whatever was committed is exactly a prefix of the uninterrupted run's shards
        assert [s["checksum"] for s in m["shards"]] == \
            [s["checksum"] for s in single["shards"][: len(m["shards"])]]
        committed = m["totals"]["n_groups"]
    assert kills >= 3, "the runs finished before they could be killed"
    rc, err = _run_and_kill(cmd, out, None)
    assert rc == 0, err[-2000:]
    final = _manifest(out)
    assert final["complete"]
    assert final["checksum"] == single["checksum"]
    assert [s["checksum"] for s in final["shards"]] == [s["checksum"] for s in single["shards"]]
    assert final["store_key"] == single["store_key"]
    # report sums count every committed group once, however often the run was killed
    got, want = final["precompute_report"], single["precompute_report"]
    assert got["sum_tokens"] == want["sum_tokens"]
    assert got["sum_topk_mass"] == pytest.approx(want["sum_topk_mass"], rel=1e-9)
    assert "uncommitted_sums" not in got
    a, b = open_store(str(out)), open_store(str(work / "stores" / single["store_key"]))
    assert [r["example_id"] for r in a] == [r["example_id"] for r in b]


def test_resume_rescores_the_runs_own_batches(work, monkeypatch, single):
    """A resumed run computes the uninterrupted run's batches (so its numbers are equal on
    any backend), not a re-batching of what is left."""
    from kdcache.precompute import engine

    real = engine.score_sequences
    seen: list[list[str]] = []

    def spy(seqs, *a, **kw):
        if seen is crash and len(seen) == 5:
            raise RuntimeError("simulated crash")
        seen.append([s.example_id for s in seqs])
        return real(seqs, *a, **kw)

    monkeypatch.setattr(engine, "score_sequences", spy)
    plan, crash, resumed = [], [], []
    seen = plan
    run_precompute(_cfg(work, out=str(work / "rb-full")))
    seen = crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_precompute(_cfg(work, out=str(work / "rb")))
    seen = resumed
    m = json.loads((Path(run_precompute(_cfg(work, out=str(work / "rb")))) / "manifest.json").read_text())
    assert m["checksum"] == single["checksum"]
    assert crash == plan[:5] and resumed == plan[-len(resumed):] and len(resumed) < len(plan)


@pytest.mark.parametrize("n", [2, 3])
def test_partitions_then_merge_equal_one_run(work, single, n):
    root = work / f"parts{n}"
    for i in range(n):
        url = _cli(*_args(work, "--out-root", str(root), "--partition", f"{i}/{n}")).stdout.strip()
        assert open_store(url).meta.options["partition"] == [i, n]
    res = _cli(*_args(work, "--out-root", str(root), "--merge-parts", str(n)))
    url = Path(res.stdout.strip().splitlines()[-1])
    m = _manifest(url)
    assert url.name == single["store_key"] and m["complete"]  # the unpartitioned key
    assert m["checksum"] == single["checksum"]  # same records, same shards
    assert m["precompute_report"]["rows"] == N_ROWS
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [url.name]
    # a single run with these inputs is now a cache hit
    assert run_precompute(_cfg(work, out_root=str(root))) == str(url)


@pytest.mark.parametrize("env,want", [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "4"},
     (1, 4)),  # --array=4-7
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),  # --array=2-8:2
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"},
     (6, 8)),  # no COUNT (old Slurm): from the bounds
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8)),  # torchrun, 2 nodes x 4
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "4"},
     (5, 12)),  # torchrun inside each array task
])
def test_partition_from_the_environment(env, want):
    from kdcache.precompute.launch import partition_from_env

    part, device = partition_from_env(env)
    assert part == want
    assert device is None or device.startswith("cuda")  # LOCAL_RANK picks a GPU when there is one


@pytest.mark.parametrize("env,needle", [
    ({}, "found neither torchrun (RANK, WORLD_SIZE) nor a Slurm array"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "7"}, "submit a range"),  # --array=1,3,7
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not in [0, WORLD_SIZE=2)"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
])
def test_partition_auto_errors(env, needle):
    from kdcache.precompute.launch import partition_from_env

    with pytest.raises(ValueError, match=re.escape(needle)):
        partition_from_env(env)


def test_partition_auto_then_merge_equal_one_run(work, single, monkeypatch):
    """Part 0 as a Slurm array task (--array=3-4), part 1 as torchrun rank 1 of 2: both
    `--partition auto`; `--merge-parts 2` gives the single run's store."""
    root = work / "auto"
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "RANK",
              "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    res = runner.invoke(cli.app, _args(work, "--out-root", str(root), "--partition", "auto"))
    assert res.exit_code == 2 and "found neither torchrun" in res.output
    assert not root.exists()
    with monkeypatch.context() as m:
        m.setenv("SLURM_ARRAY_TASK_ID", "3")
        m.setenv("SLURM_ARRAY_TASK_MIN", "3")
        m.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        url = _cli(*_args(work, "--out-root", str(root), "--partition", "auto")).stdout.strip()
        assert open_store(url).meta.options["partition"] == [0, 2]
    with monkeypatch.context() as m:
        m.setenv("RANK", "1")
        m.setenv("WORLD_SIZE", "2")
        m.setenv("LOCAL_RANK", "1")
        url = _cli(*_args(work, "--out-root", str(root), "--partition", "auto")).stdout.strip()
        assert open_store(url).meta.options["partition"] == [1, 2]
    res = _cli(*_args(work, "--out-root", str(root), "--merge-parts", "2"))
    m = _manifest(Path(res.stdout.strip().splitlines()[-1]))
    assert m["store_key"] == single["store_key"] and m["checksum"] == single["checksum"]


def test_a_failed_merge_parts_resumes_to_the_single_run(work, single, monkeypatch):
    """--merge-parts writes in place: a merge that fails midway keeps its committed shards
    (each a prefix of the single run's) and the re-run continues to the single run's store."""
    from kdcache.store import StoreWriter

    root = work / "mresume"
    for i in range(2):
        run_precompute(_cfg(work, out_root=str(root), partition=(i, 2)))
    real, calls = StoreWriter.add_group, {"n": 0}

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError("simulated full disk")
        return real(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "add_group", failing)
        with pytest.raises(OSError, match="simulated full disk"):
            run_precompute(_cfg(work, out_root=str(root), merge_parts=2))
    url = root / single["store_key"]
    m = _manifest(url)
    assert not m["complete"] and 0 < len(m["shards"]) < len(single["shards"])
    assert [s["checksum"] for s in m["shards"]] == \
        [s["checksum"] for s in single["shards"][: len(m["shards"])]]
    assert run_precompute(_cfg(work, out_root=str(root), merge_parts=2)) == str(url)
    m = _manifest(url)
    assert m["complete"] and m["checksum"] == single["checksum"]
    assert m["precompute_report"]["merged_partitions"] == 2


def test_merge_parts_names_a_missing_partition(work):
    root = work / "missing"
    _cli(*_args(work, "--out-root", str(root), "--partition", "0/2"))
    res = runner.invoke(cli.app, _args(work, "--out-root", str(root), "--merge-parts", "2"))
    assert res.exit_code == 2 and "partition 1/2 has no store" in res.output


def test_store_merge_cli_accepts_partitions(work, single):
    root = work / "smerge"
    parts = [_cli(*_args(work, "--out-root", str(root), "--partition", f"{i}/2")).stdout.strip().splitlines()[-1]
             for i in range(2)]
    out = work / "smerged"
    _cli("store", "merge", str(out), *reversed(parts))  # any order of the parts
    merged, whole = open_store(str(out)), open_store(str(work / "stores" / single["store_key"]))
    assert {(r["example_id"], r["role"]) for r in merged} == {(r["example_id"], r["role"]) for r in whole}
    assert merged.manifest["store_key"] == whole.manifest["store_key"]  # the unpartitioned run's key
    assert merged.tokenizer_files() == whole.tokenizer_files()  # carried over from the parts
    res = runner.invoke(cli.app, ["store", "merge", str(work / "half"), parts[0]])
    assert res.exit_code == 2 and "missing [1]" in res.output


def test_launcher_one_process_per_device(work, single, monkeypatch):
    root = work / "launch"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = _cli(*_args(work, "--out-root", str(root), "--devices", "cpu,cpu"))
    url = Path(res.stdout.strip().splitlines()[-1])
    m = _manifest(url)
    assert url.name == single["store_key"] and m["complete"]
    assert m["checksum"] == single["checksum"]
    assert m["precompute_report"]["merged_partitions"] == 2
    # launching again is a no-op: no worker process is started
    import subprocess as sp

    monkeypatch.setattr(sp, "Popen", lambda *a, **k: pytest.fail("started a worker"))
    assert _cli(*_args(work, "--out-root", str(root), "--devices", "cpu,cpu")).stdout.strip() \
        .splitlines()[-1] == str(url)


def test_launcher_reports_a_failed_partition(work):
    res = runner.invoke(cli.app, _args(work, "--out-root", str(work / "lf"), "--devices", "cpu,gpu"))
    assert res.exit_code == 2 and "error: devices: cannot parse 'gpu'" in res.output


def test_rerun_is_a_no_op_without_loading_a_model(work, single, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a cache hit must not load a model")

    monkeypatch.setattr(run_mod, "load_model", boom)
    url = run_precompute(_cfg(work))
    assert Path(url).name == single["store_key"]
    assert open_store(url).manifest["checksum"] == single["checksum"]


def test_store_ls_lists_provenance(work, single):
    res = _cli("store", "ls", str(work / "stores"))
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    row = next(r for r in rows if r["key"] == single["store_key"])
    assert row["complete"] and row["n_records"] == 2 * N_ROWS
    assert set(row["models"]) == {"dpo", "ref"} and row["models"]["dpo"]["weights_sha256"]
    assert row["dataset"]["sha256"] and "topk_logprobs" in row["fields"]


def test_train_from_a_content_key(work, single, tmp_path):
    from kdcache.train.config import TrainConfig
    from kdcache.train.trainer import train

    res = train(TrainConfig(model=str(work / "ref"), store=single["store_key"],
                            store_root=str(work / "stores"), out=str(tmp_path / "run"),
                            objective="kd", max_steps=1, batch_groups=4, progress=False))
    assert res.steps == 1 and res.tokens > 0
