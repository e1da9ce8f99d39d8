"""Precompute streams its input: the plan reads one window of rows at a time, and the
report sums stay exact when a run is killed with groups handed over but not committed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.precompute.data import Sequence
from kdcache.precompute.run import PrecomputeConfig, iter_batches
from kdcache.precompute.writing import GroupWriter
from kdcache.store import StoreMeta, open_store
from kdcache.store.writer import UNCOMMITTED


def _group(i: int, n_records: int = 1, length: int = 1) -> list[Sequence]:
    return [Sequence(f"e{i}", "sft", 0, np.array([1, 2], np.int32), np.full(length, 7, np.int32))
            for _ in range(n_records)]


def test_the_plan_reads_one_window_at_a_time():
    read: list[int] = []

    def groups():
        for i in range(100):
            read.append(i)
            yield _group(i, length=1 + (i * 7) % 13)

    cfg = PrecomputeConfig(teacher="t", data="d", bucket_window=10, batch_tokens=48)
    batches = iter_batches(cfg, groups())
    first = next(batches)
    assert len(read) == 10  # the first window, not the dataset
    rest = [g for b in batches for g in b]
    assert len(read) == 100
    assert sorted(int(g[0].example_id[1:]) for g in first + rest) == list(range(100))


def test_windows_are_length_sorted_blocks_in_data_order():
    lengths = [(i * 7) % 13 + 1 for i in range(30)]
    cfg = PrecomputeConfig(teacher="t", data="d", bucket_window=8, batch_tokens=10_000)
    flat = [g for b in iter_batches(cfg, iter([_group(i, length=n) for i, n in enumerate(lengths)]))
            for g in b]
    ids = [int(g[0].example_id[1:]) for g in flat]
    for w in range(0, 30, 8):
        block = ids[w:w + 8]
        assert sorted(block) == list(range(w, min(w + 8, 30)))  # the window's rows, nothing else
        assert [lengths[i] for i in block] == sorted(lengths[i] for i in block)


def _records(group: list[Sequence]) -> list[dict]:
    return [{"example_id": s.example_id, "role": "sft", "group": j, "prompt_ids": s.prompt_ids,
             "response_ids": s.response_ids, "is_terminal": True} for j, s in enumerate(group)]


@pytest.mark.parametrize("sizes", [[2] * 7, [1, 2, 4, 1, 3, 5, 1, 2], [4] * 4])
def test_report_sums_count_each_committed_group_once_after_a_kill(tmp_path, sizes):
    """Groups handed over but not committed when the run dies are not in the sums; groups
    committed since the last fold are (whatever the shard cut: before or after the group)."""
    meta = StoreMeta(k=0, fields=[], options={"codec": "lossless"})
    url = str(tmp_path / "s")
    keys = ("tokens", "mass")
    value = {f"e{i}": {"tokens": float(n), "mass": 0.5 * n} for i, n in enumerate(sizes)}
    w = GroupWriter(url, meta, shard_records=3, resume=True, report_key="r", sum_keys=keys)
    for i, n in enumerate(sizes[:-2]):
        w.add_group(_records(_group(i, n)), value[f"e{i}"])
    # killed here: nothing else runs; the manifest on disk is the last commit, whose sums
    # count exactly its committed groups (the groups in flight are not counted), and the
    # kernel drops the dead process's store lock
    w._release()
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    committed = sum(s["n_groups"] for s in m["shards"])
    assert 0 < committed <= len(sizes) - 2
    assert m["r"]["sum_tokens"] == sum(sizes[:committed]) and UNCOMMITTED not in m["r"]

    w = GroupWriter(url, meta, shard_records=3, resume=True, report_key="r", sum_keys=keys)
    for i, n in enumerate(sizes):
        if f"e{i}" not in w.done:
            w.add_group(_records(_group(i, n)), value[f"e{i}"])
    w.close(lambda sums: {"mean_mass": sums["mass"] / sums["tokens"]})
    report = open_store(url).manifest["r"]
    assert report["sum_tokens"] == sum(sizes)
    assert report["sum_mass"] == 0.5 * sum(sizes) and report["mean_mass"] == 0.5
    assert UNCOMMITTED not in report


# ------------------------------------------------------------------------------- background

def _scored_records(i: int, n: int, t: int = 5, k: int = 3) -> list[dict]:
    rng = np.random.default_rng(i)
    out = []
    for j in range(n):
        lp = -np.sort(rng.random((t, k)).astype(np.float32) * 5, axis=1)
        out.append({"example_id": f"e{i}", "role": "sft", "group": j,
                    "prompt_ids": np.array([1, 2], np.int32),
                    "response_ids": rng.integers(0, 50, t).astype(np.int32), "is_terminal": True,
                    "topk_ids": rng.integers(0, 50, (t, k)).astype(np.int32), "topk_logprobs": lp,
                    "token_logprob": lp[:, 0].copy()})
    return out


META = StoreMeta(k=3, fields=["topk_ids", "topk_logprobs", "token_logprob"],
                 options={"codec": "compact"})


@pytest.mark.parametrize("max_queue_bytes", [1, 1 << 20])
def test_background_writer_writes_the_inline_store(tmp_path, max_queue_bytes, monkeypatch):
    import time

    from kdcache.store import StoreWriter

    groups = [_scored_records(i, 1 + i % 3) for i in range(40)]
    for mode in ("inline", "background"):
        w = GroupWriter(str(tmp_path / mode), META, shard_records=7, resume=True,
                        report_key="r", sum_keys=("tokens",), background=mode == "background",
                        max_queue_bytes=max_queue_bytes)
        real = StoreWriter.add_group
        seen = []

        def slow(self, records, sums=None, real=real):
            time.sleep(0.001)  # a writer slower than the caller: the queue fills up
            real(self, records, sums)

        monkeypatch.setattr(StoreWriter, "add_group", slow)
        for g in groups:
            w.add_group(g, {"tokens": 5.0 * len(g)})
            seen.append(w._queued_bytes)
        w.close()
        monkeypatch.setattr(StoreWriter, "add_group", real)
        largest = max(sum(a.nbytes for r in g for a in r.values() if isinstance(a, np.ndarray))
                      for g in groups)
        assert max(seen) <= max_queue_bytes + largest  # memory stays bounded
    a, b = (open_store(str(tmp_path / m)).manifest for m in ("inline", "background"))
    assert a["checksum"] == b["checksum"] and a["r"] == b["r"]
    assert [s["checksum"] for s in a["shards"]] == [s["checksum"] for s in b["shards"]]


def test_an_error_in_the_writer_thread_is_raised_in_the_caller(tmp_path, monkeypatch):
    import errno

    from kdcache.store import StoreWriter

    real, calls = StoreWriter.add_group, {"n": 0}

    def full_disk(self, records, sums=None):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, records, sums)

    monkeypatch.setattr(StoreWriter, "add_group", full_disk)
    url = str(tmp_path / "s")
    with pytest.raises(OSError) as err:
        with GroupWriter(url, META, shard_records=4, resume=True, background=True) as w:
            for i in range(40):
                w.add_group(_scored_records(i, 2))
            w.close()
    assert err.value.errno == errno.ENOSPC  # the same error, in this thread
    st = open_store(url)
    assert not st.complete and 0 < len(st) < 80 and len(st) % 4 == 0  # whole shards only

