"""Integrity on the read path (issue 12): every flipped byte is caught before its values
reach a reader, with one line naming the store, shard and file; damaged manifests, missing
and truncated files; the CLI's error lines and exit codes."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from reference_checks import one_error
from test_store_util import make_groups, make_meta, write_store
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import ChecksumError, StreamReader, open_store
from kdcache.store.fastdecode import ChunkError, decode_array

runner = CliRunner()


def _flip(path, pos: int | None = None) -> bytes:
    """Flip one bit of the byte at `pos` (default: the middle) and return the original."""
    orig = path.read_bytes()
    data = bytearray(orig)
    i = len(data) // 2 if pos is None else pos
    data[i] ^= 0x10
    path.write_bytes(bytes(data))
    return orig


def _one_error_line(res, *needles: str) -> str:
    return one_error(res, *needles, stream="stderr", alone=True)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    meta = make_meta(codec="compact")
    url = str(tmp_path_factory.mktemp("integrity") / "s")
    groups = make_groups(5, meta, seed=31, max_t=6)
    write_store(url, meta, groups, shard_records=4)
    st = open_store(url)
    assert len(st.shards) == 2
    files = [(s["name"], rel) for s in st.shards for rel in sorted(s["files"])]
    return url, files


def test_every_flipped_byte_is_caught_by_every_reader(small_store):
    """One flipped byte in any file of any shard (each array chunk, records.parquet, every
    zarr.json): open_store + full read, StreamReader, `kdcache inspect` and `kdcache store
    verify` each fail naming that file — never silently different values."""
    url, files = small_store
    root = open_store(url).root
    assert len({rel.split("/")[1] for _, rel in files if rel.count("/") > 2}) == 7  # arrays
    rng = np.random.default_rng(0)
    for name, rel in files:
        path = Path(root) / "shards" / name / rel
        size = path.stat().st_size
        orig = _flip(path, int(rng.integers(size)))
        try:
            with pytest.raises(ChecksumError, match=f"shard {name} file {rel} ") as e:
                list(open_store(url))
            msg = str(e.value)
            assert "\n" not in msg and f"store {url}:" in msg
            assert f"kdcache store verify {url}" in msg and "corrupted bytes" in msg
            if name == files[0][0]:
                continue  # the first shard: the full read only (keeps the test fast)
            with pytest.raises(ChecksumError, match=f"shard {name} file {rel} "):
                for _ in StreamReader(url, prefetch=1):
                    pass
            _one_error_line(runner.invoke(cli.app, ["inspect", url]), name, rel)
            res = runner.invoke(cli.app, ["store", "verify", url])
            assert res.exit_code == 1
            assert res.stdout.strip() == f"{name}: {rel}: sha256 mismatch (content corrupted)"
        finally:
            path.write_bytes(orig)
    assert runner.invoke(cli.app, ["store", "verify", url]).stdout.strip() == "ok"


def _manifest(url):
    p = os.path.join(url, "manifest.json")
    return p, json.loads(open(p).read())


@pytest.mark.parametrize("edit", [
    "betas", "k", "store_key", "n_groups", "crc32c", "dataset", "truncate", "not_json_object",
])
def test_damaged_manifest_is_one_line_naming_it(small_store, tmp_path, edit):
    """meta.betas 2.0 → 3.0, meta.k, store_key, a shard's counts or a file's crc32c: the
    manifest checksum catches each before any value is read (and `kdcache train` stops)."""
    url, _ = small_store
    p, m = _manifest(url)
    orig = open(p, "rb").read()
    if edit == "betas":
        assert m["meta"]["betas"] == [0.5, 2.0]
        raw = orig.replace(b"2.0", b"3.0", 1)
    elif edit == "k":
        m["meta"]["k"] = 9
    elif edit == "store_key":
        m["store_key"] = "0" * 16
    elif edit == "n_groups":
        m["shards"][0]["n_groups"] -= 1
    elif edit == "crc32c":
        m["shards"][0]["files"]["records.parquet"]["crc32c"] = "00000000"
    elif edit == "dataset":
        m["meta"]["dataset"]["sha"] = "d1"
    if edit == "truncate":
        raw = orig[: len(orig) // 2]
    elif edit == "not_json_object":
        raw = b"[1, 2]"
    elif edit != "betas":
        raw = json.dumps(m, indent=1, sort_keys=True).encode()
    try:
        open(p, "wb").write(raw)
        with pytest.raises(ValueError, match="manifest.json") as e:
            open_store(url)
        assert "\n" not in str(e.value)
        line = _one_error_line(runner.invoke(cli.app, ["inspect", url]), "manifest.json")
        if edit not in ("truncate", "not_json_object"):
            assert isinstance(e.value, ChecksumError) and "failed its checksum" in line
        else:
            assert "truncated or corrupt" in line or "not a kdcache manifest" in line
        res = runner.invoke(cli.app, ["store", "verify", url])
        assert res.exit_code == 1 and res.stdout.startswith("manifest.json: ")
        # the trainer opens the store first: no training on the β = 2 values
        res = runner.invoke(cli.app, ["train", "--model", str(tmp_path / "no-model"), "--store",
                                      url, "--objective", "tvkd", "--tvkd-beta", "3",
                                      "--out", str(tmp_path / "run")])
        _one_error_line(res, "manifest.json")
    finally:
        open(p, "wb").write(orig)
    assert open_store(url).meta.betas == [0.5, 2.0]


def test_legacy_v3_store_is_checked_with_sha256_and_store_key(tmp_path):
    """v3 stores (no crc32c) stay readable; readers check the sha256 of what they fetch and
    the store_key against the meta, so flips are caught there too."""
    url = str(tmp_path / "v3")
    meta = make_meta(codec="compact")
    groups = make_groups(6, meta, seed=3, max_t=5)
    write_store(url, meta, groups, shard_records=100, _schema_version=3)
    st = open_store(url)
    assert st.schema_version == 3 and len(list(st)) == sum(len(g) for g in groups)
    assert "crc32c" not in st.shards[0]["files"]["records.parquet"]
    shard = tmp_path / "v3" / "shards" / "shard-00000"
    for rel in ("tokens.zarr/topk_ids/c/0/0", "records.parquet", "tokens.zarr/zarr.json"):
        orig = _flip(shard / rel)
        with pytest.raises(ChecksumError, match=f"file {rel} failed its sha256 check"):
            list(open_store(url))
        (shard / rel).write_bytes(orig)
    p, m = _manifest(url)
    orig = open(p, "rb").read()
    open(p, "wb").write(orig.replace(b"2.0", b"3.0", 1))
    with pytest.raises(ChecksumError, match="store_key .* does not match its meta"):
        open_store(url)
    open(p, "wb").write(orig)
    m["shards"][0]["n_tokens"] += 1
    open(p, "w").write(json.dumps(m))
    with pytest.raises(ChecksumError, match="entry of shard shard-00000 does not match"):
        open_store(url)


def test_missing_or_truncated_files_are_found_when_opening(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta(codec="compact")
    write_store(url, meta, make_groups(12, meta, seed=2, max_t=4), shard_records=5)
    base = tmp_path / "s" / "shards"
    chunk = base / "shard-00002" / "tokens.zarr" / "topk_ids" / "c" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-3])
    with pytest.raises(ChecksumError, match=r"shard shard-00002 file tokens.zarr/topk_ids/c/0/0 "
                                            r"is \d+ bytes but the manifest says"):
        open_store(url)
    chunk.unlink()
    with pytest.raises(ChecksumError, match="shard-00002 file tokens.zarr/topk_ids/c/0/0 is "
                                            "missing"):
        open_store(url)
    os.rename(base / "shard-00001", tmp_path / "elsewhere")
    res = runner.invoke(cli.app, ["inspect", url])
    _one_error_line(res, "shard-00001", "is missing (and", "more missing files")


def test_open_lists_shards_once_on_object_stores():
    """Missing files are found with one listing, not one request per shard."""
    import fsspec

    url = f"memory://kdcache-list-{uuid.uuid4().hex}"
    meta = make_meta(fields=["token_logprob"])
    write_store(url, meta, make_groups(30, meta, seed=4, max_t=3), shard_records=3)
    fs = fsspec.filesystem("memory")
    calls: dict[str, int] = {}
    originals = {}
    for name in ("find", "ls", "info", "exists", "isdir", "isfile", "cat", "cat_file", "glob"):
        originals[name] = getattr(fs, name)

        def spy(*a, _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return originals[_n](*a, **k)

        setattr(fs, name, spy)
    try:
        st = open_store(url)
    finally:
        for name, f in originals.items():
            setattr(fs, name, f)
    assert len(st.shards) >= 10
    assert calls.get("find") == 1 and calls.get("cat_file") == 1  # the listing, the manifest
    assert sum(calls.values()) <= 4, calls


def test_fastdecode_checks_crc32c_like_zarr(tmp_path):
    """Our decoder and plain zarr both refuse a chunk whose crc32c does not match."""
    import zarr

    meta = make_meta(codec="compact")
    write_store(str(tmp_path / "s"), meta, make_groups(5, meta, seed=6), shard_records=100)
    path = tmp_path / "s" / "shards" / "shard-00000" / "tokens.zarr"
    meta_json = json.loads((path / "topk_ids" / "zarr.json").read_text())
    assert meta_json["codecs"][-1] == {"name": "crc32c"}
    files = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    good = decode_array(files, "topk_ids")
    assert np.array_equal(good, zarr.open_group(str(path), mode="r")["topk_ids"][...])
    for pos in (0, len(files["topk_ids/c/0/0"]) // 2, -1):  # data, and the stored crc itself
        bad = bytearray(files["topk_ids/c/0/0"])
        bad[pos] ^= 1
        with pytest.raises(ChunkError, match=r"topk_ids/c/0/0 failed its crc32c check"):
            decode_array({**files, "topk_ids/c/0/0": bytes(bad)}, "topk_ids")
        (path / "topk_ids" / "c" / "0" / "0").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum"):
            zarr.open_group(str(path), mode="r")["topk_ids"][...]
    with pytest.raises(ChunkError, match="failed its crc32c"):
        decode_array({**files, "topk_ids/c/0/0": b"\x01\x02"}, "topk_ids")
