"""Rollout stores carry the text a student with another tokenizer needs (METHODS §5):
rollout -> precompute --input-store -> train --cross-tokenizer map (adpa, seqkd), the same
`prompt_source` precompute writes for the dataset row, and the one line for an old rollout
store without text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kdcache.precompute import PrecomputeConfig, RolloutConfig, run_precompute, run_rollout
from kdcache.precompute.rollout import sampled_text
from kdcache.store import StoreWriter, open_store
from kdcache.store.fingerprint import store_key
from kdcache.train.config import TrainConfig
from kdcache.train.tiny import build_split_tokenizer, build_tokenizer, save_tiny
from kdcache.train.trainer import train

TOK = build_tokenizer()

ROWS = [
    {"id": "p0", "prompt": "sort : 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1",
     "context": "the answer is 1 2 3"},
    {"id": "p1", "prompt": "sort : 2 1", "chosen": "1 2 ", "rejected": "2 1"},  # text kept
    {"id": "p2", "prompt": [{"role": "user", "content": "sort : 1 3"}], "chosen": "1 3",
     "rejected": "3 1", "context": "ascending"},
    {"id": "p3", "prompt": "sort : 0 4 2", "chosen": "0 2 4", "rejected": "4 2 0"},
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtok-rollout")
    save_tiny(d / "teacher", TOK, hidden=32, layers=1, heads=2, seed=1)
    save_tiny(d / "split", build_split_tokenizer(), hidden=32, layers=1, heads=2, seed=3)
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    common = dict(model=str(d / "teacher"), data=str(d / "prefs.jsonl"), max_new_tokens=6,
                  out_root=str(d / "rollouts"), progress=False, codec="lossless")
    # ADPA+'s second stage: student rollouts with the dataset's chosen response (L_SFT)
    student = run_rollout(RolloutConfig(**common, n=2, include_chosen=True, role="student_rollout"))
    # SeqKD / PBSD's y+: teacher rollouts sampled WITH the context
    teacher = run_rollout(RolloutConfig(**common, n=2, role="teacher_rollout", use_context=True))
    score = dict(teacher=str(d / "teacher"), reference=str(d / "teacher"), k=5, betas=[1.0],
                 out_root=str(d / "stores"), progress=False, codec="lossless")
    return {"dir": d, "student": student, "teacher": teacher, "score": score,
            "scored": run_precompute(PrecomputeConfig(input_store=student, **score)),
            "scored_teacher": run_precompute(PrecomputeConfig(input_store=teacher, **score)),
            "dataset": run_precompute(PrecomputeConfig(data=str(d / "prefs.jsonl"), **score))}


def _by_key(url):
    return {(r["example_id"], r["role"], r["group"]): r for r in open_store(url)}


def test_rollout_text_is_what_precompute_writes(work):
    from_data = _by_key(work["dataset"])
    for url in (work["student"], work["teacher"]):
        store = open_store(url)
        assert store.meta.options["text"] == ["prompt_source", "response_text"]
        for r in store:
            want = from_data[(r["example_id"], "chosen", 0)]
            # the same JSON form precompute writes for the dataset row: the prompt WITHOUT
            # the context, also where the teacher sampled with it
            assert r["prompt_source"] == want["prompt_source"]
            assert r["prompt_ids"].tolist() == want["prompt_ids"].tolist()
            if r["role"] == "chosen":  # the dataset's response: precompute's text rule
                assert r.get("response_text") == want.get("response_text")
                assert r["response_ids"].tolist() == want["response_ids"].tolist()
            else:  # sampled: text only where the plain decoding does not spell its ids
                assert r.get("response_text") == sampled_text(TOK, r["response_ids"].tolist(),
                                                              TOK.eos_token_id)
    recs = _by_key(work["student"])
    assert recs[("p1", "chosen", 0)]["response_text"] == "1 2 "  # decodes to "1 2"
    assert json.loads(recs[("p2", "student_rollout", 1)]["prompt_source"])[0]["role"] == "user"
    ctx = _by_key(work["teacher"])[("p0", "teacher_rollout", 0)]
    assert len(ctx["teacher_prompt_ids"]) > len(ctx["prompt_ids"])
    assert "answer" not in ctx["prompt_source"]


def test_sampled_text_rule():
    """Kept only where decoding (as translate.py does) loses what the ids spell."""
    ids = TOK("1 2 3", add_special_tokens=False)["input_ids"]
    assert sampled_text(TOK, [*ids, TOK.eos_token_id], TOK.eos_token_id) is None
    assert sampled_text(TOK, [], TOK.eos_token_id) is None

    class CleanUp:  # a tokenizer whose default decoding cleans up spaces (" ." -> ".")
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True):
            text = " ".join(str(i) for i in ids) + " ."
            return text.replace(" .", ".") if clean_up_tokenization_spaces else text

    assert sampled_text(CleanUp(), [4, 5, 2], 2) == "4 5 ."
    assert sampled_text(CleanUp(), [4, 5], 2) == "4 5 ."


def test_scoring_carries_the_text_through(work):
    for rollout, scored in ((work["student"], work["scored"]),
                            (work["teacher"], work["scored_teacher"])):
        src, out = _by_key(rollout), _by_key(scored)
        assert set(src) == set(out)
        for key, r in out.items():
            assert r["prompt_source"] == src[key]["prompt_source"]
            assert r.get("response_text") == src[key].get("response_text")


def _train(work, url, out, **kw):
    d = work["dir"]
    base = dict(model=str(d / "split"), store=url, out=str(out), max_steps=2, batch_groups=2,
                lr=1e-3, chunk_size=4, progress=False, log_every=1, kd_mode="tail",
                cross_tokenizer="map")
    return train(TrainConfig(**{**base, **kw}))


@pytest.mark.parametrize("objective,store", [("adpa", "scored"), ("seqkd", "scored_teacher")])
def test_cross_tokenizer_trains_on_rollouts(work, tmp_path, monkeypatch, objective, store):
    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))
    res = _train(work, work[store], tmp_path / "r", objective=objective)
    assert res.steps == 2 and np.isfinite(res.final_loss)
    rows = [json.loads(x) for x in (Path(res.out) / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["aligned_fraction"] < 1  # the split student aligns some positions
    if objective == "adpa":
        assert 0 < rows[-1]["mapped_topk_mass"] <= 1


def test_old_rollout_store_without_text_is_refused(work, tmp_path):
    """A rollout store as kdcache wrote it before rollouts carried text: other key, and a
    cross-tokenizer run on its scored store stops with one line naming `kdcache rollout`."""
    new = open_store(work["student"])
    meta = dataclasses.replace(new.meta, options={k: v for k, v in new.meta.options.items()
                                                  if k != "text"})
    assert store_key(meta) != store_key(new.meta)  # never reused for, or resumed into
    old = str(tmp_path / "old-rollout")
    with StoreWriter(old, meta, shard_records=8) as w:
        for g in new.groups():
            w.add_group([{k: v for k, v in r.items() if k not in ("prompt_source", "response_text")}
                         for r in g])
    assert "prompt_source" not in open_store(old)[0]
    scored = run_precompute(PrecomputeConfig(input_store=old, **work["score"]))
    assert "prompt_source" not in open_store(scored)[0]
    with pytest.raises(ValueError) as e:
        _train(work, scored, tmp_path / "r", objective="adpa")
    msg = str(e.value)
    assert "\n" not in msg and "carries no prompt text" in msg
    assert "re-run `kdcache rollout`" in msg and "--input-store" in msg
