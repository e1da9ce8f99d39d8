"""`verify(url)`: check every committed file against the sha256 in the manifest, and the
manifest against its own checksum; `repair(url)` drops the damaged shards so the command
that wrote the store can rewrite them.

Why separate from reading: readers check the cheap crc32c of what they read (schema v4+);
`kdcache store verify` hashes every byte with sha256 (~0.8 GB/s), e.g. after copying a
store between buckets, and reports every problem rather than the first.
"""

from __future__ import annotations

from typing import Any

from ._io import SHARDS_DIR, UnsafeFile, cat_files, join, open_fs, read_manifest
from .fingerprint import hash_bytes
from .format import StoreMeta
from .integrity import UnsafeStoreError, manifest_problems, unsafe_file_error
from .reader import ShardFileError, check_shard
from .writer import NoStoreError, commit_manifest

__all__ = ["verify", "repair"]


def _problems(url: str) -> tuple[list[str], set[int], bool, Any, str, dict | None]:
    """(problems, indices of damaged shards, manifest damaged?, fs, root, manifest)."""
    fs, root = open_fs(url)
    try:
        manifest = read_manifest(fs, root)
    except UnsafeStoreError:  # a crafted name: the same one-line refusal as every reader
        raise
    except ValueError as e:  # not JSON / not an object: the message names the file
        return [f"manifest.json: {e}"], set(), True, fs, root, None
    if manifest is None:
        raise NoStoreError(f"no kdcache store at {url} (no {join(root, 'manifest.json')}); "
                           f"check the URL")
    try:
        found = manifest_problems(manifest, url)
    except ValueError as e:  # unsupported schema version
        return [f"manifest.json: {e}"], set(), True, fs, root, manifest
    if any(scope is None for scope, _ in found):
        return [f"manifest.json: {p}" for _, p in found], set(), True, fs, root, manifest
    meta = StoreMeta.from_dict(manifest["meta"])
    names = {s["name"]: i for i, s in enumerate(manifest["shards"])}
    damaged = {names[scope] for scope, _ in found}
    bad_manifest = [f"manifest.json: {p}" for _, p in found]
    problems = list(bad_manifest)
    for i, shard in enumerate(manifest["shards"]):
        name = shard["name"]
        base = join(root, SHARDS_DIR, name)
        paths = {rel: join(base, rel) for rel in shard["files"]}
        got = cat_files(fs, list(paths.values()), root,
                        {p: shard["files"][r]["bytes"] for r, p in paths.items()})
        for rel, path in paths.items():
            info = shard["files"][rel]
            data = got.get(path)
            if isinstance(data, UnsafeFile):  # a FIFO, device or symlink out: never read
                raise unsafe_file_error(url, name, rel, data.what)
            if isinstance(data, Exception) or data is None:
                problems.append(f"{name}: {rel}: missing ({type(data).__name__})")
            elif len(data) != info["bytes"]:
                problems.append(f"{name}: {rel}: size {len(data)} != {info['bytes']} in manifest")
            elif hash_bytes(data) != info.get("sha256"):
                problems.append(f"{name}: {rel}: sha256 mismatch (content corrupted)")
            else:
                continue
            damaged.add(i)
        if i not in damaged:
            # intact bytes can still declare sizes no honest writer would (a crafted store):
            # the bounds every reader applies, checked without decoding the arrays
            try:
                check_shard({rel: got[p] for rel, p in paths.items()}, shard, meta)
            except ShardFileError as e:
                problems.append(f"{name}: {e.rel}: {e.what}")
                damaged.add(i)
    return problems, damaged, False, fs, root, manifest


def verify(url: str) -> list[str]:
    """Problems found in the store at `url` (an empty list means it is intact).

    Each problem is one line naming the shard and the file: missing files, size or sha256
    mismatches, and a manifest that fails its checksum (v4+) or whose shard entries or
    store_key do not match (older versions).  No store at `url` is a NoStoreError; a
    crafted store (a name outside kdcache's layout, a file that is not a regular file
    inside the store) is an UnsafeStoreError, exactly as readers and gc refuse it.
    """
    return _problems(url)[0]


def repair(url: str) -> dict[str, Any]:
    """Drop the first damaged shard and every later one from the manifest (marked
    incomplete), so re-running the command that wrote the store resumes there and rewrites
    them (shards are cut deterministically: the result equals an undamaged run).

    Refuses when the manifest itself is damaged (then nothing in it can be trusted).
    Returns {"kept": n, "dropped": [names], "problems": [...]}.
    """
    problems, damaged, manifest_bad, fs, root, manifest = _problems(url)
    if manifest_bad or manifest is None:
        raise ValueError(f"store {url}: the manifest itself is damaged ({problems[0]}); it "
                         f"cannot be repaired: restore manifest.json from a copy, or delete the "
                         f"store and re-run precompute")
    if not damaged:
        return {"kept": len(manifest["shards"]), "dropped": [], "problems": problems}
    first = min(damaged)
    dropped = [s["name"] for s in manifest["shards"][first:]]
    manifest["shards"] = manifest["shards"][:first]
    manifest["complete"] = False
    commit_manifest(fs, root, manifest)
    return {"kept": first, "dropped": dropped, "problems": problems}
