"""The one merge (`kdcache.store.admin.merge`, issue 20): a given order reproduces a store
written in that order in one go, an input that does not follow the order is named, a
resumable merge continues after its committed shards, `agree`/`meta`/`report` hand it the
producer's knowledge; and the one output check (`kdcache.store.check_output`)."""

from __future__ import annotations

import json
import os

import pytest
from test_store_util import make_groups, make_meta, write_store

from kdcache.store import check_output, open_store
from kdcache.store.admin import merge
from kdcache.store.format import StoreMeta

SHARD = 3


def _parts(tmp_path, meta=None, n=2):
    """n stores holding groups i::n of one list, and that list."""
    meta = meta or make_meta(codec="compact", fields=["topk_ids", "topk_logprobs"])
    groups = make_groups(10, meta, seed=5, max_t=5)
    urls = []
    for i in range(n):
        u = str(tmp_path / f"p{i}")
        write_store(u, meta, groups[i::n], shard_records=SHARD)
        urls.append(u)
    return urls, groups, meta


def _manifest(url) -> dict:
    with open(os.path.join(str(url), "manifest.json")) as f:
        return json.load(f)


def _order(groups, n=2):
    return [(g % n, grp[0]["example_id"]) for g, grp in enumerate(groups)]


@pytest.mark.parametrize("resume", [False, True])
def test_merge_in_an_order_equals_that_order_written_in_one_go(tmp_path, resume):
    urls, groups, meta = _parts(tmp_path)
    write_store(str(tmp_path / "whole"), meta, groups, shard_records=SHARD)
    out = str(tmp_path / "out")
    assert merge(urls, out, order=iter(_order(groups)), shard_records=SHARD, resume=resume) == out
    got, want = _manifest(out), _manifest(tmp_path / "whole")
    assert got["complete"] and got["store_key"] == want["store_key"]
    assert [s["checksum"] for s in got["shards"]] == [s["checksum"] for s in want["shards"]]
    # default order: input after input
    write_store(str(tmp_path / "cat"), meta, groups[0::2] + groups[1::2], shard_records=SHARD)
    merge(urls, str(tmp_path / "out2"))
    assert _manifest(tmp_path / "out2")["checksum"] == _manifest(tmp_path / "cat")["checksum"]


@pytest.mark.parametrize("resume", [False, True])
def test_an_input_that_does_not_follow_the_order_is_named(tmp_path, resume):
    urls, groups, _ = _parts(tmp_path)
    out = tmp_path / "out"
    order = _order(groups)
    swapped = order[:3] + [order[5], order[4], order[3]] + order[6:]  # input 1 out of turn
    with pytest.raises(ValueError, match=rf"input 1 \({urls[1]}\) does not hold its groups in "
                                         "the merge order: expected example 'ex00005' next"):
        merge(urls, str(out), order=swapped, resume=resume)
    with pytest.raises(ValueError, match=rf"input 1 \({urls[1]}\) holds more groups than the "
                                         "merge order"):
        merge(urls, str(out), order=order[:-1], resume=resume)
    with pytest.raises(ValueError, match="merge order entry 0 names input 2; there are 2"):
        merge(urls, str(out), order=[(2, "ex00000")], resume=resume)
    with pytest.raises(ValueError, match="ex00000.*also in an earlier input"):
        merge([urls[0], urls[0].rstrip("/") + "/"], str(tmp_path / "o2"), order=[(0, "ex00000"),
                                                                     (1, "ex00000")])
    if not resume:  # built under a temporary name: nothing is left
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["p0", "p1"]


def test_a_resumable_merge_continues_after_its_committed_shards(tmp_path):
    urls, groups, meta = _parts(tmp_path)
    write_store(str(tmp_path / "whole"), meta, groups, shard_records=SHARD)
    out = str(tmp_path / "out")

    def killed(order, after):
        for i, x in enumerate(order):
            if i == after:
                raise RuntimeError("killed")
            yield x

    with pytest.raises(RuntimeError, match="killed"):
        merge(urls, out, order=killed(_order(groups), 7), shard_records=SHARD, resume=True)
    m = _manifest(out)
    whole = _manifest(tmp_path / "whole")
    assert not m["complete"] and 0 < len(m["shards"]) < len(whole["shards"])  # committed: kept
    with pytest.raises(FileExistsError, match="OUT .* already holds a kdcache store"):
        merge(urls, out, order=_order(groups), resume=False, option="OUT")
    merge(urls, out, order=_order(groups), shard_records=SHARD, resume=True)
    got = _manifest(out)
    assert got["complete"] and got["checksum"] == whole["checksum"]
    # a resumable merge that fails before its first group writes nothing
    with pytest.raises(ValueError, match="does not hold its groups"):
        merge(urls, str(tmp_path / "none"), order=[(1, "ex00000")], resume=True)
    assert not (tmp_path / "none").exists()


def test_meta_agree_and_report_come_from_the_caller(tmp_path):
    base = make_meta(codec="lossless", fields=["token_logprob"])

    def with_part(i):
        d = base.to_dict()
        d["options"] = dict(d["options"], part=i)
        return StoreMeta.from_dict(d)

    groups = make_groups(6, base, seed=3, max_t=4)
    urls = []
    for i in range(2):
        urls.append(str(tmp_path / f"p{i}"))
        write_store(urls[-1], with_part(i), groups[i::2], shard_records=SHARD)
    with pytest.raises(ValueError, match=r"meta differs in \['options'\]"):
        merge(urls, str(tmp_path / "out"))

    def drop_part(m):
        d = m.to_dict()
        d["options"] = {k: v for k, v in d["options"].items() if k != "part"}
        return StoreMeta.from_dict(d)

    calls = []

    def report():
        calls.append(1)
        return {"merged": 2}

    merge(urls, str(tmp_path / "out"), meta=base, agree=drop_part, report_key="my_report",
          report=report)
    st = open_store(str(tmp_path / "out"))
    assert st.meta.content_dict() == base.content_dict() and len(st) == sum(map(len, groups))
    assert st.manifest["my_report"] == {"merged": 2} and calls == [1]


@pytest.mark.parametrize("may_hold,content,error", [
    ("store", None, None),
    ("store", "leftover", None),  # a killed writer's temp file is not someone's data
    ("store", "store", None),  # its writer resumes it
    ("store", "notes", "--out {p} is a directory with other files (notes.txt) and no kdcache store"),
    ("store", "file", "--out {p} is a file, not a directory"),
    ("nothing", None, None),
    ("nothing", "leftover", "is a directory with other files (.manifest.json.tmp-1)"),
    ("nothing", "store", "--out {p} already holds a kdcache store: choose a new location"),
    ("anything", "notes", None),  # a root the stores are named under
])
def test_check_output(tmp_path, may_hold, content, error):
    p = tmp_path / "out"
    if content == "file":
        p.write_text("x")
    elif content == "store":
        meta = make_meta(fields=["token_logprob"])
        write_store(str(p), meta, make_groups(2, meta), shard_records=SHARD)
    elif content:
        p.mkdir()
        (p / ("notes.txt" if content == "notes" else ".manifest.json.tmp-1")).write_text("x")
    before = sorted(os.listdir(tmp_path))
    if error is None:
        check_output(str(p), "--out", may_hold=may_hold)
    else:
        with pytest.raises(OSError) as e:
            check_output(str(p), "--out", may_hold=may_hold)
        assert error.format(p=p) in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created or left behind


def test_check_output_names_the_option_when_not_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match=r"is not writable \(Not a directory\); pass a writable "
                                      r"--out-root, or fix its permissions"):
        check_output(str(tmp_path / "afile" / "stores"), "--out-root", may_hold="anything")
    with pytest.raises(ValueError, match="may_hold='some'"):
        check_output(str(tmp_path / "x"), "OUT", may_hold="some")
