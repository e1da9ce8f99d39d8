"""One record builder (precompute/records.py) for every precompute writer, keyed by the
store's own per-sequence field names (store/format.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.precompute import engine
from kdcache.precompute.data import Sequence
from kdcache.precompute.records import record, sequence_record
from kdcache.precompute.scoring import LMHead
from kdcache.store.format import SEQUENCE_FIELDS, TEACHER_FIELDS, TEXT_FIELDS
from kdcache.train.tiny import build_model

BASE = set(SEQUENCE_FIELDS) - set(TEXT_FIELDS)


@pytest.mark.parametrize("response, terminal", [([5, 6, 2], True), ([5, 6], False), ([], False)])
def test_record_has_the_stores_fields(response, terminal):
    rec = record("e1", "chosen", 3, [1, 4], response, None, eos_id=2, reward=0.5)
    assert set(rec) == BASE
    assert (rec["example_id"], rec["role"], rec["group"], rec["reward"]) == ("e1", "chosen", 3, 0.5)
    assert rec["is_terminal"] is terminal and rec["n_tokens"] == len(response)
    for name in ("prompt_ids", "response_ids"):
        assert rec[name].dtype == np.int32
    assert rec["teacher_prompt_ids"] is None
    with_all = record("e1", "student_rollout", 0, [1], response, [7, 1], 2, None,
                      behavior_logprob=[-0.5] * len(response), text={"response_text": "x"})
    assert set(with_all) == BASE | {"behavior_logprob", "response_text"}
    assert with_all["behavior_logprob"].dtype == np.float32
    assert with_all["teacher_prompt_ids"].tolist() == [7, 1]


def test_sequence_record_carries_a_rollouts_fields():
    s = Sequence("e2", "student_rollout", 1, np.array([1, 4], np.int32), np.array([5, 2], np.int32),
                 extra={"reward": 1.0, "behavior_logprob": np.array([-1.0, -2.0]),
                        "prompt_source": '"p"', "response_text": None})
    rec = sequence_record(s, eos_id=2)
    assert set(rec) == BASE | {"behavior_logprob", "prompt_source"}
    assert rec["is_terminal"] and rec["reward"] == 1.0 and rec["prompt_source"] == '"p"'


def test_scored_records_start_from_the_same_builder():
    model = build_model(32, seed=0)
    seqs = [Sequence("a", "chosen", 0, np.array([3, 4], np.int32), np.array([5, 6, 2], np.int32)),
            Sequence("a", "rejected", 0, np.array([3, 4], np.int32), np.array([7], np.int32),
                     np.array([9, 3, 4], np.int32))]
    dpo = engine.Scorer.from_model(model)
    assert isinstance(dpo.head, LMHead)
    recs, _ = engine.score_sequences(seqs, dpo, None, 4, [1.0], 0, 2)
    for s, rec in zip(seqs, recs, strict=True):
        plain = sequence_record(s, 2)
        assert set(rec) == set(plain) | set(TEACHER_FIELDS)
        for name, value in plain.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(rec[name], value)
            else:
                assert rec[name] == value, name
