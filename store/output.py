"""Is this output location free and writable? The one check every producer of a store runs
(precompute, rollout, `--devices`, `store merge`) before it loads a model or writes a byte.

Why in the store: what may already stand at a store's location (a store to resume, a killed
writer's temporary files, nothing at all) is the store's format. Callers pass the option
the user typed (`--out`, `--out-root`, `OUT`), so the one error line names what to change.
"""

from __future__ import annotations

import contextlib
import os
import re

from ._io import MANIFEST, TMP_MARK, is_local, join, open_fs, temp_name
from .reader import open_store
from .writer import NoStoreError

__all__ = ["check_output", "MAY_HOLD", "WRITE_PROBE", "probe_writable"]

#: What may already stand at the location: "nothing" (a new or empty directory: a merge
#: renames its finished store onto it), "store" (a store, which its writer resumes or
#: refuses, or a killed writer's temporary files) or "anything" (a directory the stores are
#: named under by their key; only writability is checked).
MAY_HOLD = ("nothing", "store", "anything")

# the write probe of a run killed by an older kdcache (`.kdcache-write-probe-<pid>`); with a
# killed writer's temporary files (TMP_MARK in the name), leftovers, not someone's data
_OLD_PROBE = re.compile(r"\.kdcache-write-probe-\d+")

#: Base name of the file `probe_writable` writes (a `temp_name` of it: owner pid and host).
WRITE_PROBE = "kdcache-write-probe"


def probe_writable(directory: str) -> None:
    """Write and remove a small file in `directory` (which must exist): OSError when it
    cannot be written. The probe is removed on every path, a full disk included; its name
    names its process, so a killed run's probe is a dead writer's temp file to gc and to
    the next run."""
    probe = os.path.join(directory, temp_name(WRITE_PROBE))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(probe)


def check_output(url: str, option: str, *, may_hold: str = "store") -> None:
    """Raise one clear error (naming `option`) unless `url` is free for a store and writable.

    Local locations are checked in full: what stands there (see MAY_HOLD), then a write probe
    in the directory itself, so a read-only or full disk fails here, before any model is
    loaded. Nothing is left behind: directories created for the probe are removed again (the
    store's writer creates them with its first commit). On object stores only
    `may_hold="nothing"` is checked (the location must be empty); the first write reports
    its own permission error.
    """
    if may_hold not in MAY_HOLD:
        raise ValueError(f"may_hold={may_hold!r}: use one of {list(MAY_HOLD)}")
    fs, root = open_fs(url)
    if not is_local(fs):
        if may_hold == "nothing" and fs.exists(root) and (not fs.isdir(root)
                                                          or fs.ls(root, detail=False)):
            what = "a kdcache store" if fs.exists(join(root, MANIFEST)) else "other files"
            raise FileExistsError(f"{option} {url} already holds {what}: choose a new "
                                  "location, or delete it first")
        return
    path = os.path.abspath(root)
    if may_hold != "anything":
        _check_free(url, path, option, may_hold)
    _check_writable(path, option)


def _check_free(url: str, path: str, option: str, may_hold: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{option} {path} is a file, not a directory: pass a new or "
                              "empty directory")
    if not os.path.isdir(path):
        return
    try:
        open_store(url)
        is_store = True
    except (NoStoreError, NotADirectoryError, PermissionError):
        is_store = False
    if is_store:
        if may_hold == "store":
            return  # its writer resumes it, or refuses other settings
        raise FileExistsError(f"{option} {path} already holds a kdcache store: choose a new "
                              "location, or delete it first")
    names = sorted(os.listdir(path))
    other = names if may_hold == "nothing" else [n for n in names if TMP_MARK not in n
                                                    and not _OLD_PROBE.fullmatch(n)]
    if other:
        raise FileExistsError(
            f"{option} {path} is a directory with other files ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}) and no kdcache store; pass a new or empty "
            "directory")


def first_missing(path: str) -> str | None:
    """The top-most directory of `path` that does not exist yet (None: it all exists)."""
    missing = None
    p = os.path.abspath(path)
    while not os.path.exists(p):
        missing, p = p, os.path.dirname(p)
    return missing


def remove_made(path: str, made: str | None) -> None:
    """Remove the directories of `path` up to `made` (`first_missing` before they were
    created) while they are empty: only what the caller created, never what it found."""
    d = os.path.abspath(path)
    while made and d.startswith(made) and os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
        d = os.path.dirname(d)


def _check_writable(path: str, option: str) -> None:
    made = first_missing(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe_writable(path)  # removes its probe on every path, a full disk included
    except OSError as e:
        raise OSError(f"output directory {path!r} is not writable ({e.strerror or e}); pass a "
                      f"writable {option}, or fix its permissions") from None
    finally:
        remove_made(path, made)
