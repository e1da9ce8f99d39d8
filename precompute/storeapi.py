"""The one door from precompute/ into kdcache.store (precompute writes only through it)."""

from __future__ import annotations

try:  # the package's public API, once kdcache.store exports it
    from kdcache.store import NoStoreError, StoreMeta, StoreWriter, open_store, store_key
except ImportError:  # pragma: no cover - the submodules hold the same objects
    from kdcache.store.fingerprint import store_key
    from kdcache.store.format import StoreMeta
    from kdcache.store.reader import open_store
    from kdcache.store.writer import NoStoreError, StoreWriter

__all__ = ["NoStoreError", "StoreMeta", "StoreWriter", "open_store", "store_key"]
