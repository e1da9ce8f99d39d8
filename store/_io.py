"""fsspec plumbing shared by writer, reader and admin tools.

Why a module: the commit protocol hinges on one primitive, "replace manifest.json
atomically", whose implementation differs per filesystem (os.replace locally, a single PUT
on object stores, a dict assignment in memory://).  Keeping it here means every writer uses
the same one.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "MANIFEST",
    "SHARDS_DIR",
    "TMP_MARK",
    "open_fs",
    "join",
    "atomic_write",
    "write_files",
    "read_manifest",
    "is_local",
]

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
TMP_MARK = ".tmp-"  # every temporary file name contains this; gc() removes them


def open_fs(url: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a store URL; local paths, file://, memory://, s3://."""
    fs, root = url_to_fs(str(url))
    return fs, root.rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p != "")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old or the new file, never a mix.

    Local: write a temp file in the same directory, fsync, os.replace (atomic on POSIX).
    Object stores (s3, gcs) and memory://: a single put of the whole object is atomic.
    """
    if is_local(fs):
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}{TMP_MARK}{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_files(fs: fsspec.AbstractFileSystem, files: dict[str, bytes]) -> None:
    """Write many files (concurrently where the filesystem supports it, e.g. s3)."""
    if is_local(fs):
        for path, data in files.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                # fsync so a power loss after the manifest commit cannot lose shard bytes.
                os.fsync(f.fileno())
    else:
        fs.pipe(files)


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The parsed manifest, or None when no store exists at `root`."""
    path = join(root, MANIFEST)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return json.loads(raw)
