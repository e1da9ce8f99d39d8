"""run_precompute end to end (dataset -> store -> open_store), resume, and input errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.precompute import PrecomputeConfig, engine, run_precompute
from kdcache.precompute import run as run_mod
from kdcache.precompute.data import (
    DataError,
    DataOptions,
    RowSource,
    data_files,
    files_sha256,
    iter_rows,
    tokenize_rows,
)
from kdcache.precompute.models import (
    ModelLoadError,
    check_same_tokenizer,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
    verify_head,
)
from kdcache.precompute.scoring import LMHead
from kdcache.store import NoStoreError, open_store
from kdcache.train.tiny import build_tokenizer, save_tiny

TOK = build_tokenizer()
ROWS = [
    {"id": f"e{i}", "prompt": f"sort {i % 10} 1 2", "chosen": "1 2 " + "3 " * (i % 4),
     "rejected": "3 2 1 " + "a " * (i % 5)}
    for i in range(7)
] + [{"id": "chat", "prompt": [{"role": "user", "content": "a b"}],
      "chosen": [{"role": "assistant", "content": "b a"}], "rejected": "a",
      "context": "the answer is b a"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pre")
    save_tiny(d / "dpo", seed=1)
    save_tiny(d / "ref", seed=2)
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    return d


def _rows(rows: list[dict]) -> list[RowSource]:
    return [RowSource(i, f"row {i}", r) for i, r in enumerate(rows)]


def _cfg(work: Path, **kw) -> PrecomputeConfig:
    base = dict(teacher=str(work / "dpo"), reference=str(work / "ref"),
                data=str(work / "prefs.jsonl"), k=6, betas=[1.0, 2.0], out_root=str(work / "stores"),
                batch_tokens=64, shard_records=4, progress=False, codec="lossless")
    base.update(kw)
    return PrecomputeConfig(**base)


def test_round_trip_matches_direct_scoring(work):
    url = run_precompute(_cfg(work))
    store = open_store(url)
    assert store.complete and len(store) == 2 * len(ROWS)
    assert set(store.fields) == {"topk_ids", "topk_logprobs", "token_logprob", "soft_value",
                                 "ref_topk_logprobs", "ref_token_logprob"}
    assert store.meta.k == 6 and store.meta.betas == [1.0, 2.0]
    assert set(store.meta.models) == {"dpo", "ref"}
    report = store.manifest["precompute_report"]
    assert 0 < report["mean_topk_mass"] < 1
    groups = {g[0]["example_id"]: g for g in store.groups()}
    assert set(groups) == {r["id"] for r in ROWS}
    # the stored numbers are exactly what the engine computes for that sequence alone
    dpo = engine.Scorer.from_model(load_model(str(work / "dpo"), device="cpu"))
    ref = engine.Scorer.from_model(load_model(str(work / "ref"), device="cpu"))
    seqs = [s for g in tokenize_rows(iter_rows(data_files(str(work / "prefs.jsonl"))), TOK,
                                     DataOptions(max_length=2048)) for s in g]
    for s in seqs:
        rec = next(r for r in groups[s.example_id] if r["role"] == s.role)
        want, _ = engine.score_sequences([s], dpo, ref, 6, [1.0, 2.0], 0, 2)
        for key in ("topk_ids", "topk_logprobs", "token_logprob", "soft_value",
                    "ref_topk_logprobs", "ref_token_logprob"):
            np.testing.assert_allclose(rec[key], want[0][key], atol=2e-5, err_msg=key)
        assert rec["is_terminal"] and list(rec["response_ids"]) == list(s.response_ids)
    chat = groups["chat"][0]
    assert chat["teacher_prompt_ids"] is not None  # context was shown to the teachers only
    # re-running with identical inputs lands on the same key and does nothing
    assert run_precompute(_cfg(work)) == url
    # the progress bars render (checking data, then rows / sequences / tokens / tok/s)
    shown = open_store(run_precompute(_cfg(work, progress=True, out=str(work / "shown"))))
    assert shown.manifest["checksum"] == store.manifest["checksum"]


def test_resume_after_crash_gives_the_same_store(work, monkeypatch):
    full = open_store(run_precompute(_cfg(work, out=str(work / "full"))))
    calls = {"n": 0}
    real = engine.score_sequences

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            # the background writer commits on its own thread: crash once a shard is in
            # (writing the store's tokenizer files first made this a race on a busy disk)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                try:
                    if len(open_store(str(work / "resumed"))) > 0:
                        break
                except (NoStoreError, ValueError):
                    pass
                time.sleep(0.05)
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(engine, "score_sequences", flaky)
    # the inline writer: two batches are committed before the crash whatever the timing (the
    # background writer may not have written one yet, and a crash drops what is queued)
    monkeypatch.setattr(run_mod, "BACKGROUND_WRITER", False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_precompute(_cfg(work, out=str(work / "resumed")))
    partial = open_store(str(work / "resumed"))
    assert not partial.complete and 0 < len(partial) < len(full)
    monkeypatch.setattr(engine, "score_sequences", real)
    resumed = open_store(run_precompute(_cfg(work, out=str(work / "resumed"))))
    assert resumed.complete and len(resumed) == len(full)
    a = {(r["example_id"], r["role"]): r for r in full}
    for r in resumed:
        np.testing.assert_array_equal(r["topk_ids"], a[(r["example_id"], r["role"])]["topk_ids"])
    # the report counts each group once: not the groups the crash left uncommitted, not twice
    got, want = resumed.manifest["precompute_report"], full.manifest["precompute_report"]
    assert got["sum_tokens"] == want["sum_tokens"] == full.num_tokens
    assert got["mean_topk_mass"] == pytest.approx(want["mean_topk_mass"], rel=1e-9)


def test_tokenized_only_store_without_teacher(work):
    url = run_precompute(_cfg(work, teacher=None, reference=None, tokenizer=str(work / "dpo")))
    store = open_store(url)
    assert store.fields == [] and store.meta.models == {} and len(store) == 2 * len(ROWS)
    r = store[0]
    assert r["is_terminal"] and len(r["response_ids"]) == r["n_tokens"] > 0
    with pytest.raises(ValueError, match="no --teacher: .* or only --tokenizer DIR"):
        run_precompute(_cfg(work, teacher=None, reference=None))


def test_partitions_cover_the_dataset(work):
    ids = []
    for i in range(2):
        s = open_store(run_precompute(_cfg(work, partition=(i, 2), reference=None)))
        assert "ref_token_logprob" not in s.fields
        ids += [g[0]["example_id"] for g in s.groups()]
    assert sorted(ids) == sorted(r["id"] for r in ROWS)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="row 1: missing column 'rejected'"):
        list(tokenize_rows(_rows([{"prompt": "a", "chosen": "b", "rejected": "c"},
                                  {"prompt": "a", "chosen": "b"}]), TOK, DataOptions()))
    with pytest.raises(DataError, match="row 0: column 'chosen' is empty"):
        list(tokenize_rows(_rows([{"prompt": "a", "chosen": "  ", "rejected": "c"}]), TOK,
                           DataOptions()))
    with pytest.raises(DataError, match="row 0: column 'prompt' is empty"):
        list(tokenize_rows(_rows([{"prompt": "", "completion": "b"}]), TOK, DataOptions()))
    with pytest.raises(DataError, match="cannot tell the dataset kind"):
        list(tokenize_rows(_rows([{"question": "a"}]), TOK, DataOptions()))
    with pytest.raises(DataError, match="duplicate"):
        list(tokenize_rows(_rows([{"id": 1, "prompt": "a", "completion": "b"}] * 2), TOK,
                           DataOptions()))
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops')
        list(iter_rows(data_files(str(tmp_path / "bad.jsonl"))))
    with pytest.raises(DataError, match="no data file matches"):
        data_files(str(tmp_path / "nothing-*.jsonl"))


def test_over_long_truncate_skip_fail():
    rows = _rows([{"prompt": "a", "completion": "1 2 3 4 5 6 7 8"},
                  {"prompt": "a", "completion": "1"}])
    # chat prompt '<|user|> a <|assistant|>' = 3 tokens; long response 9 tokens with EOS
    from kdcache.precompute.data import DataStats

    st = DataStats()
    groups = list(tokenize_rows(rows, TOK, DataOptions(max_length=6), st))
    assert st.truncated == 1 and len(groups) == 2
    assert len(groups[0][0].response_ids) == 3 and groups[0][0].response_ids[-1] != TOK.eos_token_id
    st = DataStats()
    assert len(list(tokenize_rows(rows, TOK, DataOptions(max_length=6, truncate="skip"), st))) == 1
    assert st.skipped == 1
    with pytest.raises(DataError, match="row 0: column 'completion': prompt . response are 12 "
                                        "tokens > max_length 6"):
        list(tokenize_rows(rows, TOK, DataOptions(max_length=6, truncate="fail")))
    # a prompt that alone fills max_length is named as the prompt, not as a response column
    with pytest.raises(DataError, match="row 0: the prompt alone is 3 tokens >= max_length 3"):
        list(tokenize_rows(rows, TOK, DataOptions(max_length=3, truncate="fail")))
    st = DataStats()
    assert list(tokenize_rows(rows, TOK, DataOptions(max_length=3), st)) == []
    assert st.skipped == st.skipped_long_prompt == 2


def test_parquet_and_string_prompts_without_template(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a b"], "completion": ["c"]}), tmp_path / "d.parquet")
    files = data_files(str(tmp_path / "d.parquet"))
    (g,) = list(tokenize_rows(iter_rows(files), TOK, DataOptions(chat_template=False)))
    assert TOK.decode(g[0].prompt_ids) == "a b" and g[0].role == "sft"
    assert list(g[0].response_ids) == [TOK.convert_tokens_to_ids("c"), TOK.eos_token_id]
    assert len(files_sha256(files)) == 64


def test_tokenizer_mismatch_and_model_errors(work, tmp_path):
    other = build_tokenizer(words=["x", "y", "z"])
    with pytest.raises(ValueError, match=r"teacher vocab 52 != student vocab 9: .*share one tokenizer"):
        check_same_tokenizer(TOK, other)
    # one tokenizer, output layers of different sizes (vocabulary padding): accepted
    check_same_tokenizer(TOK, TOK, model_vocab_a=52, model_vocab_b=64)
    with pytest.raises(ValueError, match="has 50 output rows .* but its tokenizer has 52"):
        check_same_tokenizer(TOK, TOK, model_vocab_a=52, model_vocab_b=50)
    check_same_tokenizer(TOK, build_tokenizer())
    save_tiny(tmp_path / "small", tokenizer=other)
    with pytest.raises(ValueError, match="teacher vocab 52 != student vocab 9"):
        run_precompute(_cfg(work, student=str(tmp_path / "small")))
    with pytest.raises(ModelLoadError, match="cannot load the teacher model from"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load the teacher model"):
        load_model(str(tmp_path / "broken"))
    with pytest.raises(ModelLoadError):
        model_fingerprint(str(tmp_path / "broken"))


def test_fingerprints_are_content_derived(work, tmp_path):
    a = model_fingerprint(str(work / "dpo"))
    save_tiny(tmp_path / "copy", seed=1)
    save_tiny(tmp_path / "other", seed=9)
    assert model_fingerprint(str(tmp_path / "copy")) == a  # same content, other path
    assert model_fingerprint(str(tmp_path / "other"))["weights_sha256"] != a["weights_sha256"]
    t2 = build_tokenizer()
    assert tokenizer_fingerprint(t2) == tokenizer_fingerprint(TOK)
    t2.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(t2) != tokenizer_fingerprint(TOK)


def test_verify_head_refuses_unknown_logit_transform(work):
    model = load_model(str(work / "dpo"), device="cpu")
    head = LMHead.from_model(model)
    assert verify_head(model, head) < 1e-4
    with pytest.raises(ModelLoadError, match="logit transform"):
        verify_head(model, LMHead(weight=head.weight, scale=0.5))
    model.config.final_logit_softcapping = 1.0  # a config we would honour but the model ignores
    with pytest.raises(ModelLoadError, match="logit transform"):
        verify_head(model, LMHead.from_model(model))
    assert torch.is_tensor(head.weight)


def test_single_process_layer_never_imports_the_multi_process_layer():
    """run.py (one process) is called by launch.py (partitions, devices, merge), never the
    other way round: following a config goes entry -> launch -> run, once."""
    import ast
    import inspect

    from kdcache.precompute import run

    tree = ast.parse(inspect.getsource(run))
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert not any("launch" in m for m in imported), imported
