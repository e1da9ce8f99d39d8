"""The one door from precompute/ into kdcache.store (precompute writes only through it)."""

from __future__ import annotations

from kdcache.store import (
    REF_FIELDS,
    TEACHER_FIELDS,
    TOPK_FIELDS,
    NoStoreError,
    StoreMeta,
    StoreWriter,
    open_store,
    resolve_codec,
    store_key,
)

__all__ = ["REF_FIELDS", "TEACHER_FIELDS", "TOPK_FIELDS", "NoStoreError", "StoreMeta", "StoreWriter", "open_store", "resolve_codec", "store_key"]
