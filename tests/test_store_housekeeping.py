"""Store housekeeping through the CLI (issue 12): gc/ls on a missing root, `gc --min-age`,
stale temp manifests of killed writers, merges that fail leave nothing behind, `store
verify --repair` followed by a resume rewrites the damaged shards exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import fsspec
import pytest
from reference_checks import one_error
from test_store_util import make_groups, make_meta, write_store
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import StoreWriter, open_store
from kdcache.store._io import TMP_MARK, temp_name, temp_owner_dead
from kdcache.store.admin import gc, merge

runner = CliRunner()


def _one_error_line(res, *needles: str) -> str:
    return one_error(res, *needles, stream="stderr", alone=True, quiet_stdout=True)


def _tree(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs} \
        | {os.path.relpath(os.path.join(d, x), path) for d, xs, _ in os.walk(path) for x in xs}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("cmd", [["store", "gc"], ["store", "ls"]])
def test_gc_and_ls_on_a_missing_root(tmp_path, cmd):
    _one_error_line(runner.invoke(cli.app, [*cmd, str(tmp_path / "nope")]),
                    str(tmp_path / "nope"), "does not exist")
    (tmp_path / "file").write_text("x")
    _one_error_line(runner.invoke(cli.app, [*cmd, str(tmp_path / "file")]), "not a directory")


def test_gc_min_age(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta(fields=["token_logprob"])
    write_store(url, meta, make_groups(4, meta), shard_records=2)
    dead = tmp_path / "s" / "shards" / "shard-00077"
    dead.mkdir()
    (dead / "records.parquet").write_bytes(b"x" * 10)
    old = time.time() - 600
    os.utime(dead / "records.parquet", (old, old))
    young = tmp_path / "s" / "shards" / "shard-00000" / "stray"
    young.write_bytes(b"y")
    res = runner.invoke(cli.app, ["store", "gc", str(tmp_path), "--min-age", "900"])
    assert res.exit_code == 0 and json.loads(res.stdout)["removed"] == []
    res = runner.invoke(cli.app, ["store", "gc", str(tmp_path), "--min-age", "300"])
    assert json.loads(res.stdout)["removed"] == [str(dead / "records.parquet"), str(dead)]
    assert not dead.exists() and young.exists()
    _one_error_line(runner.invoke(cli.app, ["store", "gc", str(tmp_path), "--min-age", "-1"]),
                    "min_age_s=-1")
    assert young.exists()
    assert runner.invoke(cli.app, ["store", "verify", url]).stdout.strip() == "ok"


def test_stale_temp_manifests_removed_by_resume_and_gc(tmp_path):
    """A killed writer's `.manifest.json.tmp-*`: a resume removes it when its process is gone
    (or it is older than an hour); a live writer's temp file is never touched."""
    url = str(tmp_path / "s")
    meta = make_meta(fields=["token_logprob"])
    groups = make_groups(6, meta)
    w = StoreWriter(url, meta, shard_records=2)
    for g in groups[:3]:
        w.add_group(g)
    w.abort()
    root = tmp_path / "s"
    dead = root / temp_name("manifest.json").replace(f"-{os.getpid()}@", f"-{_dead_pid()}@")
    live = root / temp_name("manifest.json")  # this process: alive
    legacy_old = root / f".manifest.json{TMP_MARK}{uuid.uuid4().hex}"  # pre-v4 name
    legacy_new = root / f".manifest.json{TMP_MARK}{uuid.uuid4().hex}"
    for p in (dead, live, legacy_old, legacy_new):
        p.write_bytes(b"{")
    os.utime(legacy_old, (time.time() - 7200,) * 2)
    assert temp_owner_dead(dead.name) and not temp_owner_dead(live.name)
    w = StoreWriter(url, meta, shard_records=2)  # resume
    assert not dead.exists() and not legacy_old.exists()
    assert live.exists() and legacy_new.exists()
    for g in groups:
        if g[0]["example_id"] not in w.done_example_ids:
            w.add_group(g)
    w.close()
    # gc: a dead owner goes at any age; a young file of a live or unknown owner stays
    dead.write_bytes(b"{")
    rep = gc(str(tmp_path), min_age_s=60)
    assert rep["removed"] == [str(dead)] and live.exists() and legacy_new.exists()
    gc(str(tmp_path), min_age_s=0)
    assert not live.exists() and not legacy_new.exists()
    assert len(open_store(url)) == sum(len(g) for g in groups)


def _parts(tmp_path, n=2):
    meta = make_meta(codec="compact", fields=["topk_ids", "topk_logprobs"])
    groups = make_groups(8, meta, seed=17, max_t=5)
    urls = []
    for i in range(n):
        u = str(tmp_path / f"p{i}")
        write_store(u, meta, groups[i::n], shard_records=3)
        urls.append(u)
    return urls, groups


def test_failed_merge_leaves_nothing(tmp_path):
    urls, _ = _parts(tmp_path)
    before = _tree(tmp_path)
    out = tmp_path / "new" / "deeper" / "out"
    # fails mid-write: the second input repeats the first's example ids
    res = runner.invoke(cli.app, ["store", "merge", str(out), urls[0], urls[0]])
    _one_error_line(res, "also in an earlier input")
    assert _tree(tmp_path) == before  # no OUT, no temp sibling, no created parents
    # fails mid-write: a damaged shard of the second input
    chunk = tmp_path / "p1" / "shards" / "shard-00001" / "tokens.zarr" / "topk_ids" / "c" / \
        "0" / "0"
    assert len(open_store(urls[0]).shards) >= 2  # OUT has shards written when p1 fails
    orig = chunk.read_bytes()
    chunk.write_bytes(orig[:-1] + bytes([orig[-1] ^ 1]))
    res = runner.invoke(cli.app, ["store", "merge", str(out), *urls])
    _one_error_line(res, "shard-00001", "topk_ids/c/0/0", "crc32c")
    chunk.write_bytes(orig)
    assert _tree(tmp_path) == before
    # validated before writing: an existing output, an incomplete input, bad shard_records
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    _one_error_line(runner.invoke(cli.app, ["store", "merge", str(tmp_path / "taken"), *urls]),
                    "is a directory with other files (keep.txt)")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="shard_records must be >= 1"):
        merge(urls, str(out), shard_records=0)
    assert not (tmp_path / "new").exists()
    # and a good merge lands atomically at OUT
    res = runner.invoke(cli.app, ["store", "merge", str(out), *urls])
    assert res.exit_code == 0 and res.stdout.strip() == str(out)
    assert not [p for p in os.listdir(out.parent) if TMP_MARK in p]
    assert runner.invoke(cli.app, ["store", "verify", str(out)]).stdout.strip() == "ok"


def test_failed_merge_into_object_store_leaves_nothing(tmp_path):
    urls, _ = _parts(tmp_path)
    out = f"memory://kdcache-merge-{uuid.uuid4().hex}/out"
    with pytest.raises(ValueError, match="also in an earlier input"):
        merge([urls[0], urls[1], urls[0]], out)
    fs = fsspec.filesystem("memory")
    assert not fs.exists(out) or not fs.find(out)
    merge(urls, out)
    assert len(open_store(out)) == sum(len(open_store(u)) for u in urls)


def test_verify_repair_then_resume_rewrites_the_damaged_shards(tmp_path):
    meta = make_meta(codec="compact", fields=["topk_ids", "topk_logprobs", "token_logprob"])
    groups = make_groups(10, meta, seed=23, max_t=5)
    ref, url = str(tmp_path / "ref"), str(tmp_path / "s")
    write_store(ref, meta, groups, shard_records=4)
    write_store(url, meta, groups, shard_records=4)
    n = len(open_store(url).shards)
    assert n >= 4
    bad = tmp_path / "s" / "shards" / "shard-00002" / "records.parquet"
    orig = bad.read_bytes()
    bad.write_bytes(orig[:100] + bytes([orig[100] ^ 4]) + orig[101:])
    res = runner.invoke(cli.app, ["store", "verify", "--repair", url])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kept"] == 2 and out["dropped"] == [f"shard-{i:05d}" for i in range(2, n)]
    assert "shard-00002: records.parquet: sha256 mismatch" in res.stderr
    st = open_store(url)
    assert len(st.shards) == 2 and not st.complete
    # what the error message says to do: re-run the writer, it resumes and rewrites
    w = StoreWriter(url, meta, shard_records=4)
    for g in groups:
        if g[0]["example_id"] not in w.done_example_ids:
            w.add_group(g)
    w.close()
    a, b = open_store(ref).manifest, open_store(url).manifest
    assert a["checksum"] == b["checksum"] and b["complete"]
    assert runner.invoke(cli.app, ["store", "verify", url]).stdout.strip() == "ok"
    # a damaged manifest cannot be repaired: one line, nothing changed
    mp = tmp_path / "s" / "manifest.json"
    text = mp.read_text()
    mp.write_text(text.replace('"k": 8', '"k": 9'))
    _one_error_line(runner.invoke(cli.app, ["store", "verify", "--repair", url]),
                    "cannot be repaired")
    assert mp.read_text() == text.replace('"k": 8', '"k": 9')
