"""The one door from precompute/ into kdcache.store (precompute writes only through it)."""

from __future__ import annotations

from kdcache.store import (
    NoStoreError,
    StoreMeta,
    StoreWriter,
    open_store,
    probe_writable,
    resolve_codec,
    store_key,
)

__all__ = ["NoStoreError", "StoreMeta", "StoreWriter", "open_store", "probe_writable",
           "resolve_codec", "store_key"]
