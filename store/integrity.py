"""Integrity on the read path: what is checked, when, and the one-line error it raises.

Why checks on every read: a flipped byte in a compressed id chunk decodes to *other ids*
and training goes on with different weights; a flipped β in the manifest's meta silently
selects another soft-value column.  So from schema v4 on, every byte a reader uses is
covered by a checksum that it checks before the values reach a trainer:

* array chunks: the `crc32c` codec at the end of every array's codec chain, checked as each
  chunk is decoded (by `fastdecode`, or by plain zarr, which knows the codec);
* records.parquet and every zarr.json: their crc32c is in the manifest's `files` entry and
  is checked when the shard is fetched (all crc32c checks: ~1.4 % of the read's CPU time;
  sha256 of the same bytes ~6 % with SHA-NI, more without; benchmarks/results/store.md);
* the manifest: `manifest_checksum` (sha256 of its canonical JSON) covers meta, store_key
  and the shard list, and `store_key` must equal `store_key(meta)`;
* file presence and sizes: one listing of `shards/` when the store is opened.

Stores of older versions (1-3) carry only the per-file sha256 and per-shard entry
checksums: readers check those (slower, see the docs) and `store_key` against the meta.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import google_crc32c
import numpy as np

from .format import CRC_SCHEMA_VERSIONS, SUPPORTED_SCHEMA_VERSIONS

__all__ = [
    "ChecksumError",
    "crc32c",
    "manifest_checksum",
    "check_schema_version",
    "check_manifest",
    "manifest_problems",
    "check_files",
    "file_error",
    "is_chunk",
]


class ChecksumError(ValueError):
    """Stored bytes do not match their checksum (or a listed file is missing or truncated).

    A ValueError so the CLI prints it as one `error:` line.
    """


def crc32c(data: Any) -> str:
    """crc32c (Castagnoli) of a bytes-like object as 8 hex digits."""
    if not isinstance(data, bytes):  # google_crc32c takes bytes or numpy, not memoryview
        data = np.frombuffer(data, dtype=np.uint8)
    return f"{google_crc32c.value(data):08x}"


def fix_hint(url: str, shard: str | None = None) -> str:
    """What the user does about damaged shard files."""
    tail = f" to rewrite {shard} onward" if shard else ""
    return (f"run `kdcache store verify {url}` to list the damaged files, then "
            f"`kdcache store verify --repair {url}` and re-run the command that wrote the "
            f"store (precompute resumes there){tail}")


def file_error(url: str, shard: str, rel: str, what: str) -> ChecksumError:
    """The one-line error for a damaged shard file."""
    return ChecksumError(f"store {url}: shard {shard} file {rel} {what}: {fix_hint(url, shard)}")


def manifest_error(url: str, what: str) -> ChecksumError:
    return ChecksumError(
        f"store {url}: manifest.json {what}: run `kdcache store verify {url}`; restore "
        f"manifest.json from a copy, or delete the store and re-run precompute"
    )


def is_chunk(rel: str) -> bool:
    """A zarr chunk file (`tokens.zarr/<array>/c/...`), which checks itself via crc32c."""
    parts = rel.split("/")
    return len(parts) > 3 and parts[0] == "tokens.zarr" and parts[2] == "c"


def _canonical(m: dict[str, Any]) -> bytes:
    body = {k: v for k, v in m.items() if k != "manifest_checksum"}
    # The manifest is plain JSON: a JSON round trip is the identity on it, and sorted keys
    # without whitespace make the text independent of how it was indented on disk.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def manifest_checksum(m: dict[str, Any]) -> str:
    """sha256 over every key of the manifest except `manifest_checksum` itself."""
    return hashlib.sha256(_canonical(m)).hexdigest()


def check_schema_version(manifest: dict[str, Any], url: str) -> int:
    """Refuse manifests written by a newer (unknown) schema version with a clear message."""
    v = manifest.get("schema_version")
    if not isinstance(v, int) or isinstance(v, bool) or v not in SUPPORTED_SCHEMA_VERSIONS:
        newest = max(SUPPORTED_SCHEMA_VERSIONS)
        hint = (
            "it was written by a newer kdcache: upgrade kdcache to read it"
            if isinstance(v, int) and v > newest
            else "the manifest is not a kdcache manifest or is corrupt"
        )
        raise ValueError(
            f"store at {url} has schema_version={v!r}; this kdcache reads versions "
            f"{list(SUPPORTED_SCHEMA_VERSIONS)} — {hint}"
        )
    return v


def _structure_problem(m: dict[str, Any]) -> str | None:
    """What is missing from a manifest readers rely on (None when well-formed)."""
    if not isinstance(m.get("meta"), dict):
        return "has no 'meta' object"
    shards = m.get("shards")
    if not isinstance(shards, list):
        return "has no 'shards' list"
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            return f"shard entry {i} is not an object"
        for key, typ in (("name", str), ("n_records", int), ("n_groups", int),
                         ("n_tokens", int), ("files", dict)):
            if not isinstance(s.get(key), typ):
                return f"shard entry {i} has no valid {key!r}"
        for rel, info in s["files"].items():
            if not isinstance(info, dict) or not isinstance(info.get("bytes"), int):
                return f"shard {s['name']} file {rel} has no valid size"
    return None


def manifest_problems(m: dict[str, Any], url: str) -> list[tuple[str | None, str]]:
    """Everything wrong with a parsed manifest: (shard name or None, problem) pairs; empty
    when intact.  None = the manifest as a whole is damaged (nothing in it can be trusted).

    v4+: `manifest_checksum` and `store_key == store_key(meta)`.  Older versions have no
    manifest checksum: `store_key` is checked against the meta (which catches flipped meta
    values), then each shard entry's own checksum and the store checksum.
    """
    from .fingerprint import hash_json, store_key
    from .format import StoreMeta

    v = check_schema_version(m, url)
    if v in CRC_SCHEMA_VERSIONS:
        got = m.get("manifest_checksum")
        if got != manifest_checksum(m):
            return [(None, "failed its checksum (corrupted bytes in its meta, store_key or "
                           "shard list)" if got else "has no manifest_checksum")]
    why = _structure_problem(m)
    if why:
        return [(None, why)]
    try:
        meta = StoreMeta.from_dict(m["meta"])
    except (TypeError, ValueError) as e:
        return [(None, f"has an invalid meta ({e})")]
    # Keys written by older code: v3 code wrote v2 stores (merge, tests) with its own key.
    versions = (v,) if v in CRC_SCHEMA_VERSIONS else (v, 3)
    if m.get("store_key") not in {store_key(meta, x) for x in versions}:
        return [(None, f"store_key {m.get('store_key')!r} does not match its meta (the meta "
                       f"or the key was altered)")]
    problems: list[tuple[str | None, str]] = []
    if v not in CRC_SCHEMA_VERSIONS:
        for s in m["shards"]:
            entry = {k: x for k, x in s.items() if k != "checksum"}
            if hash_json(entry) != s.get("checksum"):
                problems.append((s["name"], f"entry of shard {s['name']} does not match its "
                                            f"checksum (edited or corrupt)"))
        if not problems and \
                hash_json([s.get("checksum") for s in m["shards"]]) != m.get("checksum"):
            problems.append((None, "store checksum does not match the shard checksums"))
    return problems


def check_manifest(m: dict[str, Any], url: str) -> None:
    """Raise a one-line ChecksumError when the manifest is damaged (see manifest_problems)."""
    problems = manifest_problems(m, url)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise manifest_error(url, problems[0][1] + more)


def check_files(fs: Any, root: str, m: dict[str, Any], url: str) -> None:
    """Every file the manifest lists exists with its recorded size: one listing of shards/.

    On object stores `find` is one (paginated) LIST request, not one request per shard.
    """
    from ._io import SHARDS_DIR, join

    if not m["shards"]:
        return
    base = join(root, SHARDS_DIR)
    try:
        listing = fs.find(base, detail=True)
    except FileNotFoundError:
        listing = {}
    sizes = {p.rstrip("/"): info.get("size") for p, info in listing.items()}
    missing: list[tuple[str, str]] = []
    for s in m["shards"]:
        for rel, info in s["files"].items():
            size = sizes.get(join(base, s["name"], rel))
            if size is None:
                missing.append((s["name"], rel))
            elif int(size) != info["bytes"]:
                raise file_error(url, s["name"], rel,
                                 f"is {size} bytes but the manifest says {info['bytes']} "
                                 f"(truncated or replaced)")
    if missing:
        name, rel = missing[0]
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise file_error(url, name, rel, f"is missing{more}")
