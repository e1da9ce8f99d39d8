"""One writer per local store (issue 19): the lock beside the store names its holder, a
killed holder's lock is stale and taken over, a second writer (StoreWriter, merge,
precompute) gets one line naming the first, and the lock file is gone after a clean run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from reference_checks import one_error
from test_store_util import make_groups, make_meta, write_store
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import StoreLockedError, StoreWriter, open_store
from kdcache.store.lock import StoreLock, lock_holder, lock_path
from kdcache.train.tiny import save_tiny

runner = CliRunner()

HOLD = """
import sys, time
from kdcache.store.lock import StoreLock
lock = StoreLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    """Start a process that holds the lock of a path; yields (start(path) -> pid)."""
    procs = []

    def start(path) -> int:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _one_error(res, *needles: str) -> str:
    return one_error(res, *needles, stream="stderr", alone=True)


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta(fields=["token_logprob"])
    w = StoreWriter(url, meta, shard_records=2)
    info = json.loads(open(lock_path(url)).read())
    assert info["pid"] == os.getpid() and info["host"] and info["started"]
    with pytest.raises(StoreLockedError, match=rf"being written by .*pid {os.getpid()} on host"):
        StoreWriter(url, meta, shard_records=2)
    assert lock_holder(url)["pid"] == os.getpid()
    for g in make_groups(3, meta):
        w.add_group(g)
    w.close()
    assert not os.path.exists(lock_path(url)) and lock_holder(url) is None
    with StoreWriter(url, meta, shard_records=2) as again:  # resumes the complete store
        assert len(again.done_example_ids) == 3


def test_a_killed_holders_lock_is_stale_and_taken_over(tmp_path, holder):
    url = tmp_path / "s"
    pid = holder(url)
    assert lock_holder(str(url))["pid"] == pid
    with pytest.raises(StoreLockedError, match=f"pid {pid} "):
        StoreLock(str(url), wait_s=0).acquire()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert os.path.exists(lock_path(str(url)))  # left behind by the kill ...
    assert lock_holder(str(url)) is None  # ... but held by no one
    meta = make_meta(fields=["token_logprob"])
    write_store(str(url), meta, make_groups(2, meta), shard_records=2)
    assert open_store(str(url)).complete and not os.path.exists(lock_path(str(url)))


def test_a_symlink_at_the_lock_name_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not a lock")
    os.symlink(target, lock_path(str(tmp_path / "s")))
    with pytest.raises(OSError, match="a symlink stands at its name"):
        StoreWriter(str(tmp_path / "s"), make_meta(fields=["token_logprob"]))
    assert target.read_text() == "not a lock"


def test_merge_into_a_locked_output_is_one_line(tmp_path, holder):
    meta = make_meta(fields=["token_logprob"])
    write_store(str(tmp_path / "p"), meta, make_groups(3, meta), shard_records=2)
    pid = holder(tmp_path / "out")
    res = runner.invoke(cli.app, ["store", "merge", str(tmp_path / "out"), str(tmp_path / "p")])
    _one_error(res, f"pid {pid}", "being written", "write to another location")
    assert not (tmp_path / "out").exists()


def test_precompute_on_a_locked_out_is_one_line_before_any_model_loads(tmp_path, holder,
                                                                       monkeypatch):
    from kdcache.precompute import run as run_mod

    save_tiny(tmp_path / "teacher", seed=1, hidden=16, layers=1, heads=2)
    rows = [{"id": f"e{i}", "prompt": "sort 3 1", "chosen": "1 3", "rejected": "3 1"}
            for i in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    pid = holder(out)
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    t0 = time.monotonic()
    res = runner.invoke(cli.app, ["precompute", "--teacher", str(tmp_path / "teacher"),
                                  "--data", str(tmp_path / "d.jsonl"), "--k", "2",
                                  "--out", str(out), "--no-progress"])
    _one_error(res, f"pid {pid}", str(out))
    assert time.monotonic() - t0 < 60
    assert not out.exists() or not os.listdir(out)
