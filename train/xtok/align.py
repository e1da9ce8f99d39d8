"""Aligning a student's tokens with the teacher's over the same text (METHODS §5).

Student position t' and teacher position t are aligned iff their character spans over the
response text are identical (same start, same end). Spans come from each tokenizer's own
offsets (`return_offsets_mapping`), so normalisers and pre-tokenizers are honoured. A span
that two tokens of one side share (a character split into byte tokens) is ambiguous and
aligns nowhere. Pure functions of token ids and offsets; the data loader calls them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["encode_with_offsets", "teacher_offsets", "align_spans"]

Span = tuple[int, int]


def encode_with_offsets(tok: Any, text: str) -> tuple[list[int], list[Span]]:
    """The tokenizer's ids for `text` (no special tokens added) and their character spans."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def teacher_offsets(tok: Any, ids: list[int], text: str) -> list[Span] | None:
    """Spans of the stored teacher ids over `text`: re-encoding the text must give back
    exactly the stored ids (it does for text precompute tokenized); None otherwise, and then
    no position of that sequence aligns (counted in the aligned fraction)."""
    again, spans = encode_with_offsets(tok, text)
    return spans if again == list(ids) else None


def align_spans(teacher: list[Span] | None, student: list[Span]) -> np.ndarray:
    """For every student position, the teacher position with the identical span, else -1."""
    out = np.full(len(student), -1, dtype=np.int64)
    if not teacher:
        return out
    t_pos: dict[Span, int] = {}
    t_dup: set[Span] = set()
    for i, s in enumerate(teacher):
        if s in t_pos:
            t_dup.add(s)
        t_pos[s] = i
    s_count: dict[Span, int] = {}
    for s in student:
        s_count[s] = s_count.get(s, 0) + 1
    for j, s in enumerate(student):
        if s[1] > s[0] and s in t_pos and s not in t_dup and s_count[s] == 1:
            out[j] = t_pos[s]
    return out
