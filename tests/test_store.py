"""Core store tests: round trips, commit protocol, resume, StreamReader, validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from test_store_util import ALL_FIELDS, make_groups, make_meta, write_store

from kdcache.store import (
    SCHEMA_VERSION,
    NoStoreError,
    StoreMeta,
    StoreWriter,
    StreamReader,
    hash_json,
    open_store,
    store_key,
    summarize,
)

HERE = os.path.dirname(__file__)


def assert_record_equal(a: dict, b: dict, exact: bool = True) -> None:
    for key, va in a.items():
        vb = b[key]
        if key == "reward":
            assert (va is None and vb is None) or np.float32(va) == np.float32(vb)
        elif va is None:
            assert vb is None, key
        elif isinstance(va, (np.ndarray, list)):
            va = np.asarray(va)
            assert vb.shape == va.shape, key
            if exact:
                assert np.array_equal(va.astype(vb.dtype), vb), key
        else:
            assert va == vb, key


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://kdcache-test-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- round trip
def test_round_trip_lossless_bitwise(url):
    meta = make_meta()
    groups = make_groups(25, meta, seed=1)
    write_store(url, meta, groups, shard_records=6)
    st = open_store(url)
    recs = [r for g in groups for r in g]
    assert len(st) == len(recs)
    assert st.num_tokens == sum(len(r["response_ids"]) for r in recs)
    assert st.meta == meta and st.fields == ALL_FIELDS and st.complete
    for i, (a, b) in enumerate(zip(recs, st, strict=True)):
        assert_record_equal(a, b)
        assert_record_equal(a, st[i])
    assert_record_equal(recs[-1], st[-1])
    with pytest.raises(IndexError):
        st[len(recs)]


def test_groups_contiguous_and_never_span_shards(url):
    meta = make_meta(fields=["token_logprob"])
    groups = make_groups(40, meta, seed=2)
    write_store(url, meta, groups, shard_records=5)
    st = open_store(url)
    got = list(st.groups())
    assert [[r["example_id"] for r in g] for g in got] == \
        [[r["example_id"] for r in g] for g in groups]
    for g_in, g_out in zip(groups, got, strict=True):
        for a, b in zip(g_in, g_out, strict=True):
            assert_record_equal(a, b)
    # every shard starts and ends on a group boundary
    ids_per_shard = []
    for s in range(len(st.shards)):
        sh = st.load_shard(s)
        ids_per_shard.append({sh.record(i)["example_id"] for i in range(len(sh))})
        assert sum(b - a for a, b in sh.group_bounds) == len(sh)
    for a in range(len(ids_per_shard)):
        for b in range(a + 1, len(ids_per_shard)):
            assert not ids_per_shard[a] & ids_per_shard[b]
    assert st.manifest["totals"]["n_groups"] == 40


def test_subset_of_fields_and_field_restricted_load(tmp_path):
    meta = make_meta(fields=["behavior_logprob"])
    groups = make_groups(5, meta, seed=3)
    write_store(str(tmp_path / "r"), meta, groups)
    st = open_store(str(tmp_path / "r"))
    assert set(st[0]) >= {"behavior_logprob", "response_ids"}
    assert "topk_ids" not in st[0]


def test_manifest_contents(tmp_path):
    meta = make_meta()
    write_store(str(tmp_path / "s"), meta, make_groups(10, meta), shard_records=4)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["complete"] is True
    assert m["store_key"] == store_key(meta)
    assert m["fields"]["soft_value"]["rows"] == "T+1"
    assert m["fields"]["topk_ids"]["shape"] == ["T", "K"]
    for s in m["shards"]:
        assert "records.parquet" in s["files"] and s["checksum"]
        for rel, info in s["files"].items():
            p = tmp_path / "s" / "shards" / s["name"] / rel
            assert p.stat().st_size == info["bytes"]
    assert m["totals"]["n_shards"] == len(m["shards"])


# --------------------------------------------------------------------------- crash + resume
def _checksums(url: str) -> tuple[str, list[str]]:
    m = open_store(url).manifest
    return m["checksum"], [s["checksum"] for s in m["shards"]]


def test_exception_in_context_commits_nothing_partial_and_resume_matches(url, tmp_path):
    meta = make_meta()
    groups = make_groups(30, meta, seed=4)
    ref_url = str(tmp_path / "ref")
    write_store(ref_url, meta, groups, shard_records=7)

    added = 0
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(url, meta, shard_records=7) as w:
            for g in groups:
                w.add_group(g)
                added += 1
                if added >= 10 and w._pending:  # a partial shard is buffered
                    raise RuntimeError("boom")
    st = open_store(url)
    assert not st.complete
    committed = {r["example_id"] for r in st}
    assert 0 < len(committed) < added
    # exactly the first whole shards of an uninterrupted run are visible
    n = len(st.shards)
    assert _checksums(url)[1] == _checksums(ref_url)[1][:n]
    assert committed == {g[0]["example_id"] for g in groups[: len(committed)]}

    w = StoreWriter(url, meta, shard_records=7)
    assert w.done_example_ids == committed
    for g in groups:
        if g[0]["example_id"] not in w.done_example_ids:
            w.add_group(g)
    w.close()
    assert _checksums(url) == _checksums(ref_url)
    for a, b in zip([r for g in groups for r in g], open_store(url), strict=True):
        assert_record_equal(a, b)


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store_util import make_groups, make_meta
    from kdcache.store import StoreWriter
    meta = make_meta()
    groups = make_groups(60, meta, seed=5)
    w = StoreWriter({url!r}, meta, shard_records=7)
    for i, g in enumerate(groups):
        if g[0]["example_id"] in w.done_example_ids:
            continue
        w.add_group(g)
        print(i, len(w.manifest["shards"]), flush=True)
        time.sleep(0.02)
    w.close()
    print("done", flush=True)
    """
)


def test_sigkill_mid_write_then_resume(tmp_path):
    url = str(tmp_path / "killed")
    ref_url = str(tmp_path / "ref")
    meta = make_meta()
    write_store(ref_url, meta, make_groups(60, meta, seed=5), shard_records=7)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=HERE, url=url))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        # kill once a few shards are committed and the current one is half full
        for line in proc.stdout:
            i, n_shards = map(int, line.split())
            if n_shards >= 2 and i % 7 == 3:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = open_store(url)
    assert not st.complete and len(st.shards) >= 2
    for s in range(len(st.shards)):  # every committed shard decodes
        st.load_shard(s, verify=True)
    # resume in a fresh process, exactly as a user would
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("done")
    assert _checksums(url) == _checksums(ref_url)
    assert open_store(url).complete


def test_resume_refuses_different_meta_and_resume_false(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta()
    w = StoreWriter(url, meta, shard_records=3)
    for g in make_groups(4, meta):
        w.add_group(g)
    w.abort()
    other = make_meta(k=16)
    with pytest.raises(ValueError, match=r"meta differs in \['k'\]"):
        StoreWriter(url, other)
    with pytest.raises(FileExistsError, match="resume=True"):
        StoreWriter(url, meta, resume=False)
    # code_version alone does not block resume
    m2 = make_meta()
    m2.code_version = "newer"
    StoreWriter(url, m2).close()


def test_missing_store_and_newer_schema(tmp_path):
    with pytest.raises(NoStoreError, match="run `kdcache precompute` first"):
        open_store(str(tmp_path / "nothing"))
    meta = make_meta()
    write_store(str(tmp_path / "s"), meta, make_groups(2, meta))
    p = tmp_path / "s" / "manifest.json"
    m = json.loads(p.read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    p.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer kdcache: upgrade"):
        open_store(str(tmp_path / "s"))


def test_uncommitted_files_are_invisible(tmp_path):
    url = str(tmp_path / "s")
    meta = make_meta()
    write_store(url, meta, make_groups(6, meta), shard_records=4)
    n = len(open_store(url))
    junk = tmp_path / "s" / "shards" / "shard-00099"
    junk.mkdir()
    (junk / "records.parquet").write_bytes(b"garbage")
    assert len(open_store(url)) == n


# --------------------------------------------------------------------------- validation
def _rec(meta: StoreMeta, **over):
    g = make_groups(1, meta, seed=7, max_t=5)[0][0]
    T = 4
    rng = np.random.default_rng(0)
    g.update(response_ids=np.arange(T), topk_ids=np.tile(np.arange(meta.k), (T, 1)),
             topk_logprobs=-np.sort(rng.random((T, meta.k)), axis=1),
             token_logprob=-rng.random(T), ref_topk_logprobs=-rng.random((T, meta.k)),
             ref_token_logprob=-rng.random(T), soft_value=rng.random((T + 1, 2)),
             behavior_logprob=-rng.random(T))
    g.update(over)
    return g


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"topk_logprobs": np.zeros((4, 5))}, r"'topk_logprobs' has shape \(4, 5\), expected \(4, 8\)"),
        ({"soft_value": np.zeros((4, 2))}, r"'soft_value' has shape \(4, 2\), expected \(5, 2\).*T\+1"),
        ({"token_logprob": np.zeros(3)}, r"'token_logprob' has shape \(3,\), expected \(4,\)"),
        ({"topk_ids": np.zeros((4, 8), np.float32)}, r"topk_ids: dtype float32 is not an integer"),
        ({"token_logprob": np.zeros(4, np.int64)}, r"'token_logprob' has dtype int64"),
        ({"token_logprob": np.full(4, np.nan)}, r"contains NaN"),
        ({"n_tokens": 9}, r"n_tokens=9 but len\(response_ids\)=4"),
        ({"role": "teacher"}, r"role='teacher' is not one of"),
        ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
        ({"is_terminal": 1}, r"is_terminal must be a bool"),
        ({"topk_ids": -np.ones((4, 8), np.int64)}, r"ids must lie in"),
    ],
)
def test_validation_errors(tmp_path, over, pattern):
    meta = make_meta()
    w = StoreWriter(str(tmp_path / "s"), meta)
    with pytest.raises(ValueError, match=pattern):
        w.add_group([_rec(meta, **over)])


def test_validation_group_rules(tmp_path):
    meta = make_meta(fields=["token_logprob"])
    w = StoreWriter(str(tmp_path / "s"), meta)
    r = _rec(make_meta())
    with pytest.raises(ValueError, match=r"not in StoreMeta.fields"):
        w.add_group([r])
    r = {k: v for k, v in r.items() if k in ("example_id", "role", "prompt_ids",
                                             "response_ids", "is_terminal", "token_logprob")}
    with pytest.raises(ValueError, match="empty list"):
        w.add_group([])
    with pytest.raises(ValueError, match="call add_group once per example_id"):
        w.add_group([r, dict(r, example_id="other")])
    w.add_group([r])
    with pytest.raises(ValueError, match="already added"):
        w.add_group([r])
    missing = {k: v for k, v in r.items() if k != "token_logprob"}
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['token_logprob'\]"):
        w.add_group([dict(missing, example_id="x")])


def test_meta_validation():
    with pytest.raises(ValueError, match="unknown per-token field"):
        StoreMeta(k=4, fields=["topk_idz"])
    with pytest.raises(ValueError, match="betas is empty"):
        StoreMeta(k=4, fields=["soft_value"])
    with pytest.raises(ValueError, match="k must be > 0"):
        StoreMeta(k=0, fields=["topk_ids"])
    m = make_meta()
    assert StoreMeta.from_dict(m.to_dict()) == m


def test_torch_and_float64_inputs(tmp_path):
    import torch

    meta = make_meta(fields=["topk_ids", "topk_logprobs"], k=3)
    r = {"example_id": "a", "role": "sft", "prompt_ids": torch.tensor([1, 2]),
         "response_ids": torch.tensor([3, 4]), "is_terminal": True,
         "topk_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
         "topk_logprobs": torch.tensor([[-0.1, -1.0, -2.0], [-0.2, -2.5, -3.0]],
                                       dtype=torch.bfloat16)}
    write_store(str(tmp_path / "s"), meta, [[r]])
    got = open_store(str(tmp_path / "s"))[0]
    assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
    assert np.array_equal(got["topk_logprobs"], r["topk_logprobs"].float().numpy())


# --------------------------------------------------------------------------- fingerprint
def test_store_key_ignores_code_version_and_order():
    a = make_meta()
    b = make_meta()
    b.code_version = "other"
    assert store_key(a) == store_key(b)
    c = make_meta(k=9)
    assert store_key(a) != store_key(c)
    assert hash_json({"a": 1, "b": [1.0, 2]}) == hash_json({"b": [1, 2], "a": 1})


def test_summary(tmp_path):
    meta = make_meta()
    groups = make_groups(8, meta)
    write_store(str(tmp_path / "s"), meta, groups)
    s = summarize(str(tmp_path / "s"))
    recs = [r for g in groups for r in g]
    lp = np.concatenate([r["topk_logprobs"] for r in recs]).astype(np.float64)
    assert s["n_sequences"] == len(recs) and s["n_tokens"] == len(lp)
    assert s["topk_mass_mean"] == pytest.approx(np.exp(lp).sum(1).mean(), rel=1e-6)
    assert sum(s["topk_mass_hist"]["counts"]) == len(lp)
    assert sum(s["roles"].values()) == len(recs)
    assert s["bytes_per_token"]["topk_ids"] > 0


# --------------------------------------------------------------------------- StreamReader
@pytest.fixture(scope="module")
def stream_store(tmp_path_factory):
    meta = make_meta(fields=["token_logprob", "topk_ids"])
    url = str(tmp_path_factory.mktemp("stream") / "s")
    groups = make_groups(47, meta, seed=11, max_t=4)
    write_store(url, meta, groups, shard_records=5)
    return url, [g[0]["example_id"] for g in groups]


def _ids(it) -> list[str]:
    return [g[0]["example_id"] for g in it]


def _loader(reader, workers):
    from torch.utils.data import DataLoader

    return DataLoader(reader, batch_size=None, num_workers=workers) if workers else reader


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_each_group_once_across_ranks_and_workers(stream_store, workers):
    url, all_ids = stream_store
    st = open_store(url)
    seen: list[str] = []
    for rank in range(2):
        r = StreamReader(st, seed=3, epoch=1, rank=rank, world_size=2, prefetch=1)
        got = _ids(_loader(r, workers))
        assert len(got) == len(r)
        seen += got
    assert sorted(seen) == sorted(all_ids)
    for g in StreamReader(st, fields=["token_logprob"], prefetch=0):
        assert "topk_ids" not in g[0] and "token_logprob" in g[0]
        break


def test_stream_shuffle_deterministic(stream_store):
    url, all_ids = stream_store
    st = open_store(url)
    a = _ids(StreamReader(st, seed=1, epoch=0))
    assert a == _ids(StreamReader(st, seed=1, epoch=0, prefetch=0))
    assert a != _ids(StreamReader(st, seed=1, epoch=1))
    assert a != _ids(StreamReader(st, seed=2, epoch=0))
    assert sorted(a) == sorted(all_ids) and a != all_ids
    assert _ids(StreamReader(st, shuffle=False)) == all_ids
    # per-shard group order does not depend on world size
    one = StreamReader(st, seed=1, epoch=0)
    two = StreamReader(st, seed=1, epoch=0, rank=1, world_size=2)
    assert all(np.array_equal(one.group_order(s), two.group_order(s))
               for s in range(len(st.shards)))


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_state_dict_resume(stream_store, workers):
    url, _ = stream_store
    st = open_store(url)
    full = _ids(_loader(StreamReader(st, seed=5, epoch=2), workers))
    for cut in (0, 1, 9, len(full) - 1, len(full)):
        r = StreamReader(st, seed=5, epoch=2)
        it = iter(_loader(r, workers))
        taken = [next(it)[0]["example_id"] for _ in range(cut)]
        del it
        state = r.state_dict(consumed=len(taken) if workers else None)
        assert state["consumed"] == cut and state["epoch"] == 2
        r2 = StreamReader(st, seed=5)
        r2.load_state_dict(state)
        rest = _ids(_loader(r2, workers))
        if cut == len(full):  # saved at the epoch boundary: the next epoch, from its start
            assert rest == _ids(_loader(StreamReader(st, seed=5, epoch=3), workers))
        else:
            assert taken + rest == full, cut
    with pytest.raises(ValueError, match="seed"):
        StreamReader(st, seed=6).load_state_dict(state)


@pytest.mark.parametrize("workers, window", [(0, 1), (0, 3), (2, 3)])
def test_stream_resume_saved_exactly_at_epoch_boundary(stream_store, workers, window):
    """A checkpoint taken right after the last group of an epoch (before the trainer's
    set_epoch) resumes at the start of the next epoch, as the uninterrupted run goes on."""
    url, _ = stream_store
    st = open_store(url)

    def run(reader, n):  # the trainer's loop: epochs back to back until n groups
        out: list[str] = []
        while True:
            for g in _loader(reader, workers):
                out.append(g[0]["example_id"])
                if len(out) == n:
                    return out
            reader.set_epoch(reader.epoch + 1)

    n = len(StreamReader(st, seed=9, shuffle_window=window))
    whole = run(StreamReader(st, seed=9, shuffle_window=window), 2 * n + 5)
    first = StreamReader(st, seed=9, shuffle_window=window)
    assert run(first, n) == whole[:n]
    state = first.state_dict(consumed=n if workers else None)
    assert state["epoch"] == 0 and state["consumed"] == n  # the epoch is used up
    resumed = StreamReader(st, seed=9, shuffle_window=window)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and resumed.consumed == 0
    assert run(resumed, n + 5) == whole[n:]
    with pytest.raises(ValueError, match="consumed=48 groups but this rank's epoch holds 47"):
        resumed.load_state_dict({**state, "consumed": n + 1})


def test_worker_replay():
    # lengths 3,1,2: polling w0,w1,w2,w0,w2,w0
    assert StreamReader._replay(0, [3, 1, 2]) == ([0, 0, 0], [0, 1, 2])
    assert StreamReader._replay(1, [3, 1, 2]) == ([1, 0, 0], [1, 2, 0])
    assert StreamReader._replay(4, [3, 1, 2]) == ([2, 1, 1], [2, 0])
    assert StreamReader._replay(6, [3, 1, 2]) == ([3, 1, 2], [])
    assert StreamReader._replay(5, [3, 0, 2]) == ([3, 0, 2], [])


def test_stream_throughput_smoke(stream_store):
    url, _ = stream_store
    t = time.perf_counter()
    n = sum(1 for _ in StreamReader(url, prefetch=2))
    assert n == 47 and time.perf_counter() - t < 10


# --------------------------------------------------------------------------- shuffle window
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_window_each_group_once_and_mixes_shards(stream_store, workers):
    url, all_ids = stream_store
    st = open_store(url)
    seen: list[str] = []
    for rank in range(2):
        r = StreamReader(st, seed=3, epoch=1, rank=rank, world_size=2, prefetch=1,
                         shuffle_window=3)
        got = _ids(_loader(r, workers))
        assert len(got) == len(r)
        seen += got
    assert sorted(seen) == sorted(all_ids)
    # a window's groups come from several shards, interleaved
    r = StreamReader(st, seed=3, epoch=1, shuffle_window=3)
    order = r.window_order(0)
    first = [s for s, _ in order[:6]]
    assert len(set(s for s, _ in order)) == 3 and len(set(first)) > 1


def test_stream_window_independent_of_parallelism_and_deterministic(stream_store):
    url, all_ids = stream_store
    st = open_store(url)
    one = StreamReader(st, seed=4, epoch=0, shuffle_window=4)
    two = StreamReader(st, seed=4, epoch=0, rank=1, world_size=2, shuffle_window=4)
    assert one.windows() == two.windows()
    assert all(one.window_order(i) == two.window_order(i) for i in range(len(one.windows())))
    a = _ids(one)
    assert a == _ids(StreamReader(st, seed=4, epoch=0, shuffle_window=4, prefetch=0))
    assert a != _ids(StreamReader(st, seed=4, epoch=1, shuffle_window=4))
    assert sorted(a) == sorted(all_ids)
    # window 1 reproduces the per-shard shuffle exactly; shuffle=False keeps stored order
    assert _ids(StreamReader(st, seed=4, shuffle_window=1)) == _ids(StreamReader(st, seed=4))
    assert _ids(StreamReader(st, shuffle=False, shuffle_window=3)) == all_ids
    with pytest.raises(ValueError, match="shuffle_window"):
        StreamReader(st, shuffle_window=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_window_state_dict_resume(stream_store, workers):
    url, _ = stream_store
    st = open_store(url)
    full = _ids(_loader(StreamReader(st, seed=5, epoch=2, shuffle_window=3), workers))
    for cut in (0, 7, 23, len(full)):
        r = StreamReader(st, seed=5, epoch=2, shuffle_window=3)
        it = iter(_loader(r, workers))
        taken = [next(it)[0]["example_id"] for _ in range(cut)]
        del it
        state = r.state_dict(consumed=len(taken) if workers else None)
        assert state["shuffle_window"] == 3
        r2 = StreamReader(st, seed=5, shuffle_window=3)
        r2.load_state_dict(state)
        rest = _ids(_loader(r2, workers))
        if cut == len(full):  # the epoch boundary: the next epoch, from its start
            assert rest == _ids(_loader(StreamReader(st, seed=5, epoch=3, shuffle_window=3),
                                        workers))
        else:
            assert taken + rest == full, cut
    with pytest.raises(ValueError, match="shuffle_window"):
        StreamReader(st, seed=5).load_state_dict(state)


def test_summary_roles_from_arrow_column(tmp_path):
    meta = make_meta(fields=["token_logprob"])
    groups = make_groups(15, meta, seed=8)
    write_store(str(tmp_path / "s"), meta, groups, shard_records=4)
    from collections import Counter

    from kdcache.store.summary import format_summary

    s = summarize(str(tmp_path / "s"))
    assert s["roles"] == dict(sorted(Counter(r["role"] for g in groups for r in g).items()))
    assert s["topk_mass_mean"] is None
    assert "roles" in format_summary(s)
