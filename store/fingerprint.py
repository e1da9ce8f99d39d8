"""Stable content hashes for stores.

Why: a store is addressed by *what* it contains (teachers, tokenizer, dataset, K, betas,
fields, options, format version), so two runs with the same inputs land on the same key and
a cache hit can be detected without reading any shard.  The hash deliberately leaves out
`code_version` and timestamps: a refactor that does not change the numbers must not
invalidate a multi-GPU-hour precompute.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

__all__ = ["canonical_json", "hash_bytes", "hash_json", "store_key"]


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of raw bytes."""
    return hashlib.sha256(data).hexdigest()


def _normalise(obj: Any) -> Any:
    """Map an object onto plain JSON types so equal content hashes equally.

    Tuples become lists, numpy scalars become Python numbers, dict keys become strings.
    Non-finite floats are spelled out because JSON has no literal for them.
    """
    if isinstance(obj, dict):
        return {str(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar / array
        return _normalise(obj.tolist())
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        if obj.is_integer() and abs(obj) < 2**53:
            # 1.0 and 1 describe the same beta; keep one spelling.
            return int(obj)
        return obj
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot hash {type(obj).__name__} as JSON; convert it to dict/list/str/number")


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, normalised numbers."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def hash_json(obj: Any) -> str:
    """Hex sha256 of the canonical JSON of `obj` (stable across runs and dict orders)."""
    return hash_bytes(canonical_json(obj).encode("utf-8"))


def store_key(meta: Any, schema_version: int | None = None) -> str:
    """Content address of a store: 16 hex chars of sha256 over everything that shapes the data.

    Accepts a `StoreMeta` or its dict form.  Excludes `code_version` and times on purpose.
    `schema_version` (default: the version this code writes) is part of the key: stores of
    different on-disk formats never share an address.
    """
    from .format import SCHEMA_VERSION, StoreMeta

    m = meta if isinstance(meta, StoreMeta) else StoreMeta.from_dict(meta)
    payload = {
        "schema_version": SCHEMA_VERSION if schema_version is None else int(schema_version),
        "models": m.models,
        "tokenizer": m.tokenizer,
        "dataset": m.dataset,
        "k": m.k,
        "betas": list(m.betas),
        "fields": sorted(m.fields),
        "options": m.options,
    }
    return hash_json(payload)[:16]
