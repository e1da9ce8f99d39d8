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
import re
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
    "file_error",
    "is_chunk",
    "UnsafeStoreError",
    "name_problem",
    "check_name",
    "check_names",
    "unsafe_file_error",
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


class UnsafeStoreError(ValueError):
    """A store names a path it may not (outside the store, not in kdcache's layout) or holds
    a file that is not a regular file inside it.  Such a store was crafted or edited, not
    damaged: no checksum can vouch for it and `store verify --repair` cannot fix it.
    A ValueError, so the CLI prints it as one `error:` line."""


#: Names kdcache writes: shards `shard-NNNNN` (5 digits or more, no extra leading zeros) and,
#: inside a shard, `records.parquet` and the zarr group's files.  Every name of a manifest
#: must match one of them exactly: that rules out `..`, absolute paths, URLs, empty or
#: `.` components, backslashes and every non-canonical spelling of a name, with one rule
#: that gc, verify and every reader share.
_SHARD_RE = re.compile(r"shard-(?:0{4}\d|0{3}[1-9]\d|0{2}[1-9]\d{2}|0[1-9]\d{3}|[1-9]\d{4,})")
_INT = r"(?:0|[1-9]\d{0,9})"
_FILE_RE = re.compile(
    rf"records\.parquet|tokens\.zarr/zarr\.json|tokens\.zarr/([a-z_]{{1,64}})/"
    rf"(?:zarr\.json|c/{_INT}(?:/0)?)")


def _short(name: Any) -> str:
    r = repr(name)
    return r if len(r) <= 80 else r[:77] + "..."


def name_problem(name: Any, kind: str = "shard") -> str | None:
    """Why `name` may not appear in a manifest (None when it is a name kdcache writes).

    `kind` is "shard" (a shard directory under shards/) or "file" (a path inside a shard,
    as in a shard entry's `files`)."""
    from .codecs import ADV_ARRAY
    from .format import TOKEN_FIELDS

    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a name"
    if kind == "shard":
        if _SHARD_RE.fullmatch(name):
            return None
        why = "is not a shard name kdcache writes (shard-NNNNN)"
    else:
        m = _FILE_RE.fullmatch(name)
        if m and (m.group(1) is None or m.group(1) in TOKEN_FIELDS or m.group(1) == ADV_ARRAY):
            return None
        why = ("is not a path kdcache writes in a shard (records.parquet or "
               "tokens.zarr/<field>/...)")
    if name.startswith("/") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", name):
        why = "is an absolute path or URL"
    elif ".." in name.replace("\\", "/").split("/"):
        why = "leaves its directory (`..`)"
    return why


def check_name(name: Any, kind: str = "shard", where: str = "the manifest") -> None:
    """Raise UnsafeStoreError when `name` (see `name_problem`) may not be used as a path."""
    why = name_problem(name, kind)
    if why:
        raise UnsafeStoreError(
            f"{where} names {kind} {_short(name)}, which {why}: kdcache never writes such a "
            f"name, so the store was crafted or edited and is not read; delete it, or copy "
            f"the store again from its producer")


def check_names(m: dict[str, Any], where: str) -> None:
    """Check every shard and file name of a parsed manifest (`where`: its path, for the
    message).  Entries with a malformed structure are left to `manifest_problems`."""
    shards = m.get("shards")
    if not isinstance(shards, list):
        return
    for s in shards:
        if not isinstance(s, dict) or "name" not in s:
            continue
        check_name(s["name"], "shard", where)
        files = s.get("files")
        if isinstance(files, dict):
            for rel in files:
                check_name(rel, "file", where)


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
        if s["n_records"] < 0 or s["n_tokens"] < 0 or not 0 <= s["n_groups"] <= s["n_records"]:
            return f"shard entry {i} has impossible counts"
        for rel, info in s["files"].items():
            if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) \
                    or info["bytes"] < 0:
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


def unsafe_file_error(url: str, shard: str, rel: str, what: str) -> UnsafeStoreError:
    """The one-line error for a listed path that is not a regular file inside the store."""
    return UnsafeStoreError(
        f"store {url}: shard {shard} file {rel} {what}: kdcache reads only regular files "
        f"inside a store, so it does not read this store; replace the file with the real "
        f"one (or delete the store and copy it again from its producer)")
