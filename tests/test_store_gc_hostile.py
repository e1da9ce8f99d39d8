"""`store gc` / `store ls` on roots holding stores someone else wrote (issue 19): gc removes
only what kdcache wrote (a marked temporary output, files a sound manifest does not
reference), never a complete store, never through a symlink or outside ROOT, lists every
removal, skips a damaged or locked store and still collects the others."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_store_util import make_groups, make_meta, write_store
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import StoreWriter, open_store
from kdcache.store import admin as admin_mod
from kdcache.store._io import temp_name
from kdcache.store.admin import gc, list_stores
from kdcache.store.lock import TEMP_MARKER, write_temp_marker
from kdcache.store.output import WRITE_PROBE
from kdcache.store.verify import verify

runner = CliRunner()
OLD = time.time() - 10 * 3600


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _snapshot(path) -> dict[str, tuple]:
    """Every entry under `path` (links not followed) with its kind, size and content hash."""
    out = {}
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else b""
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_size, hash(data),
                                             os.readlink(p) if os.path.islink(p) else None)
    return out


def _age(path) -> None:
    """Make everything under `path` ten hours old."""
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            os.utime(os.path.join(d, n), (OLD, OLD), follow_symlinks=False)
    os.utime(path, (OLD, OLD))


def _store(url: str, n: int = 4) -> None:
    meta = make_meta(fields=["token_logprob"])
    write_store(url, meta, make_groups(n, meta), shard_records=2)


def _gc_cli(root, *args) -> tuple[dict, list[str]]:
    res = runner.invoke(cli.app, ["store", "gc", str(root), *args])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return json.loads(res.stdout), [ln for ln in res.stderr.splitlines() if ln.strip()]


def test_a_complete_store_named_like_a_temp_output_survives(tmp_path):
    root = tmp_path / "root"
    _store(str(root / "exp.tmp-v2"))
    _store(str(root / f".exp{temp_name('x')[2:]}"))  # even a full temp_name-shaped name
    _age(root)
    before = _snapshot(root)
    rep, _ = _gc_cli(root, "--min-age", "0")
    assert rep["removed"] == [] and rep["bytes_freed"] == 0
    assert _snapshot(root) == before
    assert verify(str(root / "exp.tmp-v2")) == []


def test_a_killed_merge_output_is_removed_by_its_marker_not_its_name(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    # kdcache's own temporary output: marked, owner dead, an incomplete store inside
    ours = root / ".out.tmp-whatever"
    write_temp_marker(str(ours), "merge output", str(root / "out"))
    info = json.loads((ours / TEMP_MARKER).read_text())
    (ours / TEMP_MARKER).write_text(json.dumps({**info, "pid": _dead_pid()}))
    w = StoreWriter(str(ours), make_meta(fields=["token_logprob"]), shard_records=2)
    for g in make_groups(3, make_meta(fields=["token_logprob"])):
        w.add_group(g)
    w.abort()
    # the same name pattern without a marker: someone's data, left alone
    theirs = root / ".other.tmp-whatever"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    # a marker from another host: only once older than --min-age
    remote = root / "remote-merge"
    write_temp_marker(str(remote), "merge output", str(root / "r"))
    (remote / TEMP_MARKER).write_text(json.dumps({**info, "host": "elsewhere", "pid": 1}))
    rep, _ = _gc_cli(root)  # default --min-age: the remote one is young
    assert rep["removed"] == [str(ours)] and not ours.exists()
    assert (theirs / "notes.txt").read_text() == "mine" and remote.exists()
    _age(remote)
    rep, _ = _gc_cli(root)
    assert rep["removed"] == [str(remote)] and theirs.exists()


def test_a_marked_folder_holding_a_complete_store_is_kept(tmp_path):
    root = tmp_path / "root"
    _store(str(root / "s"))
    (root / "s" / TEMP_MARKER).write_text(json.dumps({"kind": "merge output", "pid": _dead_pid(),
                                                      "host": socket.gethostname()}))
    _age(root)
    rep, warnings = _gc_cli(root, "--min-age", "0")
    assert rep["removed"] == [] and verify(str(root / "s")) == []
    assert any("holds a complete store" in s for s in rep["skipped"])
    assert any("holds a complete store" in w for w in warnings)


def test_gc_never_follows_a_symlink_or_leaves_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    # outside ROOT: an empty folder, a folder with a file, and a store with garbage
    (outside / "empty-shard").mkdir(parents=True)
    (outside / "full-shard").mkdir()
    (outside / "full-shard" / "records.parquet").write_bytes(b"x" * 7)
    _store(str(outside / "store"))
    (outside / "store" / "shards" / "shard-00077").mkdir()
    (outside / "store" / "shards" / "shard-00077" / "junk").write_bytes(b"j")
    # inside: a store whose shards/ holds links out, a store whose shards/ IS a link out,
    # and a link to the outside store
    _store(str(root / "a"))
    os.symlink(outside / "empty-shard", root / "a" / "shards" / "shard-00050")
    os.symlink(outside / "full-shard" / "records.parquet",
               root / "a" / "shards" / "shard-00000" / "stray-link")
    _store(str(root / "b"))
    os.rename(root / "b" / "shards", outside / "b-shards")
    os.symlink(outside / "b-shards", root / "b" / "shards")
    (outside / "b-shards" / "shard-00099").mkdir()
    os.symlink(outside / "store", root / "linked-store")
    _age(tmp_path)
    before_out = _snapshot(outside)
    rep, _ = _gc_cli(root, "--min-age", "0")
    assert _snapshot(outside) == before_out  # nothing outside ROOT removed or changed
    assert all(p.startswith(str(root) + "/") for p in rep["removed"])
    assert rep["removed"] == []  # the only garbage was behind links
    links = [s for s in rep["skipped"] if "symlink" in s]
    assert any("stray-link" in s for s in links) and any("shard-00050" in s for s in links)
    assert os.path.islink(root / "a" / "shards" / "shard-00050")
    assert verify(str(root / "a")) == []


def test_a_hostile_manifest_is_reported_and_the_others_still_listed_and_collected(tmp_path):
    root = tmp_path / "root"
    _store(str(root / "good"))
    dead = root / "good" / "shards" / "shard-00042"
    dead.mkdir()
    (dead / "records.parquet").write_bytes(b"x" * 10)
    (root / "deep").mkdir()
    (root / "deep" / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)  # RecursionError
    (root / "outward").mkdir()  # sealed-looking, but names a shard outside the store
    m = json.loads((root / "good" / "manifest.json").read_text())
    m["shards"][0]["name"] = "../../outside"
    (root / "outward" / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.bin").write_bytes(b"k")
    _age(root)
    res = runner.invoke(cli.app, ["store", "ls", str(root)])
    assert res.exit_code == 0 and "Traceback" not in res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [os.path.basename(r["url"]) for r in rows] == ["good"] and "damaged" not in rows[0]
    warn = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert any("/deep:" in w and ("not valid JSON" in w or "nests JSON deeper" in w) for w in warn), warn
    assert any("outward" in w for w in warn), warn
    assert all(len(w) < 1000 for w in warn)
    rep, warn = _gc_cli(root, "--min-age", "0")
    assert rep["removed"] == [str(dead / "records.parquet"), str(dead)]
    assert {s.split(":")[0] for s in rep["skipped"]} == {str(root / "deep"), str(root / "outward")}
    assert (tmp_path / "outside" / "keep.bin").exists()
    assert sorted(r["url"] for r in list_stores(str(root)) if "damaged" in r) == \
        [str(root / "deep"), str(root / "outward")]


def test_a_temp_manifest_vanishing_mid_scan_is_not_an_error(tmp_path, monkeypatch):
    root = tmp_path / "root"
    _store(str(root / "s"))
    real_scan = admin_mod._scan
    ghost = str(root / "s" / temp_name("manifest.json"))

    def scan_then_writer_renames(fs, base):
        tree = real_scan(fs, base)
        tree[ghost] = ("file", 5, OLD)  # listed by the scan, renamed away by its writer
        return tree

    monkeypatch.setattr(admin_mod, "_scan", scan_then_writer_renames)
    rep = gc(str(root), min_age_s=0)
    assert rep["removed"] == [] and rep["skipped"] == []


def test_gc_skips_a_store_whose_writer_holds_the_lock(tmp_path):
    root = tmp_path / "root"
    meta = make_meta(fields=["token_logprob"])
    w = StoreWriter(str(root / "s"), meta, shard_records=2)
    groups = make_groups(6, meta)
    for g in groups[:3]:
        w.add_group(g)  # one shard committed, more to come
    nxt = root / "s" / "shards" / "shard-00099"  # as if in flight: unreferenced until committed
    nxt.mkdir(parents=True)
    (nxt / "records.parquet").write_bytes(b"in flight")
    rep, warn = _gc_cli(root, "--min-age", "0")
    assert rep["removed"] == [] and (nxt / "records.parquet").exists()
    assert any(f"pid {os.getpid()}" in s and "being written" in s for s in rep["skipped"])
    assert any("being written" in ln for ln in warn)
    for g in groups[3:]:
        w.add_group(g)
    w.close()
    assert verify(str(root / "s")) == []
    assert open_store(str(root / "s")).num_groups == 6
    rep, _ = _gc_cli(root, "--min-age", "0")  # the writer is done: now it is collected
    assert rep["removed"] == [str(nxt / "records.parquet"), str(nxt)]


def test_write_probe_leftovers(tmp_path, monkeypatch):
    """A full disk during the write probe leaves no probe; a killed run's probe (old or new
    name) neither blocks the re-run nor survives `gc --min-age 0` once its process is gone."""
    import errno

    from kdcache.store import check_output

    out = tmp_path / "out"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="not writable .*No space left"):
        check_output(str(out), "--out")
    monkeypatch.undo()
    assert not out.exists() or os.listdir(out) == []
    out.mkdir(exist_ok=True)
    (out / f".kdcache-write-probe-{_dead_pid()}").write_bytes(b"")  # an older kdcache's
    check_output(str(out), "--out")  # not someone else's data
    _store(str(tmp_path / "s"))
    probe = tmp_path / "s" / f".{WRITE_PROBE}.tmp-{'0' * 32}-{_dead_pid()}@{socket.gethostname()}"
    probe.write_bytes(b"")
    rep, _ = _gc_cli(tmp_path / "s", "--min-age", "0")
    assert rep["removed"] == [str(probe)] and verify(str(tmp_path / "s")) == []


def test_a_failed_shard_write_leaves_no_half_shard(tmp_path, monkeypatch):
    import errno

    from kdcache.store import _io, writer

    meta = make_meta(fields=["token_logprob"])
    url = tmp_path / "s"
    w = StoreWriter(str(url), meta, shard_records=2)
    groups = make_groups(4, meta)
    w.add_group(groups[0])
    w.add_group(groups[1])
    real = _io.write_files

    def full_after_one(fs, files):
        first = dict(list(files.items())[:1])
        real(fs, first)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_files", full_after_one)
    with pytest.raises(OSError, match="No space"):
        w.add_group(groups[2])
        w.add_group(groups[3])
    w.abort()
    assert sorted(os.listdir(url / "shards")) == ["shard-00000"]
    assert not [n for n in os.listdir(url) if ".tmp-" in n]
