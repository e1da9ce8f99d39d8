"""The one builder of a store record's per-sequence part, for every precompute writer: the
scored records (`engine.score_sequences` adds the per-token fields to it), the tokenized-only
records (`run.py`, no teacher) and the sampled ones (`rollout.py`).

The keys are the store's per-sequence fields (`store/format.py: SEQUENCE_FIELDS`;
tests/test_precompute_records.py checks the two agree); ids go in as int32 arrays, the
store's type, so a record costs a fraction of a list of Python ints.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from .data import Sequence
from .storeapi import TEXT_FIELDS


def record(example_id: str, role: str, group: int, prompt_ids: Seq[int], response_ids: Seq[int],
           teacher_prompt_ids: Seq[int] | None, eos_id: int | None, reward: float | None = None,
           behavior_logprob: Seq[float] | None = None, text: dict[str, str] | None = None
           ) -> dict[str, Any]:
    """One record: `is_terminal` when the response ends with EOS; `behavior_logprob` (the
    sampler's log-probs) and the text fields (METHODS §5) only when given."""
    response = np.asarray(response_ids, np.int32)
    rec: dict[str, Any] = {
        "example_id": example_id, "role": role, "group": int(group),
        "prompt_ids": np.asarray(prompt_ids, np.int32),
        "response_ids": response,
        "teacher_prompt_ids": (None if teacher_prompt_ids is None
                               else np.asarray(teacher_prompt_ids, np.int32)),
        "is_terminal": bool(len(response) and int(response[-1]) == eos_id),
        "reward": reward, "n_tokens": len(response),
    }
    if behavior_logprob is not None:  # clamped to the codec's range by the writer
        rec["behavior_logprob"] = np.asarray(behavior_logprob, np.float32)
    if text:
        rec.update(text)
    return rec


def sequence_record(s: Sequence, eos_id: int | None) -> dict[str, Any]:
    """The record of a data `Sequence`, with what it carries (a rollout's reward, behavior
    log-probs and text); the scorer adds the teacher's per-token fields."""
    return record(s.example_id, s.role, s.group, s.prompt_ids, s.response_ids,
                  s.teacher_prompt_ids, eos_id, s.extra.get("reward"),
                  s.extra.get("behavior_logprob"), text_fields(s))


def text_fields(s: Sequence) -> dict[str, str]:
    """The sequence's text for a student with another tokenizer (METHODS §5), when known."""
    return {k: s.extra[k] for k in TEXT_FIELDS if s.extra.get(k) is not None}
