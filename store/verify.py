"""`verify(url)`: check every committed file against the sha256 in the manifest.

Why separate from reading: hashing every byte costs ~10% of decode time, so the training
reader skips it by default (`Store.load_shard(verify=True)` opts in); `kdcache verify`
runs this full check, e.g. after copying a store between buckets.
"""

from __future__ import annotations

from ._io import SHARDS_DIR, join, open_fs, read_manifest
from .fingerprint import hash_bytes, hash_json
from .writer import check_schema_version

__all__ = ["verify"]


def verify(url: str) -> list[str]:
    """Problems found in the store at `url` (an empty list means it is intact).

    Each problem names the shard and the file: missing files, size or sha256 mismatches,
    and manifest entries whose own checksum no longer matches (edited manifests).
    """
    fs, root = open_fs(url)
    try:
        manifest = read_manifest(fs, root)
    except ValueError as e:  # json decode error
        return [f"manifest.json is not valid JSON ({e}); the store cannot be read"]
    if manifest is None:
        return [f"no kdcache store at {url} (manifest.json missing)"]
    try:
        check_schema_version(manifest, url)
    except ValueError as e:
        return [str(e)]
    problems: list[str] = []
    for shard in manifest["shards"]:
        name = shard["name"]
        entry = {k: v for k, v in shard.items() if k != "checksum"}
        if hash_json(entry) != shard.get("checksum"):
            problems.append(f"{name}: manifest entry does not match its checksum "
                            f"(manifest edited or corrupt)")
        base = join(root, SHARDS_DIR, name)
        paths = {rel: join(base, rel) for rel in shard["files"]}
        got = fs.cat(list(paths.values()), on_error="return")
        for rel, path in paths.items():
            info = shard["files"][rel]
            data = got.get(path)
            if isinstance(data, Exception) or data is None:
                problems.append(f"{name}: {rel}: missing ({type(data).__name__})")
            elif len(data) != info["bytes"]:
                problems.append(f"{name}: {rel}: size {len(data)} != {info['bytes']} in manifest")
            elif hash_bytes(data) != info["sha256"]:
                problems.append(f"{name}: {rel}: sha256 mismatch (content corrupted)")
    if hash_json([s.get("checksum") for s in manifest["shards"]]) != manifest.get("checksum"):
        problems.append("manifest: store checksum does not match the shard checksums")
    return problems
