"""One writer per store: an exclusive lock file beside a local store's directory.

Why beside (`<parent>/.<name>.kdcache-lock`) and not inside: a merge builds its output under
a temporary name and renames it into place, and precompute refuses an `--out` that holds
foreign files; a sibling file is in the way of neither.

The lock is `flock(LOCK_EX)` on that file, which holds the owner's pid, host, start time
and command (JSON), so a second writer names the holder. The kernel drops the lock when its
process exits, however it exits, so a lock left by a killed process (its pid dead) is
stale and simply taken over; the file itself is removed on a clean release. On object
stores (s3://, gs://) there is no lock: see docs/STORE_FORMAT.md for what holds there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

__all__ = ["StoreLock", "StoreLockedError", "lock_path", "lock_holder", "LOCK_SUFFIX",
           "TEMP_MARKER", "write_temp_marker", "read_temp_marker", "owner_state", "lock_for"]

LOCK_SUFFIX = ".kdcache-lock"
_INFO_MAX = 4096  # a lock file is one short JSON line; never read more


class StoreLockedError(OSError):
    """Another live process holds the store's lock."""


def lock_path(root: str) -> str:
    """The lock file of the local store directory `root`."""
    parent, leaf = os.path.split(os.path.abspath(root).rstrip(os.sep) or os.sep)
    return os.path.join(parent, f".{leaf}{LOCK_SUFFIX}")


def _read_info(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, _INFO_MAX, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe(info: dict[str, Any]) -> str:
    """`pid P on host H since T (cmd)` from a lock file's JSON (values clipped)."""
    def s(key: str) -> str:
        return str(info.get(key, "?"))[:80]

    return f"pid {s('pid')} on host {s('host')} since {s('started')} ({s('command')})"


def _open(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


class StoreLock:
    """`StoreLock(root).acquire()` ... `.release()`; also a context manager.

    Raises StoreLockedError naming the holder when a live process holds it.  Waits up to
    `wait_s` for a holder that is just finishing (or gc peeking at the lock).
    """

    def __init__(self, root: str, wait_s: float = 0.5) -> None:
        self.root = os.path.abspath(root)
        self.path = lock_path(root)
        self.wait_s = float(wait_s)
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fd = _open(self.path, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                why = "a symlink stands at its name" if e.errno == errno.ELOOP else e.strerror
                raise OSError(e.errno, f"cannot take the writer lock {self.path} ({why}); "
                                       f"remove that file or write to another location") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreLockedError(
                    errno.EBUSY,
                    f"{self.root} is being written by another kdcache process ({describe(info)}; "
                    f"lock {self.path}): wait for it to finish, or write to another location"
                ) from None
            # the holder may have released and unlinked the file between our open and flock:
            # then we locked an orphan inode, and must lock the file now at the path
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": " ".join(os.path.basename(a) for a in sys.argv[:2])[:200]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            self._fd = fd
            return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:  # remove the file while still holding it, then let go
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a writer dropped without close() must not pin its store
        self.release()


def lock_holder(root: str) -> dict[str, Any] | None:
    """The lock file's JSON when a live process holds `root`'s lock (local), else None."""
    path = lock_path(root)
    try:
        fd = _open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file (or not a plain file): nobody holds it through us
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------ temporary outputs
#: The file kdcache writes into every temporary output directory it creates (a merge's
#: output before its rename). gc removes a directory only when it holds this marker, is not
#: a complete store, and its owner is gone (or it is older than --min-age): never by name.
TEMP_MARKER = ".kdcache-temp"


def write_temp_marker(directory: str, kind: str, final: str) -> None:
    """Create `directory` and mark it as kdcache's temporary output for `final`."""
    os.makedirs(directory, exist_ok=True)
    info = {"kind": kind, "final": final, "pid": os.getpid(), "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(directory, TEMP_MARKER), "x") as f:
        f.write(json.dumps(info) + "\n")


def read_temp_marker(data: bytes) -> dict[str, Any] | None:
    """A marker's fields, or None when `data` is not a marker kdcache writes."""
    if len(data) > _INFO_MAX:
        return None
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
        return None
    return info


def owner_state(info: dict[str, Any]) -> str:
    """'alive', 'dead' (a pid of this host that no longer runs) or 'unknown' (another host,
    no pid)."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 \
            or host != socket.gethostname():
        return "unknown"
    if pid == os.getpid():
        return "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except OSError:  # exists, not ours (EPERM)
        return "alive"
    return "alive"


def lock_for(url: str) -> StoreLock | None:
    """The (not yet taken) writer lock of the store at `url`; None on object stores and
    memory://, which have no lock (docs/STORE_FORMAT.md)."""
    from ._io import is_local, open_fs

    fs, root = open_fs(url)
    return StoreLock(root) if is_local(fs) else None
