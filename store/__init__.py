"""kdcache.store: sharded, checksummed, resumable stores of precomputed teacher signals.

See docs/ARCHITECTURE.md for the contract and docs/STORE_FORMAT.md for the on-disk format.
"""

from .codecs import CodecSpec, register, resolve_codec
from .fingerprint import hash_bytes, hash_json, store_key
from .format import (
    PADDED_FIELDS,
    REF_FIELDS,
    ROLES,
    SCHEMA_VERSION,
    SEQUENCE_FIELDS,
    SUPPORTED_SCHEMA_VERSIONS,
    TEACHER_FIELDS,
    TOKEN_FIELDS,
    TOPK_FIELDS,
    StoreMeta,
)
from .lock import StoreLockedError, lock_for
from .output import check_output
from .reader import ChecksumError, Store, open_store
from .stream import StreamReader
from .summary import summarize
from .tokfiles import describe_files
from .writer import NoStoreError, StoreWriter

register()  # the kdcache.gridq zarr codec: plain zarr reads our shards after this import

__all__ = [
    "CodecSpec",
    "ChecksumError",
    "NoStoreError",
    "StoreLockedError",
    "check_output",
    "PADDED_FIELDS",
    "REF_FIELDS",
    "ROLES",
    "SCHEMA_VERSION",
    "SEQUENCE_FIELDS",
    "SUPPORTED_SCHEMA_VERSIONS",
    "TEACHER_FIELDS",
    "TOKEN_FIELDS",
    "TOPK_FIELDS",
    "Store",
    "StoreMeta",
    "StoreWriter",
    "StreamReader",
    "hash_bytes",
    "hash_json",
    "lock_for",
    "open_store",
    "resolve_codec",
    "store_key",
    "describe_files",
    "summarize",
]
