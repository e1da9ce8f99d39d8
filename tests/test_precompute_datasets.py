"""`--data` through Hugging Face `datasets` (issue 21 §2): hub-snapshot folders, save_to_disk
folders, csv (plain and gzipped) and .jsonl.gz give the same tokens as the JSONL reader;
`--columns` maps other column names; errors name the dataset, the split, the row and the
column; nothing reaches the network (conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
Also issue 23 §5: responses that repeat the prompt's turns, empty assistant turns."""

from __future__ import annotations

import csv
import gzip
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reference_checks import one_error
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.precompute.data import (
    DataError,
    DataOptions,
    RowSource,
    parse_columns,
    tokenize_rows,
)
from kdcache.precompute.sources import open_data
from kdcache.store import open_store
from kdcache.train.tiny import build_tokenizer

runner = CliRunner()
TOK = build_tokenizer()
ROWS = [{"id": f"e{i}", "prompt": f"sort {i % 10} 1 2", "chosen": "1 2 " + "3 " * (i % 4),
         "rejected": "3 2 1 " + "a " * (i % 5)} for i in range(9)]
# the same rows under another dataset's column names (stack-exchange-paired style)
RENAMED = [{"qid": r["id"], "question": r["prompt"], "response_j": r["chosen"],
            "response_k": r["rejected"]} for r in ROWS]
MAPPING = "id=qid,prompt=question,chosen=response_j,rejected=response_k"
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: small
  data_files:
  - split: train
    path: small/*.parquet
---
# a dataset card
"""


def test_the_test_session_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("HF_DATASETS_OFFLINE") == "1"


def _snapshot(root: Path, rows: list[dict]) -> Path:
    """A folder laid out as a hub snapshot: parquet shards + README.md with two configs."""
    (root / "data").mkdir(parents=True)
    (root / "small").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:5]), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), root / "data" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), root / "small" / "s.parquet")
    (root / "README.md").write_text(CARD)
    return root


def _csv(path: Path, rows: list[dict], opener=open) -> Path:
    with opener(path, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _ids(source, opts: DataOptions) -> list[tuple]:
    return [(s.example_id, s.role, tuple(s.prompt_ids), tuple(s.response_ids))
            for g in tokenize_rows(source.rows(), TOK, opts) for s in g]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple]:
    d = tmp_path_factory.mktemp("ref")
    (d / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return _ids(open_data(str(d / "d.jsonl")), DataOptions())


def test_every_source_gives_the_jsonl_reader_s_tokens(tmp_path, reference):
    import datasets

    mapped = DataOptions(**parse_columns(MAPPING))
    snap = _snapshot(tmp_path / "snap", RENAMED)
    assert _ids(open_data(str(snap)), mapped) == reference
    assert _ids(open_data(str(snap), split="test"), mapped) == reference[:4]
    assert _ids(open_data(str(snap), config="small"), mapped) == reference[:6]
    _csv(tmp_path / "d.csv", ROWS)
    assert _ids(open_data(str(tmp_path / "d.csv")), DataOptions()) == reference
    _csv(tmp_path / "d.csv.gz", ROWS, opener=gzip.open)
    assert _ids(open_data(str(tmp_path / "d.csv.gz")), DataOptions()) == reference
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(
        "\n".join(json.dumps(r) for r in ROWS).encode()))
    assert _ids(open_data(str(tmp_path / "d.jsonl.gz")), DataOptions()) == reference
    datasets.Dataset.from_list(RENAMED).save_to_disk(str(tmp_path / "disk"))
    assert _ids(open_data(str(tmp_path / "disk")), mapped) == reference
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dict"))
    assert _ids(open_data(str(tmp_path / "dict"), split="test"), DataOptions()) == reference
    assert _ids(open_data(str(tmp_path / "dict")), DataOptions()) == reference[:8]


def test_sources_stream_and_fingerprint_their_content(tmp_path):
    snap = _snapshot(tmp_path / "snap", RENAMED)
    src = open_data(str(snap))
    rows = src.rows(limit=3)
    first = next(rows)
    assert first.index == 0 and first.where.endswith("split train row 0") and str(snap) in first.where
    assert len(list(rows)) == 2  # the limit
    fp = src.sha256()
    assert fp == open_data(str(snap)).sha256() != open_data(str(snap), split="test").sha256()
    pq.write_table(pa.Table.from_pylist(RENAMED[:1]), snap / "data" / "test-00000-of-00001.parquet")
    assert open_data(str(snap)).sha256() == fp  # the train split's files did not change
    pq.write_table(pa.Table.from_pylist(RENAMED[:5]), snap / "data" / "train-00001-of-00002.parquet")
    assert open_data(str(snap)).sha256() != fp


def test_trl_conversational_rows_through_a_dataset_folder(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"sort {i} 1"}],
             "chosen": [{"role": "assistant", "content": f"1 {i}"}],
             "rejected": [{"role": "assistant", "content": f"{i} 1"}]} for i in range(7)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _snapshot(tmp_path / "snap", rows)
    want = _ids(open_data(str(tmp_path / "c.jsonl")), DataOptions())
    got = _ids(open_data(str(tmp_path / "snap")), DataOptions())
    assert got == want and len(got) == 2 * len(rows)


def test_precompute_cli_feeds_a_folder_and_a_csv(tmp_path, reference):
    tok = tmp_path / "tok"
    TOK.save_pretrained(tok)
    snap = _snapshot(tmp_path / "snap", RENAMED)
    _csv(tmp_path / "d.csv.gz", ROWS, opener=gzip.open)
    urls = []
    for data, extra in ((str(snap), ["--columns", MAPPING]), (str(tmp_path / "d.csv.gz"), [])):
        res = runner.invoke(cli.app, ["precompute", "--tokenizer", str(tok), "--data", data,
                                      "--out-root", str(tmp_path / "stores"), "--no-progress",
                                      *extra])
        assert res.exit_code == 0, res.output
        urls.append(res.stdout.strip().splitlines()[-1])
    for url in urls:
        store = open_store(url)
        got = sorted((r["example_id"], r["role"], tuple(r["prompt_ids"]), tuple(r["response_ids"]))
                     for g in store.groups() for r in g)
        assert got == sorted(reference)


def _precompute(tmp_path: Path, data: str, *extra: str):
    tok = tmp_path / "tok"
    if not tok.exists():
        TOK.save_pretrained(tok)
    return runner.invoke(cli.app, ["precompute", "--tokenizer", str(tok), "--data", data,
                                   "--out-root", str(tmp_path / "stores"), "--no-progress", *extra])


def test_errors_name_the_dataset_split_row_and_column(tmp_path):
    snap = _snapshot(tmp_path / "snap", RENAMED)
    rows = [dict(r) for r in RENAMED]
    rows[6]["response_k"] = ""
    _snapshot(tmp_path / "bad", rows)
    one_error(_precompute(tmp_path, str(tmp_path / "bad"), "--columns", MAPPING),
               str(tmp_path / "bad"), "split train row 6", "'response_k'", "is empty")
    one_error(_precompute(tmp_path, str(snap)), str(snap), "split train row 0",
               "cannot tell the dataset kind", "question")
    one_error(_precompute(tmp_path, str(snap), "--columns", MAPPING, "--split", "validation"),
               "no split 'validation'", "train, test", "--split")
    one_error(_precompute(tmp_path, str(snap), "--columns", MAPPING, "--data-config", "nope"),
               str(snap), "nope", "--data-config")
    one_error(_precompute(tmp_path, str(snap), "--columns", "question=prompt"),
               "--columns", "ROLE=COLUMN", "prompt, chosen, rejected")
    c = _csv(tmp_path / "d.csv", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2 +
             [{"prompt": "a", "chosen": "", "rejected": "c"}])
    one_error(_precompute(tmp_path, str(c)), f"{c} split train row 2", "'chosen'", "is empty")
    (tmp_path / "h.csv").write_text("prompt,chosen,rejected\n")
    one_error(_precompute(tmp_path, str(tmp_path / "h.csv")), "h.csv", "has no rows")
    (tmp_path / "d.txt").write_text("hello\n")
    one_error(_precompute(tmp_path, str(tmp_path / "d.txt")), "d.txt", "unknown format")
    one_error(_precompute(tmp_path, str(tmp_path / "d.jsonl.gz"), "--split", "test"),
               "is a data file", "--split")
    (tmp_path / "empty").mkdir()
    one_error(_precompute(tmp_path, str(tmp_path / "empty")), str(tmp_path / "empty"))
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())


def test_a_dataset_id_not_on_disk_fails_fast_offline(tmp_path):
    t0 = time.monotonic()
    line = one_error(_precompute(tmp_path, "someone/no-such-dataset"), "'someone/no-such-dataset'",
                      "not a local file or folder", "Hugging Face cache", "offline")
    assert time.monotonic() - t0 < 60, line  # no network wait


def test_rollout_reads_a_dataset_folder(tmp_path):
    from kdcache.precompute.config import RolloutConfig
    from kdcache.precompute.rollout import load_prompts

    snap = _snapshot(tmp_path / "snap", RENAMED)
    cfg = RolloutConfig(model="m", data=str(snap), columns=MAPPING, include_chosen=True)
    items, fp, skipped = load_prompts(cfg, TOK)
    assert [it.example_id for it in items] == [r["id"] for r in ROWS] and skipped == 0
    assert items[0].chosen_ids[-1] == TOK.eos_token_id
    assert fp != load_prompts(RolloutConfig(model="m", data=str(snap), columns=MAPPING,
                                            split="test"), TOK)[1]


# ------------------------------------------------------------------------- issue 23 §5

def _tokenize(rows: list[dict]) -> list:
    src = [RowSource(i, f"d.jsonl line {i + 1}", r) for i, r in enumerate(rows)]
    return [s for g in tokenize_rows(src, TOK, DataOptions()) for s in g]


def test_responses_that_repeat_the_prompt_say_to_drop_those_turns():
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 2 1"}]
    good = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "1 2"}],
            "rejected": [{"role": "assistant", "content": "2 1"}]}
    assert len(_tokenize([good])) == 2
    bad = dict(good, chosen=prompt + good["chosen"])
    with pytest.raises(DataError) as e:
        _tokenize([good, bad])
    msg = str(e.value)
    assert "d.jsonl line 2" in msg and "'chosen'" in msg and "repeats the prompt's 2 message" in msg
    assert "drop the prompt turns" in msg and "string responses" not in msg
    # a user turn before the answer that is not exactly the prompt: the same advice
    odd = dict(good, rejected=[{"role": "user", "content": "other"},
                               {"role": "assistant", "content": "2 1"}])
    with pytest.raises(DataError, match=r"line 1: column 'rejected' starts with 1 'user'.*drop the "
                                        r"prompt turns"):
        _tokenize([odd])
    # a string prompt repeated as the first user turn
    flat = {"prompt": "sort 2 1", "chosen": [{"role": "user", "content": "sort 2 1"},
                                              {"role": "assistant", "content": "1 2"}],
            "rejected": "2 1"}
    with pytest.raises(DataError, match="repeats the prompt's 1 message"):
        _tokenize([flat])


@pytest.mark.parametrize("content", ["", "   ", None])
def test_an_empty_assistant_turn_is_refused_as_an_empty_string_is(content):
    row = {"prompt": [{"role": "user", "content": "sort 2 1"}],
           "chosen": [{"role": "assistant", "content": content}], "rejected": "2 1"}
    with pytest.raises(DataError, match=r"line 1: column 'chosen' message 0 \(assistant\) has "
                                        r"empty content; every row needs a non-empty chosen"):
        _tokenize([row])
    with pytest.raises(DataError, match="line 1: column 'rejected' is empty"):
        _tokenize([dict(row, chosen="1 2", rejected="")])
