"""A store is untrusted input (issue 19, read side): sealed, self-consistent hostile stores
(every checksum recomputed, so they verify) are refused by every reader — open_store and a
full read, StreamReader, `kdcache inspect` and `kdcache store verify` — with one line naming
the problem, without reading anything outside the store, hanging or allocating what the
store declares.  The stores are built by tests/hostile_stores.py (shared with
benchmarks/bench_hostile.py, which measures memory and time under a cap)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_stores import CASES, SENTINEL, VOCAB, build, build_honest, manifest, seal, shard_dir
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.store import StreamReader, open_store
from kdcache.store.integrity import UnsafeStoreError, check_name, name_problem
from kdcache.store.verify import verify

runner = CliRunner()

# Every open() of this process (builtins.open, io.open, os.open) passes through the audit
# hook; a test arms it and asserts no path it recorded names a sentinel file.
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], str | bytes):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _one_line(e: BaseException, *needles: str) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _cli_error(args: list[str], *needles: str) -> str:
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and res.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _no_sentinel(opened: list[str]) -> None:
    assert not [p for p in opened if SENTINEL in p], [p for p in opened if SENTINEL in p]


#: cases refused when the store is opened (names, JSON depth, special files), and cases
#: whose files declare sizes that are refused when the shard is read (open_store succeeds:
#: the manifest and file sizes are consistent).
AT_OPEN = ["dotdot_file", "dotdot_shard", "absolute_name", "dev_zero", "fifo", "symlink_file",
           "symlink_shards", "deep_manifest"]
AT_READ = ["frame_bomb", "zarr_shape", "parquet_rows", "response_ids", "id_table",
           "id_outside_vocab", "token_id_outside_vocab", "deep_zarr_json"]


def test_cases_are_listed_once():
    assert sorted(AT_OPEN + AT_READ) == sorted(CASES)


def test_cases_are_sealed(tmp_path):
    """The hostile stores pass every checksum (what an attacker can do): the manifest
    checksum verifies and every file hashes to its manifest entry."""
    from kdcache.store.integrity import manifest_problems

    for name in ("frame_bomb", "parquet_rows", "id_table", "dotdot_file"):
        url, _, _ = build(name, tmp_path / name)
        m = manifest(url)
        assert manifest_problems(m, url) == []
        for s in m["shards"]:
            for rel, info in s["files"].items():
                if rel.startswith(("/", "..")):
                    continue
                from kdcache.store.fingerprint import hash_bytes

                data = (Path(url) / "shards" / s["name"] / rel).read_bytes()
                assert hash_bytes(data) == info["sha256"], rel


@pytest.mark.parametrize("case", AT_OPEN)
def test_refused_when_opened(tmp_path, case, opened):
    url, text, outside = build(case, tmp_path)
    opened.clear()
    with pytest.raises(ValueError) as e:
        open_store(url)
    _one_line(e.value, text)
    _cli_error(["inspect", url], text)
    _no_sentinel(opened)
    if case == "deep_manifest":  # a damaged manifest: verify lists it, as for a truncated one
        assert verify(url) == [f"manifest.json: {e.value}"]
        res = runner.invoke(cli.app, ["store", "verify", url])
        assert res.exit_code == 1 and res.stdout.strip() == f"manifest.json: {e.value}"
        return
    assert isinstance(e.value, UnsafeStoreError), type(e.value)
    with pytest.raises(ValueError) as e2:
        verify(url)  # the same verdict as the readers, not `ok` nor a list of missing files
    assert str(e2.value) == str(e.value) or case == "fifo" or case.startswith("symlink")
    _one_line(e2.value, text)
    _cli_error(["store", "verify", url], text)
    _no_sentinel(opened)


@pytest.mark.parametrize("case", AT_READ)
def test_refused_when_read(tmp_path, case, opened):
    """open_store succeeds (the manifest is consistent); the first read of the shard is
    refused before the declared size is allocated; `store verify` lists the problem
    (without decoding); inspect is one error line."""
    url, text, _ = build(case, tmp_path)
    opened.clear()
    st = open_store(url)
    with pytest.raises(ValueError) as e:
        list(st)
    msg = _one_line(e.value, text, f"store {url}: shard shard-00000 file ")
    with pytest.raises(ValueError, match="shard shard-00000 file"):
        for _ in StreamReader(url, prefetch=1):
            pass
    problems = verify(url)
    assert len(problems) == 1 and problems[0].startswith("shard-00000: ") and text in problems[0]
    _cli_error(["inspect", url], text)
    res = runner.invoke(cli.app, ["store", "verify", url])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stdout.strip() == problems[0]
    assert "\n" not in msg


def test_symlink_inside_the_store_is_read(tmp_path):
    """A symlink that stays inside the store is followed (a dedup tool may make them)."""
    url = build_honest(tmp_path / "s", n_groups=6)
    p = shard_dir(url) / "records.parquet"
    (Path(url) / "copy.parquet").write_bytes(p.read_bytes())
    p.unlink()
    p.symlink_to(Path(url) / "copy.parquet")
    assert len(list(open_store(url))) > 0
    assert verify(url) == []


def test_cli_subprocess_has_no_traceback(tmp_path):
    """`kdcache inspect` on a FIFO and on a frame bomb, as a separate process under a 2 GiB
    address-space cap: one `error:` line, exit 2, and it returns (never hangs)."""
    for case in ("fifo", "frame_bomb"):
        url, text, _ = build(case, tmp_path / case)
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30));"
                "from kdcache.cli import main; sys.argv = ['kdcache', 'inspect', sys.argv[1]];"
                "main()")
        res = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


@pytest.mark.parametrize("name,kind,ok", [
    ("shard-00000", "shard", True), ("shard-123456", "shard", True),
    ("shard-0000", "shard", False), ("shard-000001", "shard", False), ("..", "shard", False),
    ("../shard-00000", "shard", False), ("/abs", "shard", False), ("s3://b/x", "shard", False),
    ("shard-00000/", "shard", False), ("", "shard", False), (7, "shard", False),
    ("records.parquet", "file", True), ("tokens.zarr/zarr.json", "file", True),
    ("tokens.zarr/topk_ids/c/12/0", "file", True), ("tokens.zarr/topk_adv/zarr.json", "file", True),
    ("tokens.zarr/token_logprob/c/3", "file", True),
    ("tokens.zarr/topk_ids/c/01/0", "file", False), ("tokens.zarr/topk_ids/c/1/1", "file", False),
    ("tokens.zarr//zarr.json", "file", False), ("./records.parquet", "file", False),
    ("tokens.zarr/../records.parquet", "file", False), ("C:\\x", "file", False),
    ("file:///etc/passwd", "file", False), ("tokens.zarr/other/zarr.json", "file", False),
])
def test_name_rule(name, kind, ok):
    assert (name_problem(name, kind) is None) == ok
    if not ok:
        with pytest.raises(UnsafeStoreError, match="crafted or edited"):
            check_name(name, kind)


def test_every_name_the_writer_writes_passes(tmp_path):
    from test_store_util import make_groups, make_meta, write_store

    for codec in ("compact", "lossless"):
        url = str(tmp_path / codec)
        meta = make_meta(codec=codec)
        write_store(url, meta, make_groups(9, meta, seed=1), shard_records=4)
        for s in manifest(url)["shards"]:
            assert name_problem(s["name"], "shard") is None
            for rel in s["files"]:
                assert name_problem(rel, "file") is None, rel


def test_honest_store_values_unchanged(tmp_path):
    """The bounds change no value: an honest store reads back what was written."""
    from hostile_stores import honest_groups, honest_meta

    url = build_honest(tmp_path / "s", n_groups=12, seed=5)
    got = list(open_store(url))
    want = [r for g in honest_groups(12, honest_meta(), 5) for r in g]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for f in ("response_ids", "topk_ids", "topk_logprobs", "soft_value"):
            assert np.array_equal(np.asarray(a[f]), np.asarray(b[f])), f
    assert verify(url) == []


def test_record_lengths_must_match_the_manifest(tmp_path):
    """token_offset or n_tokens edited (sealed): refused before training sees the shard."""
    import pyarrow as pa
    from hostile_stores import records, rewrite_records

    url = build_honest(tmp_path / "s", n_groups=6)
    t = records(url)
    i = t.schema.get_field_index("token_offset")
    offs = t.column("token_offset").to_numpy().copy()
    offs[-1] += 1
    rewrite_records(url, t.set_column(i, t.schema.field(i), pa.array(offs, pa.int64())))
    with pytest.raises(ValueError, match="records.parquet does not match its manifest entry"):
        list(open_store(url))


@pytest.mark.parametrize("column, value", [("prompt_ids", -1), ("prompt_ids", VOCAB),
                                           ("response_ids", -7), ("response_ids", VOCAB)])
def test_token_ids_must_lie_in_the_vocabulary(tmp_path, column, value):
    """Both ends of [0, VOCAB) for both id columns; VOCAB - 1 (the last id) is read."""
    from hostile_stores import case_token_id_outside_vocab

    url, text = case_token_id_outside_vocab(tmp_path, tmp_path, column, value)
    with pytest.raises(ValueError, match=re.escape(text)):
        list(open_store(url))
    edge, _ = case_token_id_outside_vocab(tmp_path / "edge", tmp_path, column, VOCAB - 1)
    assert any(VOCAB - 1 in r[column].tolist() for r in open_store(edge))


def test_n_groups_and_roles_must_match(tmp_path):
    import pyarrow as pa
    from hostile_stores import records, rewrite_records

    url = build_honest(tmp_path / "s", n_groups=6)
    t = records(url)
    i = t.schema.get_field_index("role")
    rewrite_records(url, t.set_column(i, t.schema.field(i),
                                      pa.array(["x" * 5000] * t.num_rows, pa.string())))
    with pytest.raises(ValueError, match="holds a role of 5000 characters"):
        list(open_store(url))
    url2 = build_honest(tmp_path / "s2", n_groups=6)
    m = manifest(url2)
    m["shards"][0]["n_groups"] -= 1
    seal(url2, m)
    with pytest.raises(ValueError, match="groups but the manifest says"):
        list(open_store(url2))


def test_deep_manifest_in_a_root_is_one_line_for_ls(tmp_path):
    """`store ls` reports a store with a crafted manifest as damaged on stderr and still lists
    the others on stdout (read_manifest turns the RecursionError into a ValueError)."""
    build("deep_manifest", tmp_path / "a")
    build_honest(tmp_path / "b", n_groups=3)
    res = runner.invoke(cli.app, ["store", "ls", str(tmp_path)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    rows = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [Path(r["url"]).name for r in rows] == ["b"], rows
    assert "skipped" in res.stderr and "nests JSON deeper" in res.stderr, res.stderr
