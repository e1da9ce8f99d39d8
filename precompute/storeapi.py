"""The one door from precompute/ into kdcache.store (precompute writes only through it)."""

from __future__ import annotations

from kdcache.store import (
    NoStoreError,
    StoreMeta,
    StoreWriter,
    describe_files,
    open_store,
    probe_writable,
    resolve_codec,
    store_key,
)
from kdcache.store.tokfiles import TOKENIZER_FILE_NAMES

__all__ = ["NoStoreError", "StoreMeta", "StoreWriter", "TOKENIZER_FILE_NAMES", "describe_files",
           "open_store", "probe_writable", "resolve_codec", "store_key"]
