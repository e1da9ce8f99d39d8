"""The store's vocabulary: schema version, field registry and `StoreMeta`.

Why one registry: the writer validates, the reader slices and the codecs quantise from the
same table, so a field's dtype or row rule ("T" vs "T+1") is written down exactly once.
Field names and meanings are those of docs/METHODS.md §1 and docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "CRC_SCHEMA_VERSIONS",
    "ROLES",
    "SequenceField",
    "TokenField",
    "SEQUENCE_FIELDS",
    "TEXT_FIELDS",
    "TOKEN_FIELDS",
    "TEACHER_FIELDS",
    "REF_FIELDS",
    "TOPK_FIELDS",
    "PADDED_FIELDS",
    "StoreMeta",
    "token_shape",
]

#: Version written by this code.  Readers accept every version in SUPPORTED_SCHEMA_VERSIONS
#: and refuse newer ones (a newer writer may have added fields we would silently drop).
#:   1 — lossless float32/int32 + blosc only; manifest `fields` entries carry no `codec`.
#:   2 — adds the compact bounded-error codecs (declared in each array's zarr.json) and the
#:       manifest's per-field `codec` description and `shard_records`.
#:   3 — compact reals use the `kdcache.gridq` codec (float32 grid, sign/delta/zigzag);
#:       compact `ref_topk_logprobs` is stored as the integer advantage array `topk_adv`;
#:       `topk_ids` are stored rank-major (`transpose`).  Same fields, same reader API.
#:   4 — integrity on the read path: every array's codec chain ends in `crc32c` (checked on
#:       every chunk decoded), every file's crc32c is in the manifest (checked on fetch for
#:       records.parquet and zarr.json), and `manifest_checksum` covers the manifest itself
#:       (meta, store_key, shard list).  Same fields and codecs as 3 otherwise.
#:   5 — `topk_ids` as codes into a per-shard table (`kdcache.idmap`: distinct ids, frequent
#:       first), token-major, one zstd frame per chunk (or v4's rank-major blosc where that is
#:       smaller, per shard); the advantage array byte- or bit-shuffled, whichever is
#:       smaller.  −36 B/token at 32k-152k vocabularies; same fields, values and reader API.
SCHEMA_VERSION = 5
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3, 4, 5)
#: Versions whose manifest and files carry crc32c checksums (cheap to check on every read).
CRC_SCHEMA_VERSIONS = (4, 5)

ROLES = ("chosen", "rejected", "sft", "student_rollout", "teacher_rollout")


@dataclass(frozen=True)
class SequenceField:
    """A per-sequence column of `records.parquet`."""

    name: str
    arrow_type: pa.DataType
    required: bool  # must be present in every record dict
    nullable: bool  # None is allowed as a value


@dataclass(frozen=True)
class TokenField:
    """A per-token Zarr array.

    `trailing` is "" (shape [rows]), "k" (shape [rows, K]) or "b" (shape [rows, B]);
    `extra_row` means rows = T + 1 (the state after the last token) instead of T;
    `kind` picks the codec family: "ids" (exact integers), "logprob" (≤ 0 log-probs,
    quantisable), "value" (unbounded real, quantisable); `source` is the model whose forward
    produces it: "teacher", "reference" or "behavior" (the sampler, carried from rollouts).
    """

    name: str
    dtype: str
    trailing: str
    extra_row: bool
    kind: str
    descending: bool = False  # rows are sorted descending along the trailing axis
    source: str = "teacher"


SEQUENCE_FIELDS: dict[str, SequenceField] = {
    f.name: f
    for f in (
        SequenceField("example_id", pa.string(), True, False),
        SequenceField("role", pa.string(), True, False),
        SequenceField("group", pa.int32(), False, False),
        SequenceField("prompt_ids", pa.list_(pa.int32()), True, False),
        SequenceField("response_ids", pa.list_(pa.int32()), True, False),
        SequenceField("teacher_prompt_ids", pa.list_(pa.int32()), False, True),
        SequenceField("is_terminal", pa.bool_(), True, False),
        SequenceField("reward", pa.float32(), False, True),
        SequenceField("n_tokens", pa.int32(), False, False),
        # Text for a student with another tokenizer (METHODS §5).  Written only when a
        # record of the shard carries one, so stores without text keep their exact bytes.
        # `prompt_source`: the dataset's prompt field as JSON (a string or a message list);
        # `response_text`: set only where decoding `response_ids` does not give it back.
        SequenceField("prompt_source", pa.string(), False, True),
        SequenceField("response_text", pa.string(), False, True),
    )
}
#: The optional text columns above (absent from older stores, and from stores without text).
TEXT_FIELDS = ("prompt_source", "response_text")

TOKEN_FIELDS: dict[str, TokenField] = {
    f.name: f
    for f in (
        TokenField("topk_ids", "int32", "k", False, "ids"),
        TokenField("topk_logprobs", "float32", "k", False, "logprob", descending=True),
        TokenField("token_logprob", "float32", "", False, "logprob"),
        TokenField("ref_topk_logprobs", "float32", "k", False, "logprob", source="reference"),
        TokenField("ref_token_logprob", "float32", "", False, "logprob", source="reference"),
        TokenField("soft_value", "float32", "b", True, "value"),
        TokenField("behavior_logprob", "float32", "", False, "logprob", source="behavior"),
    )
}

# The groups every user of the store names, derived from the table above (in its order).
#: Fields the DPO teacher's forward produces (precompute's default with a teacher).
TEACHER_FIELDS: tuple[str, ...] = tuple(n for n, f in TOKEN_FIELDS.items() if f.source == "teacher")
#: Fields the reference's forward produces (ref_topk_logprobs at the teacher's top-K ids).
REF_FIELDS: tuple[str, ...] = tuple(n for n, f in TOKEN_FIELDS.items() if f.source == "reference")
#: Fields with a top-K axis (computed only when one of them is stored).
TOPK_FIELDS: tuple[str, ...] = tuple(n for n, f in TOKEN_FIELDS.items() if f.trailing == "k")
#: Fields with one row per response token (a batch pads them to T; the others to T + 1).
PADDED_FIELDS: tuple[str, ...] = tuple(n for n, f in TOKEN_FIELDS.items() if not f.extra_row)


def token_shape(name: str, n_tokens: int, k: int, n_betas: int) -> tuple[int, ...]:
    """Expected shape of per-token field `name` for a sequence of `n_tokens` tokens."""
    f = TOKEN_FIELDS[name]
    rows = n_tokens + 1 if f.extra_row else n_tokens
    if f.trailing == "k":
        return (rows, k)
    if f.trailing == "b":
        return (rows, n_betas)
    return (rows,)


@dataclass
class StoreMeta:
    """What a store holds and where it came from (stored in the manifest).

    `models` maps a role ("dpo", "ref", "student", ...) to a fingerprint dict; `tokenizer`
    and `dataset` are fingerprint dicts; `options` holds producer options that shape the
    data (e.g. `{"codec": "compact", "error_bound": 2e-3}`); `code_version` is provenance
    only and is left out of the store key.
    """

    k: int
    betas: list[float] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]
        self.fields = list(self.fields)
        self.k = int(self.k)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when the meta cannot describe a well-formed store."""
        unknown = [f for f in self.fields if f not in TOKEN_FIELDS]
        if unknown:
            raise ValueError(
                f"StoreMeta.fields has unknown per-token field(s) {unknown}; "
                f"known fields are {sorted(TOKEN_FIELDS)}"
            )
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"StoreMeta.fields lists a field twice: {self.fields}")
        needs_k = [f for f in self.fields if TOKEN_FIELDS[f].trailing == "k"]
        if needs_k and self.k <= 0:
            raise ValueError(f"StoreMeta.k must be > 0 when storing {needs_k}; got k={self.k}")
        if "soft_value" in self.fields and not self.betas:
            raise ValueError("StoreMeta.betas is empty but 'soft_value' is stored: pass the β list")

    @property
    def scored_vocab(self) -> int | None:
        """How many ids [0, V) the teachers scored (their tokenizer's; padded output rows
        beyond it were dropped). None when the store does not say."""
        tok = self.tokenizer if isinstance(self.tokenizer, dict) else {}
        return None if tok.get("vocab_size") is None else int(tok["vocab_size"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreMeta:
        known = {"k", "betas", "fields", "models", "tokenizer", "dataset", "options", "code_version"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"StoreMeta dict has unknown keys {sorted(extra)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def content_dict(self) -> dict[str, Any]:
        """The parts that must match for two writers to share a store (no code_version)."""
        d = self.to_dict()
        d.pop("code_version")
        return d
