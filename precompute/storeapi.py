"""The one door from precompute/ into kdcache.store (precompute writes only through it)."""

from __future__ import annotations

from kdcache.store import (
    REF_FIELDS,
    TEACHER_FIELDS,
    TOPK_FIELDS,
    NoStoreError,
    StoreMeta,
    StoreWriter,
    check_output,
    describe_files,
    lock_for,
    open_store,
    resolve_codec,
    store_key,
)
from kdcache.store.admin import merge
from kdcache.store.format import TEXT_FIELDS
from kdcache.store.tokfiles import TOKENIZER_FILE_NAMES

__all__ = ["REF_FIELDS", "TEACHER_FIELDS", "TEXT_FIELDS", "TOKENIZER_FILE_NAMES", "TOPK_FIELDS",
           "NoStoreError", "StoreMeta", "StoreWriter", "check_output", "describe_files", "lock_for",
           "merge", "open_store", "resolve_codec", "store_key"]
