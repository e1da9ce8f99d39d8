"""Collate store records into padded student batches.

A record's response token t is predicted from the hidden state at input position
`P + t - 1` (P = prompt length), so the loss only ever needs those rows of the hidden
states: `rows` indexes them in the flattened [S*L, H] hidden tensor, and `index`
holds the vocabulary ids whose student log-probs each row needs (the target first,
then the teacher's top-K ids when the store has them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.store import PADDED_FIELDS, TOKEN_FIELDS

# The store's per-token fields with a row for the state after the last token (soft values).
EXTRA_ROW_FIELDS = tuple(n for n, f in TOKEN_FIELDS.items() if f.extra_row)

# Per-token fields a student with another tokenizer adds to a record (train/xtok/translate.py).
XTOK_FIELDS = ("xtok_slots", "xtok_aligned", "uld_teacher")



@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # [S, L], or [1, ΣL] when packed
    attention_mask: torch.Tensor | None  # [S, L]; None when packed
    position_ids: torch.Tensor | None = None  # packed: restarts at 0 per sequence
    rows: torch.Tensor = None  # [N] flat positions of response-predicting hidden states
    index: torch.Tensor = None  # [N, M] vocab ids to gather (col 0: the response token)
    mask: torch.Tensor = None  # [S, T] bool, response tokens
    mask_pos: torch.Tensor = None  # [N] flat positions of the True entries of `mask` (host-computed)
    targets: torch.Tensor = None  # [S, T] response ids (0 where padded)
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher fields, padded
    is_terminal: torch.Tensor | None = None  # [S] bool
    reward: torch.Tensor | None = None  # [S] float
    roles: list[str] = field(default_factory=list)
    example_ids: list[str] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # which objective block each sequence fills
    betas: tuple[float, ...] = ()  # the store's soft-value β list (soft_value's last axis)
    # ids [0, vocab) the teachers scored: a student whose lm_head has more (padding) rows
    # normalises over these only, as precompute did for the teachers (METHODS §1)
    vocab: int | None = None
    own_topk: int = 0  # ULD: also gather the student's own K largest log-probs (METHODS §5)
    # --ensemble (METHODS §4): every teacher's padded fields (teachers[0] is `stored`), its
    # top-K ids' columns in the union index `index[:, 1:]` ([S, T, K_j] each), its weight and
    # its store's β list. Empty for one teacher.
    teachers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    teacher_pos: list[torch.Tensor] = field(default_factory=list)
    teacher_weights: tuple[float, ...] = ()
    teacher_betas: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> SeqBatch:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return SeqBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids),
            rows=move(self.rows),
            index=move(self.index),
            mask=move(self.mask),
            mask_pos=move(self.mask_pos),
            targets=move(self.targets),
            stored={k: move(v) for k, v in self.stored.items()},
            is_terminal=move(self.is_terminal),
            reward=move(self.reward),
            roles=self.roles,
            example_ids=self.example_ids,
            block_ids=self.block_ids,
            betas=self.betas,
            vocab=self.vocab,
            own_topk=self.own_topk,
            teachers=[{k: move(v) for k, v in t.items()} for t in self.teachers],
            teacher_pos=[move(p) for p in self.teacher_pos],
            teacher_weights=self.teacher_weights,
            teacher_betas=self.teacher_betas,
        )


def collate(
    records: list[dict], pad_id: int = 0, max_length: int | None = None, packed: bool = False
) -> SeqBatch:
    """Right-padded batch of records; the stored teacher fields travel along, padded.

    packed=True lays all sequences end to end in ONE row with position_ids restarting at 0
    per sequence and no attention mask: transformers then attends block-diagonally (varlen
    kernels under flash_attention_2), so no compute goes to padding. The loss-side tensors
    ([S, T] masks, stored fields) are the same in both layouts."""
    if not records:
        raise ValueError("collate got no records: the store has no records of the needed roles")
    seqs, prompt_lens, resp_lens = [], [], []
    for r in records:
        p = np.asarray(r["prompt_ids"], dtype=np.int64)
        y = np.asarray(r["response_ids"], dtype=np.int64)
        if len(p) == 0:
            raise ValueError(f"record {r.get('example_id')!r} has an empty prompt")
        seq = np.concatenate([p, y])
        if max_length is not None and len(seq) > max_length:
            raise ValueError(
                f"record {r.get('example_id')!r} has {len(seq)} tokens > max_length "
                f"{max_length}: raise --max-length or re-run precompute with truncation"
            )
        seqs.append(seq)
        prompt_lens.append(len(p))
        resp_lens.append(len(y))
    S, L, T = len(seqs), max(map(len, seqs)), max(max(resp_lens), 1)
    mask = torch.zeros((S, T), dtype=torch.bool)
    targets = torch.zeros((S, T), dtype=torch.long)
    rows = []
    if packed:
        flat = np.concatenate(seqs)
        input_ids = torch.from_numpy(flat).unsqueeze(0)
        position_ids = torch.cat([torch.arange(len(q)) for q in seqs]).unsqueeze(0)
        attention_mask = None
        starts = np.concatenate([[0], np.cumsum([len(q) for q in seqs])[:-1]])
    else:
        input_ids = torch.full((S, L), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((S, L), dtype=torch.long)
        position_ids = None
        starts = np.arange(S) * L
    for s, (seq, P, Ty) in enumerate(zip(seqs, prompt_lens, resp_lens, strict=True)):
        if not packed:
            input_ids[s, : len(seq)] = torch.from_numpy(seq)
            attention_mask[s, : len(seq)] = 1
        mask[s, :Ty] = True
        targets[s, :Ty] = torch.from_numpy(seq[P:])
        rows.append(int(starts[s]) + torch.arange(P - 1, P - 1 + Ty))
    rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)

    stored = _stored(records, T)
    teachers, teacher_pos = [], []
    if all("teachers" in r for r in records):  # --ensemble: one set of fields per teacher
        teachers = [_stored([r["teachers"][j] for r in records], T) for j in range(len(records[0]["teachers"]))]
        stored = {**stored, **teachers[0]}

    index = targets[mask].unsqueeze(1)  # [N, 1]
    if teachers and "topk_ids" in teachers[0]:
        # the student's log-probs at every teacher's ids, gathered once (METHODS §4)
        union, pos = union_index([t["topk_ids"][mask].long() for t in teachers])
        index = torch.cat([index, union], dim=1)
        mask_pos = mask.flatten().nonzero().squeeze(1)
        teacher_pos = [scatter_rows(p, mask, mask_pos) for p in pos]
    elif "topk_ids" in stored:
        index = torch.cat([index, stored["topk_ids"][mask].long()], dim=1)

    def seq_field(key, dtype):
        vals = [r.get(key) for r in records]
        if any(v is None for v in vals):
            return None
        return torch.tensor([float(v) if dtype is torch.float32 else bool(v) for v in vals], dtype=dtype)

    return SeqBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        rows=rows_t,
        index=index,
        mask=mask,
        mask_pos=mask.flatten().nonzero().squeeze(1),
        targets=targets,
        stored=stored,
        is_terminal=seq_field("is_terminal", torch.bool),
        reward=seq_field("reward", torch.float32),
        roles=[str(r.get("role", "")) for r in records],
        example_ids=[str(r.get("example_id", "")) for r in records],
        teachers=teachers,
        teacher_pos=teacher_pos,
    )


def _stored(records: list[dict], T: int) -> dict[str, torch.Tensor]:
    """The per-token fields every record holds, padded: [S, T(, ...)]; soft values [S, T+1, B]."""
    stored = {}
    for name in (*PADDED_FIELDS, *XTOK_FIELDS, *EXTRA_ROW_FIELDS):
        if all(name in r and r[name] is not None for r in records):
            stored[name] = _pad([np.asarray(r[name]) for r in records], T + (name in EXTRA_ROW_FIELDS))
    return stored


def union_index(ids: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The union of several teachers' top-K ids per row, and where each teacher's ids sit in it.

    ids: per teacher j, [N, K_j] int64. Returns union [N, W] (each row's distinct ids in
    ascending order, W = the widest row's count <= Σ_j K_j, shorter rows padded with their
    smallest id: a valid id, gathered but never read) and pos_j [N, K_j] with
    union[n, pos_j[n, k]] == ids_j[n, k]. Vectorised: one sort of the concatenated ids."""
    cat = torch.cat(ids, dim=1)
    n = cat.shape[0]
    if n == 0 or cat.shape[1] == 0:
        return cat[:, :1], [torch.zeros_like(t) for t in ids]
    ordered, order = cat.sort(dim=1, stable=True)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # each sorted entry's column in the union
    width = int(slot[:, -1].max()) + 1
    union = ordered[:, :1].expand(n, width).clone()
    union.scatter_(1, slot, ordered)  # equal ids write the same value
    pos = torch.empty_like(slot).scatter_(1, order, slot)  # back to the teachers' own order
    return union, list(pos.split([t.shape[1] for t in ids], dim=1))


def _pad(arrays: list[np.ndarray], length: int) -> torch.Tensor:
    """Stack ragged [T_i, ...] arrays into [S, length, ...], zero-padded."""
    first = arrays[0]
    out = np.zeros((len(arrays), length, *first.shape[1:]), dtype=first.dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    t = torch.from_numpy(out)
    return t.float() if t.is_floating_point() else t.long()


def scatter_rows(values: torch.Tensor, mask: torch.Tensor, mask_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[N, ...] values at the response positions -> [S, T, ...] padded with zeros.

    With `mask_pos` (collate's flat positions of the mask) no op depends on the mask's values,
    so neither forward nor backward syncs the device, and the fake-tensor memory estimate can
    run it."""
    if mask_pos is None:
        mask_pos = mask.flatten().nonzero().squeeze(1)
    out = values.new_zeros((mask.numel(), *values.shape[1:])).index_copy(0, mask_pos, values)
    return out.reshape(*mask.shape, *values.shape[1:])
