"""Precompute streams its input: the plan reads one window of rows at a time, and the
report sums stay exact when a run is killed with groups handed over but not committed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.precompute.data import Sequence
from kdcache.precompute.run import PrecomputeConfig, iter_batches
from kdcache.precompute.writing import UNCOMMITTED, GroupWriter
from kdcache.store import StoreMeta, open_store


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
    # killed here: nothing else runs; the manifest on disk is the last commit
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["r"].get(UNCOMMITTED)  # groups in flight are recorded, not counted

    w = GroupWriter(url, meta, shard_records=3, resume=True, report_key="r", sum_keys=keys)
    for i, n in enumerate(sizes):
        if f"e{i}" not in w.done:
            w.add_group(_records(_group(i, n)), value[f"e{i}"])
    w.close(lambda sums: {"mean_mass": sums["mass"] / sums["tokens"]})
    report = open_store(url).manifest["r"]
    assert report["sum_tokens"] == sum(sizes)
    assert report["sum_mass"] == 0.5 * sum(sizes) and report["mean_mass"] == 0.5
    assert UNCOMMITTED not in report
