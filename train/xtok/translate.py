"""A store record (teacher tokens) as a record in the student's tokens (METHODS §5).

Runs in the data loader, per record, before collate: the student re-tokenizes the prompt
(its own chat template) and the response text, positions are aligned by identical spans
(align.py) and the teacher's top-K ids go through the vocabulary map (vocab_map.py), so the
training step sees an ordinary batch plus two masks and does nothing but tensor lookups:

- `topk_ids` [T', K]: M(id_k) at aligned positions for mapped ids, 0 elsewhere;
  `topk_logprobs` / `ref_topk_logprobs`: the teacher's values there, FLOOR elsewhere
  (exp(FLOOR) is exactly 0 in float32, so such a slot holds no teacher mass, no advantage
  and — with the student's log-prob replaced by FLOOR too, `student_topk` — no student mass:
  the tail-mode KD of §5 is the ordinary tail-mode KD over the mapped slots);
  several teacher ids that map to one student id are one slot (probabilities summed).
- `xtok_slots` [T', K] bool: the mapped slots; `xtok_aligned` [T'] bool: aligned positions.
- `uld_teacher` [T', K] (ULD): the teacher's top-K log-probs at aligned positions, no map.
- `token_logprob` / `ref_token_logprob`: a sequence's sum sits on its first response
  position (zeros elsewhere), so every masked sum over the response is the stored sum:
  a sequence's log-probability is a property of its text (DPO, PBSD).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .align import align_spans, encode_with_offsets, teacher_offsets

__all__ = ["FLOOR", "AlignStats", "CrossTokenizer", "MissingText"]

FLOOR = -1.0e4
SEQ_SUM_FIELDS = ("token_logprob", "ref_token_logprob")


class MissingText(ValueError):
    """A record without the text a student with another tokenizer needs."""


@dataclass
class AlignStats:
    """Counts behind the two numbers reported per store and student tokenizer."""

    records: int = 0
    student_tokens: int = 0
    aligned: int = 0
    topk_mass: float = 0.0  # Σ over aligned positions of the teacher's stored top-K mass
    mapped_mass: float = 0.0  # ... of the part whose ids map to a student id
    unspanned: int = 0  # records whose teacher ids could not be re-spanned over the text

    def add(self, other: AlignStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def aligned_fraction(self) -> float:
        return self.aligned / max(self.student_tokens, 1)

    @property
    def mapped_mass_fraction(self) -> float:
        return self.mapped_mass / self.topk_mass if self.topk_mass > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        return {"aligned_fraction": self.aligned_fraction,
                "mapped_topk_mass": self.mapped_mass_fraction,
                "records": self.records, "student_tokens": self.student_tokens}


class CrossTokenizer:
    """Callable record -> student record; `stats` accumulates over every record seen."""

    def __init__(self, teacher_tok: Any, student_tok: Any, vmap: torch.Tensor, mode: str = "map",
                 own_topk: int = 0):
        self.own_topk = int(own_topk)  # ULD: the student's own K largest are gathered too
        if mode not in ("map", "uld"):
            raise ValueError(f"cross-tokenizer mode must be map or uld, got {mode!r}")
        self.t_tok, self.s_tok, self.mode = teacher_tok, student_tok, mode
        self.vmap = vmap.numpy() if isinstance(vmap, torch.Tensor) else np.asarray(vmap)
        self.t_eos, self.s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
        if self.s_eos is None:
            raise ValueError("the student tokenizer has no eos_token: responses must end with one")
        self.stats = AlignStats()
        self._prompts: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ text
    def prompt_ids(self, record: dict) -> np.ndarray:
        src = record.get("prompt_source")
        if src is None:
            raise MissingText(_missing_text(record))
        hit = self._prompts.get(src)
        if hit is not None:
            return hit
        p = json.loads(src)
        tok = self.s_tok
        if isinstance(p, list) or getattr(tok, "chat_template", None):
            msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
            text, special = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
        else:
            text, special = p, True
        ids = np.asarray(tok(text, add_special_tokens=special)["input_ids"], dtype=np.int64)
        if len(self._prompts) > 4096:
            self._prompts.clear()
        self._prompts[src] = ids
        return ids

    def response(self, record: dict, stats: AlignStats) -> tuple[np.ndarray, np.ndarray]:
        """Student response ids and, per student position, the aligned teacher position (-1)."""
        t_ids = [int(x) for x in record["response_ids"]]
        terminal = bool(t_ids) and t_ids[-1] == self.t_eos
        body = t_ids[:-1] if terminal else t_ids
        text = record.get("response_text")
        if text is None:
            text = self.t_tok.decode(body, skip_special_tokens=False)
        t_spans = teacher_offsets(self.t_tok, body, text)
        stats.unspanned += int(t_spans is None and bool(body))
        s_ids, s_spans = encode_with_offsets(self.s_tok, text)
        align = align_spans(t_spans, s_spans)
        if terminal:  # both responses end with their EOS: those positions align
            s_ids = [*s_ids, self.s_eos]
            align = np.append(align, len(body))
        return np.asarray(s_ids, dtype=np.int64), align

    # ------------------------------------------------------------------ the record
    def __call__(self, record: dict) -> dict:
        stats = AlignStats(records=1)
        s_resp, align = self.response(record, stats)
        T, K = len(s_resp), None
        ok = align >= 0
        stats.student_tokens, stats.aligned = T, int(ok.sum())
        out = {k: record[k] for k in ("example_id", "role", "group", "is_terminal", "reward")
               if k in record}
        out.update(prompt_ids=self.prompt_ids(record), response_ids=s_resp, n_tokens=T,
                   teacher_prompt_ids=None)
        out["xtok_aligned"] = ok
        src = align[ok]
        if "topk_logprobs" in record:
            lp = np.asarray(record["topk_logprobs"], dtype=np.float32)
            K = lp.shape[1]
            if self.mode == "uld":  # no map: no mapped mass to report
                u = np.full((T, K), FLOOR, dtype=np.float32)
                u[ok] = lp[src]
                out["uld_teacher"] = u
            elif "topk_ids" in record:
                stats.topk_mass = float(np.exp(lp[src].astype(np.float64)).sum())
                self._mapped(record, lp, ok, src, out, stats)
        for name in SEQ_SUM_FIELDS:
            if name in record and record[name] is not None:
                v = np.zeros(T, dtype=np.float32)
                if T:
                    v[0] = np.float32(np.asarray(record[name], dtype=np.float64).sum())
                out[name] = v
        self.stats.add(stats)
        return out

    def _mapped(self, record: dict, lp: np.ndarray, ok: np.ndarray, src: np.ndarray,
                out: dict, stats: AlignStats) -> None:
        T, K = len(ok), lp.shape[1]
        t_ids = np.asarray(record["topk_ids"], dtype=np.int64)[src]  # [A, K]
        inside = (t_ids >= 0) & (t_ids < len(self.vmap))
        mapped = np.where(inside, self.vmap[np.clip(t_ids, 0, len(self.vmap) - 1)], -1)
        slots = mapped >= 0
        a_lp = np.where(slots, lp[src], FLOOR).astype(np.float32)
        ref = record.get("ref_topk_logprobs")
        a_ref = (None if ref is None else
                 np.where(slots, np.asarray(ref, dtype=np.float32)[src], FLOOR).astype(np.float32))
        _merge_duplicates(mapped, slots, a_lp, a_ref)
        stats.mapped_mass = float(np.where(slots, np.exp(a_lp.astype(np.float64)), 0.0).sum())
        ids = np.zeros((T, K), dtype=np.int64)
        ids[ok] = np.where(slots, mapped, 0)
        full_lp = np.full((T, K), FLOOR, dtype=np.float32)
        full_lp[ok] = a_lp
        s = np.zeros((T, K), dtype=bool)
        s[ok] = slots
        out.update(topk_ids=ids, topk_logprobs=full_lp, xtok_slots=s)
        if a_ref is not None:
            full_ref = np.full((T, K), FLOOR, dtype=np.float32)
            full_ref[ok] = a_ref
            out["ref_topk_logprobs"] = full_ref


def _missing_text(record: dict) -> str:
    """The one line for a record without text (a store written before its records carried
    it): what to re-run, for a store precomputed from a dataset and from a rollout store."""
    return (f"record {record.get('example_id')!r} ({record.get('role')}) carries no prompt text, "
            "which a student with another tokenizer re-tokenizes: the store was written before "
            "records carried text; re-run `kdcache precompute` with this kdcache (a new store "
            "key), and if it was scored from rollouts, first re-run `kdcache rollout` (a new key, "
            "with text) and point `kdcache precompute --input-store` at the new rollout store")


def _merge_duplicates(mapped: np.ndarray, slots: np.ndarray, lp: np.ndarray,
                      ref: np.ndarray | None) -> None:
    """In place: where several slots of a row map to one student id, the first keeps the
    summed probability (log-add-exp) and the others stop being slots."""
    srt = np.sort(np.where(slots, mapped, -1 - np.arange(mapped.shape[1])), axis=1)
    rows = np.nonzero((np.diff(srt, axis=1) == 0).any(axis=1))[0]
    for r in rows:
        first: dict[int, int] = {}
        for k in range(mapped.shape[1]):
            if not slots[r, k]:
                continue
            m = int(mapped[r, k])
            if m in first:
                f = first[m]
                lp[r, f] = np.logaddexp(lp[r, f], lp[r, k])
                if ref is not None:
                    ref[r, f] = np.logaddexp(ref[r, f], ref[r, k])
                slots[r, k], lp[r, k] = False, FLOOR
                if ref is not None:
                    ref[r, k] = FLOOR
            else:
                first[m] = k


def student_topk(student_topk_logprobs: torch.Tensor | None, stored: dict) -> torch.Tensor | None:
    """The student's log-probs at the mapped slots; FLOOR at the others, so a slot that is
    not a mapped teacher id holds no student mass (METHODS §5 tail mode)."""
    slots = stored.get("xtok_slots")
    if slots is None or student_topk_logprobs is None:
        return student_topk_logprobs
    floor = torch.full((), FLOOR, dtype=student_topk_logprobs.dtype, device=student_topk_logprobs.device)
    return torch.where(slots.bool(), student_topk_logprobs, floor)
