"""verify, list_stores, gc, merge, schema versions, and s3:// against a local moto server."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from test_store_util import make_groups, make_meta, write_store

from kdcache.store import SCHEMA_VERSION, NoStoreError, StoreWriter, open_store
from kdcache.store.admin import gc, list_stores, merge
from kdcache.store.verify import verify


def test_verify_reports_missing_file_and_store(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta(codec="compact")
    write_store(url, meta, make_groups(12, meta, seed=8), shard_records=6)
    assert verify(url) == []
    s = open_store(url).manifest["shards"][1]
    rel = sorted(s["files"])[-1]
    os.remove(tmp_path / "s" / "shards" / s["name"] / rel)
    problems = verify(url)
    assert len(problems) == 1 and problems[0].startswith(f"{s['name']}: {rel}: missing")
    with pytest.raises(NoStoreError, match="no kdcache store"):
        verify(str(tmp_path / "nope"))


def test_verify_flips_restore(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta()
    write_store(url, meta, make_groups(10, meta, seed=9), shard_records=4)
    m = open_store(url).manifest
    files = [(s["name"], rel) for s in m["shards"] for rel in s["files"]]
    rng = np.random.default_rng(1)
    for _ in range(12):
        name, rel = files[int(rng.integers(len(files)))]
        p = tmp_path / "s" / "shards" / name / rel
        orig = p.read_bytes()
        data = bytearray(orig)
        data[int(rng.integers(len(data)))] ^= 0xFF
        p.write_bytes(bytes(data))
        problems = verify(url)
        assert problems == [f"{name}: {rel}: sha256 mismatch (content corrupted)"]
        p.write_bytes(orig)
    assert verify(url) == []
    mp = tmp_path / "s" / "manifest.json"
    mj = json.loads(mp.read_text())
    mj["shards"][0]["n_records"] += 1
    mp.write_text(json.dumps(mj))
    assert verify(url) == ["manifest.json: failed its checksum (corrupted bytes in its meta, "
                           "store_key or shard list)"]


def test_list_stores_and_gc(tmp_path):
    meta = make_meta()
    write_store(str(tmp_path / "a"), meta, make_groups(5, meta), shard_records=3)
    w = StoreWriter(str(tmp_path / "team" / "b"), make_meta(k=4), shard_records=3)
    for g in make_groups(4, make_meta(k=4)):
        w.add_group(g)
    w.abort()  # an incomplete store with a buffered shard never written
    stores = {os.path.basename(s["url"]): s for s in list_stores(str(tmp_path))}
    assert set(stores) == {"a", "b"}
    assert stores["a"]["complete"] and not stores["b"]["complete"]
    assert stores["a"]["n_records"] == len(open_store(str(tmp_path / "a")))
    assert stores["a"]["models"] == meta.models and stores["a"]["key"]
    # garbage: a dead shard, a stray file in a live shard, a temp manifest
    dead = tmp_path / "a" / "shards" / "shard-00042"
    dead.mkdir()
    (dead / "records.parquet").write_bytes(b"x" * 100)
    (tmp_path / "a" / "shards" / "shard-00000" / "stray").write_bytes(b"y" * 10)
    (tmp_path / "a" / ".manifest.json.tmp-123").write_bytes(b"z" * 5)
    assert gc(str(tmp_path))["removed"] == []  # too young by default
    dry = gc(str(tmp_path), min_age_s=0, dry_run=True)
    assert dry["bytes_freed"] == 115 and (dead / "records.parquet").exists()
    rep = gc(str(tmp_path), min_age_s=0)
    # three files, and the emptied folder of the dead shard (everything removed is listed)
    assert rep["bytes_freed"] == 115 and len(rep["removed"]) == 4
    assert str(dead) in rep["removed"]
    assert not dead.exists()
    assert verify(str(tmp_path / "a")) == [] and verify(str(tmp_path / "team" / "b")) == []


@pytest.mark.parametrize("codec", ["lossless", "compact"])
@pytest.mark.parametrize("version", [2, 3, SCHEMA_VERSION])
def test_merge_equals_single_run(tmp_path, codec, version):
    meta = make_meta(codec=codec)
    groups = make_groups(23, meta, seed=12, dtype=np.float64)
    v = {"_schema_version": version}
    # v2 inputs give a v2 output (their grid differs); v3 inputs are upgraded to the
    # current version (same grid, so the values re-encode exactly)
    out_version = 2 if version == 2 else SCHEMA_VERSION
    write_store(str(tmp_path / "single"), meta, groups, shard_records=6,
                _schema_version=out_version)
    write_store(str(tmp_path / "p0"), meta, groups[:9], shard_records=4, **v)
    write_store(str(tmp_path / "p1"), meta, groups[9:], shard_records=5, **v)
    merge([str(tmp_path / "p0"), str(tmp_path / "p1")], str(tmp_path / "m"), shard_records=6)
    a, b = open_store(str(tmp_path / "single")), open_store(str(tmp_path / "m"))
    assert b.schema_version == out_version
    assert [s["checksum"] for s in a.shards] == [s["checksum"] for s in b.shards]
    assert a.manifest["checksum"] == b.manifest["checksum"]
    if version != 2:
        return
    if codec == "compact":
        write_store(str(tmp_path / "p3"), meta, groups[9:], shard_records=5)
        with pytest.raises(ValueError, match="schema versions"):
            merge([str(tmp_path / "p0"), str(tmp_path / "p3")], str(tmp_path / "m4"))
    with pytest.raises(ValueError, match="meta differs"):
        other = make_meta(codec=codec)
        other.dataset = {"name": "another"}
        write_store(str(tmp_path / "k"), other, groups[:1])
        merge([str(tmp_path / "p0"), str(tmp_path / "k")], str(tmp_path / "m2"))
    with pytest.raises(ValueError, match="also in an earlier input"):
        merge([str(tmp_path / "p0"), str(tmp_path / "p0")], str(tmp_path / "m3"))


def test_schema_v1_store_still_readable(tmp_path):
    """A v1 manifest (no per-field codec, no shard_records) is read; appending is refused."""
    url = str(tmp_path / "s")
    meta = make_meta(codec="lossless")
    groups = make_groups(4, meta)
    write_store(url, meta, groups, _schema_version=3)  # v1 and v3 share the lossless files
    p = tmp_path / "s" / "manifest.json"
    m = json.loads(p.read_text())
    m["schema_version"] = 1
    m.pop("shard_records")
    for f in m["fields"].values():
        f.pop("codec")
    p.write_text(json.dumps(m))
    st = open_store(url)
    assert st.schema_version == 1 and len(st) == sum(len(g) for g in groups)
    with pytest.raises(ValueError, match="will not mix versions"):
        StoreWriter(url, meta)
    for bad in (99, "2", None):
        m["schema_version"] = bad
        p.write_text(json.dumps(m))
        with pytest.raises(ValueError, match="this kdcache reads versions"):
            open_store(url)


# --------------------------------------------------------------------------- s3 (moto)
@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("kdcache-test")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_s3_round_trip_resume_verify(s3_endpoint, monkeypatch, tmp_path):
    import fsspec

    # route every s3:// URL to the local moto server
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    fsspec.AbstractFileSystem.clear_instance_cache()
    from kdcache.store import StreamReader

    url = "s3://kdcache-test/run1"
    meta = make_meta(codec="compact")
    groups = make_groups(14, meta, seed=13)
    with pytest.raises(RuntimeError):
        with StoreWriter(url, meta, shard_records=5) as w:
            for g in groups[:8]:
                w.add_group(g)
            raise RuntimeError("killed")
    w = StoreWriter(url, meta, shard_records=5)
    assert w.done_example_ids
    for g in groups:
        if g[0]["example_id"] not in w.done_example_ids:
            w.add_group(g)
    w.close()
    write_store(str(tmp_path / "local"), meta, groups, shard_records=5)
    st = open_store(url)
    assert st.manifest["checksum"] == open_store(str(tmp_path / "local")).manifest["checksum"]
    assert verify(url) == []
    ids = sorted(g[0]["example_id"] for g in StreamReader(st, prefetch=2))
    assert ids == sorted(g[0]["example_id"] for g in groups)
    assert {s["url"] for s in list_stores("s3://kdcache-test")} == {url}
