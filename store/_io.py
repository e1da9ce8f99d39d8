"""fsspec plumbing shared by writer, reader and admin tools.

Why a module: the commit protocol hinges on one primitive, "replace manifest.json
atomically", whose implementation differs per filesystem (os.replace locally, a single PUT
on object stores, a dict assignment in memory://).  Keeping it here means every writer uses
the same one.
"""

from __future__ import annotations

import json
import os
import socket
import stat
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
    "temp_name",
    "temp_owner_dead",
    "load_json",
    "UnsafeFile",
    "LocalGuard",
    "MAX_JSON_DEPTH",
]

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
TMP_MARK = ".tmp-"  # every temporary file name contains this; gc() removes them


def temp_name(base: str) -> str:
    """`.<base>.tmp-<uuid>-<pid>@<host>`: unique, and names the process that owns it, so a
    resuming writer or gc can tell a dead writer's leftover from a live writer's file."""
    return f".{base}{TMP_MARK}{uuid.uuid4().hex}-{os.getpid()}@{socket.gethostname()}"


def temp_owner_dead(name: str) -> bool:
    """True when `name` is a `temp_name` of a process on this host that no longer runs.

    False when it cannot tell (another host, an older naming, a live or reused pid): the
    caller then falls back to the file's age.
    """
    tail = name.rsplit(TMP_MARK, 1)[-1]
    if "@" not in tail or "-" not in tail:
        return False
    who, host = tail.split("@", 1)
    pid_s = who.rsplit("-", 1)[-1]
    if host != socket.gethostname() or not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but not ours (EPERM): alive
        return False
    return False


def open_fs(url: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a store URL; local paths, file://, memory://, s3://."""
    fs, root = url_to_fs(str(url))
    return fs, root.rstrip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p != "")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


#: Deepest nesting of JSON a store may hold (the manifest and zarr.json are 6 levels deep;
#: a deeper document is crafted, and Python's parser would raise RecursionError on it).
MAX_JSON_DEPTH = 64


def load_json(raw: bytes | str, what: str) -> Any:
    """json.loads that turns nesting deeper than MAX_JSON_DEPTH (or deep enough for a
    RecursionError) into a one-line ValueError naming `what`."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        obj = None
        deep = True
    else:
        deep = False
        stack = [(obj, 1)]
        while stack and not deep:  # iterative: a recursive walk would overflow the same way
            o, d = stack.pop()
            if isinstance(o, dict | list):
                if d > MAX_JSON_DEPTH:
                    deep = True
                stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    if deep:
        raise ValueError(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels: kdcache never "
                         f"writes that, so the file is crafted or corrupt; restore it from a "
                         f"copy, or delete the store and re-run precompute")
    return obj


class UnsafeFile(ValueError):
    """A path a store names is not a regular file inside the store (a FIFO, a device, a
    directory, or a symlink leading out of the store's root); `what` says which."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} {what}")
        self.path = path
        self.what = what


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class LocalGuard:
    """Checks local paths of a store before they are opened: inside the store's root (after
    following symlinks) and a regular file, so a crafted store cannot make a reader hang on a
    FIFO, read a device, or read a file outside the store.

    Costs one lstat per file plus one realpath per distinct directory (cached).
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._dirs: dict[str, bool] = {}

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip("/") + "/")

    def stat(self, path: str) -> os.stat_result:
        """The stat of regular file `path`; UnsafeFile otherwise (FileNotFoundError when
        missing)."""
        d = os.path.dirname(path)
        ok = self._dirs.get(d)
        if ok is None:
            ok = self._dirs[d] = self._inside(os.path.realpath(d))
        if not ok:
            raise UnsafeFile(path, "is reached through a symlink that leads out of the store")
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not self._inside(os.path.realpath(path)):
                raise UnsafeFile(path, "is a symlink that leads out of the store")
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(path, f"is {_kind(st.st_mode)}, not a regular file")
        return st

    def read(self, path: str, limit: int | None = None) -> bytes:
        """The bytes of regular file `path` (at most `limit` + 1 of them: enough to tell a
        file longer than its manifest size).  Opened non-blocking and checked again after
        opening, so a file swapped for a FIFO between the check and the open cannot hang."""
        self.stat(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFile(path, f"is {_kind(st.st_mode)}, not a regular file")
            return f.read() if limit is None else f.read(limit + 1)


def cat_files(fs: fsspec.AbstractFileSystem, paths: list[str], root: str | None = None,
              limits: dict[str, int] | None = None) -> dict[str, Any]:
    """{path: bytes, or the exception that reading it raised} (fsspec's `cat(...,
    on_error="return")`).  Local files are read unbuffered: one read of the whole file,
    ~10x faster than the buffered reader fsspec opens, which reads a large file piecewise
    and joins the pieces.

    Local files of a store (`root` given) are read only when they are regular files inside
    the root (`LocalGuard`; an `UnsafeFile` otherwise), and at most `limits[path]` + 1
    bytes of each.  On object stores every object is a plain object; their kind is
    checked on the listing `open_store` makes (`reader.check_files`)."""
    if not is_local(fs):
        return fs.cat(paths, on_error="return")
    guard = LocalGuard(fs._strip_protocol(root)) if root is not None else None
    out: dict[str, Any] = {}
    for p in paths:
        local = fs._strip_protocol(p)
        try:
            if guard is not None:
                out[p] = guard.read(local, None if limits is None else limits.get(p))
            else:
                with open(local, "rb", buffering=0) as f:
                    out[p] = f.read()
        except (OSError, UnsafeFile) as e:
            out[p] = e
    return out


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old or the new file, never a mix.

    Local: write a temp file in the same directory, fsync, os.replace (atomic on POSIX).
    Object stores (s3, gcs) and memory://: a single put of the whole object is atomic.
    """
    if is_local(fs):
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, temp_name(os.path.basename(path)))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # e.g. a full disk: no temp file stays behind
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
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
    """The parsed manifest, or None when no store exists at `root`.

    A manifest that is not a JSON object (truncated, overwritten) is a ValueError naming
    the file, never a bare parser message.
    """
    path = join(root, MANIFEST)
    try:
        if is_local(fs):  # never a FIFO, a device or a file outside the store
            raw = LocalGuard(fs._strip_protocol(root)).read(fs._strip_protocol(path))
        else:
            raw = fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or `root` is a file
        return None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a kdcache manifest") from None
    except UnsafeFile as e:
        if e.what.startswith("is a directory"):
            raise ValueError(f"{path} is a directory, not a kdcache manifest") from None
        raise ValueError(f"{path} {e.what}: kdcache reads only regular files inside a store; "
                         f"replace it with the store's real manifest.json") from None
    try:
        m = load_json(raw, path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({str(e)[:200]}; {len(raw)} bytes): the manifest is truncated or "
            f"corrupt, so the store cannot be read; restore manifest.json from a copy, or "
            f"delete the store and re-run precompute"
        ) from None
    if not isinstance(m, dict):
        raise ValueError(f"{path} holds JSON {type(m).__name__}, not a kdcache manifest object; "
                         f"restore manifest.json from a copy, or delete the store and re-run "
                         f"precompute")
    from .integrity import check_names

    check_names(m, path)
    return m
