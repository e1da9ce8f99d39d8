"""Batched teacher forwards: sequences -> final hidden states at the scored positions -> records.

The causal LM's `lm_head` is never called: we run the decoder stack (`base_model`), keep only
the hidden states of the T+1 response states of each sequence, and reduce them with
`scoring.score_chunked`, so `[tokens, V]` logits never exist.

Batching: sequences are sorted by length and packed into batches under a token budget.
Two layouts:
- padded (default; any attention backend): right-padded rows, an attention mask;
- packed: all sequences of a batch concatenated into ONE row with position_ids restarting at
  0 per sequence and no attention mask; transformers then builds a block-diagonal causal mask
  (flash_attention_2 uses varlen kernels), so no compute is spent on padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .data import Sequence
from .models import base_model
from .records import sequence_record
from .scoring import LMHead, score_chunked
from .storeapi import REF_FIELDS, TEACHER_FIELDS, TOPK_FIELDS


@dataclass
class Scorer:
    """One teacher: its decoder stack and its output head."""

    model: nn.Module
    head: LMHead
    base: nn.Module

    @classmethod
    def from_model(cls, model: nn.Module, vocab: int | None = None) -> Scorer:
        """`vocab`: score ids [0, vocab) only; a head with more rows (vocabulary padding no
        tokenizer emits) is sliced (a view: no copy), so log_softmax, top-K and soft values
        are over the tokenizer's ids."""
        head = LMHead.from_model(model)
        if vocab is not None and head.vocab_size != vocab:
            if head.vocab_size < vocab:
                raise ValueError(f"{type(model).__name__} has {head.vocab_size} output rows, fewer "
                                 f"than the {vocab} token ids of its tokenizer")
            head = dataclasses.replace(
                head, weight=head.weight[:vocab],
                bias=None if head.bias is None else head.bias[:vocab])
        return cls(model=model, head=head, base=base_model(model))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def hidden_at_states(self, seqs: Seq[tuple[Seq[int], Seq[int]]], pad_id: int,
                         packed: bool = False) -> Tensor:
        """Final hidden states [sum(T_i + 1), H] at the states s_1..s_{T+1} of each sequence.

        s_t (before response token t) is the hidden state at position P - 2 + t of prompt+response;
        s_{T+1} is the last position.
        """
        dev = self.device
        lens = [len(p) + len(r) for p, r in seqs]
        if packed:
            ids = torch.from_numpy(np.concatenate([_ids(p, r) for p, r in seqs])).to(dev)[None]
            pos = torch.cat([torch.arange(n, device=dev) for n in lens]).unsqueeze(0)
            hid = self.base(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
            starts = np.cumsum([0] + lens[:-1])
            index = [torch.arange(s + len(p) - 1, s + n, device=dev)
                     for s, n, (p, _) in zip(starts, lens, seqs, strict=True)]
            return hid[torch.cat(index)]
        width = max(lens)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
        for i, (p, r) in enumerate(seqs):
            ids[i, : lens[i]] = torch.from_numpy(_ids(p, r))
            mask[i, : lens[i]] = 1
        hid = self.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = torch.cat([torch.full((lens[i] - len(p) + 1,), i, device=dev)
                          for i, (p, _) in enumerate(seqs)])
        cols = torch.cat([torch.arange(len(p) - 1, lens[i], device=dev)
                          for i, (p, _) in enumerate(seqs)])
        return hid[rows, cols]


def _ids(prompt: Seq[int], response: Seq[int]) -> np.ndarray:
    """prompt + response as one int64 array (from int32 arrays or lists)."""
    return np.concatenate([np.asarray(prompt, np.int64), np.asarray(response, np.int64)])


def targets_for(seqs: Seq[Sequence], device: torch.device) -> Tensor:
    """Next-token targets for the scored states: each response, then -1 for s_{T+1}."""
    return torch.from_numpy(np.concatenate(
        [_ids(s.response_ids, [-1]) for s in seqs])).to(device)


def needs_teacher(fields: Seq[str]) -> bool:
    """Whether storing `fields` needs the DPO teacher's forward (ref_topk_logprobs is
    gathered at the teacher's top-K ids; ref_token_logprob alone needs only the reference)."""
    return any(f in TEACHER_FIELDS or f == "ref_topk_logprobs" for f in fields)


def score_sequences(
    seqs: list[Sequence],
    dpo: Scorer | None,
    ref: Scorer | None,
    k: int,
    betas: Seq[float],
    pad_id: int,
    eos_id: int,
    chunk: int | None = None,
    ref_mode: str = "exact",
    packed: bool = False,
    per_seq: list[dict[str, float]] | None = None,
    fields: Seq[str] | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Score one batch of sequences with the DPO teacher (and reference); returns records and
    batch sums for the store report (top-K mass, paper-approximation error). `per_seq`, if
    given, receives the same sums per sequence (a resumed run writes part of a batch).

    `fields` (default: every field the given models produce) picks the per-token fields of
    the records; top-K and soft values are computed only when stored, and a store of
    `ref_token_logprob` alone runs only the reference. `ref is dpo` (one model as teacher and
    reference) runs one forward: the reference's fields are the teacher's own."""
    if fields is None:
        fields = (TEACHER_FIELDS if dpo is not None else ()) + (REF_FIELDS if ref is not None else ())
    fields = tuple(fields)
    pairs = [(s.scored_prompt, s.response_ids) for s in seqs]
    k_eff = k if any(f in TOPK_FIELDS for f in fields) else 0
    b_eff = list(betas) if "soft_value" in fields else []
    if needs_teacher(fields):
        if dpo is None:
            raise ValueError(f"score_sequences: storing {list(fields)} needs the teacher")
        h = dpo.hidden_at_states(pairs, pad_id, packed)
        use_ref = ref is not None and any(f in REF_FIELDS for f in fields)
        rh = None
        if use_ref:
            rh = h if ref is dpo else ref.hidden_at_states(pairs, pad_id, packed).to(h.device)
        out = score_chunked(h, dpo.head, targets_for(seqs, h.device), k_eff, b_eff, chunk,
                            ref_hidden=rh, ref_lm_head=ref.head if use_ref else None,
                            ref_mode=ref_mode)
    else:  # sequence log-probs of the reference only (e.g. a DPO store): one forward
        if ref is None:
            raise ValueError(f"score_sequences: storing {list(fields)} needs the reference")
        h = ref.hidden_at_states(pairs, pad_id, packed)
        out = score_chunked(h, ref.head, targets_for(seqs, h.device), 0, [], chunk)
        out["ref_token_logprob"] = out.pop("token_logprob")
    cpu = {name: t.cpu().numpy() for name, t in out.items()}
    records, start = [], 0
    sums = {"tokens": 0.0, "topk_mass": 0.0, "ref_paper_abs_err": 0.0}
    for s in seqs:
        t = len(s.response_ids)
        sl = slice(start, start + t)  # rows for s_1..s_T; row start+t is s_{T+1}
        mine = {"tokens": float(t), "topk_mass": 0.0, "ref_paper_abs_err": 0.0}
        if "topk_mass" in cpu:
            mine["topk_mass"] = float(cpu["topk_mass"][sl].sum())
        if "ref_paper_abs_err" in cpu:
            mine["ref_paper_abs_err"] = float(cpu["ref_paper_abs_err"][sl].sum())
        rec = sequence_record(s, eos_id)
        for f in fields:
            rows = slice(start, start + t + 1) if f == "soft_value" else sl  # T+1 states
            rec[f] = cpu[f][rows].astype(np.int32) if f == "topk_ids" else cpu[f][rows]
        for key, v in mine.items():
            sums[key] += v
        if per_seq is not None:
            per_seq.append(mine)
        records.append(rec)
        start += t + 1
    return records, sums


def bucket_batches(groups: list[list[Sequence]], batch_tokens: int, max_batch_seqs: int = 512,
                   packed: bool = False) -> list[list[list[Sequence]]]:
    """Pack whole groups (a group is never split, the writer needs it whole) into batches.

    Groups are sorted by their longest sequence so padded rows in a batch have similar
    lengths. Budget: padded = rows x longest row; packed = total tokens. A group larger than
    the budget still forms a batch of its own.
    """
    order = sorted(groups, key=lambda g: max(s.length for s in g))
    batches: list[list[list[Sequence]]] = []
    cur: list[list[Sequence]] = []
    n_seqs = width = total = 0
    for g in order:
        g_width = max(s.length for s in g)
        g_total = sum(s.length for s in g)
        new_cost = (total + g_total) if packed else (n_seqs + len(g)) * max(width, g_width)
        if cur and (new_cost > batch_tokens or n_seqs + len(g) > max_batch_seqs):
            batches.append(cur)
            cur, n_seqs, width, total = [], 0, 0, 0
        cur.append(g)
        n_seqs += len(g)
        width = max(width, g_width)
        total += g_total
    if cur:
        batches.append(cur)
    return batches
