"""Store housekeeping: list stores with provenance, garbage-collect, merge stores of one run.

Why here and not in the CLI: these walk the on-disk layout, which only `kdcache.store`
is allowed to know about.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._io import (
    MANIFEST,
    SHARDS_DIR,
    TMP_MARK,
    is_local,
    join,
    open_fs,
    read_manifest,
    temp_name,
    temp_owner_dead,
)
from .fingerprint import store_key
from .format import SCHEMA_VERSION, StoreMeta
from .integrity import manifest_problems, name_problem
from .lock import (
    TEMP_MARKER,
    StoreLock,
    describe,
    lock_holder,
    owner_state,
    read_temp_marker,
    write_temp_marker,
)
from .output import WRITE_PROBE, check_output, first_missing, remove_made
from .reader import open_store
from .writer import STALE_TEMP_S, NoStoreError, StoreWriter

__all__ = ["list_stores", "gc", "merge", "DEFAULT_GC_MIN_AGE_S"]

#: `gc` removes unreferenced files only when they are at least this old (seconds): a
#: running writer's next shard is unreferenced until it commits.
DEFAULT_GC_MIN_AGE_S = STALE_TEMP_S


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _root(root: str) -> tuple[Any, str]:
    """(fs, path) of an existing directory/prefix; a missing root is a one-line error."""
    fs, base = open_fs(root)
    if not fs.exists(base):
        raise NoStoreError(f"{root} does not exist: pass the directory (or bucket prefix) that "
                           f"holds the stores")
    if not fs.isdir(base):
        raise NotADirectoryError(f"{root} is a file, not a directory of stores: pass the "
                                 f"directory (or bucket prefix) that holds the stores")
    return fs, base


# ------------------------------------------------------------------ walking a root
# A root may hold stores someone else wrote: the walk never follows a symlink (lstat only),
# tolerates entries that vanish while it runs (a live writer's temp files), and every path
# it yields lies inside the root.
_FILE, _DIR, _LINK, _OTHER = "file", "dir", "link", "other"


def _scan(fs: Any, base: str) -> dict[str, tuple[str, int, float | None]]:
    """{path: (kind, size, mtime)} of everything under `base`, never through a symlink."""
    out: dict[str, tuple[str, int, float | None]] = {}
    if not is_local(fs):  # object stores have no links; their directories are prefixes
        for p, info in fs.find(base, detail=True, withdirs=True).items():
            p = p.rstrip("/")
            if p != base:
                kind = _DIR if info.get("type") == "directory" else _FILE
                out[p] = (kind, int(info.get("size") or 0), None)
        return out
    stack = [base]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # removed mid-scan, or not ours to read
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # e.g. a writer's temp manifest, renamed away mid-scan
            kind = (_LINK if stat.S_ISLNK(st.st_mode) else _DIR if stat.S_ISDIR(st.st_mode)
                    else _FILE if stat.S_ISREG(st.st_mode) else _OTHER)
            out[e.path] = (kind, st.st_size, st.st_mtime)
            if kind == _DIR:
                stack.append(e.path)
    return out


def _dirs_holding(base: str, tree: dict, name: str) -> list[str]:
    """Directories (base included) that hold a regular file `name`."""
    found = [p.rsplit("/", 1)[0] for p, (kind, _, _) in tree.items()
             if kind == _FILE and p.rsplit("/", 1)[-1] == name]
    return sorted(found)


def _store_dirs(base: str, tree: dict) -> list[str]:
    """Store directories under `base` (including base itself): those holding a regular
    manifest.json, not inside another store's shards/."""
    return [d for d in _dirs_holding(base, tree, MANIFEST)
            if "/" + SHARDS_DIR + "/" not in d[len(base):] + "/"]


def _under(p: str, d: str) -> bool:
    return p.startswith(d + "/")


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def _read(fs: Any, d: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, why it cannot be read); never raises for bad content."""
    try:
        m = read_manifest(fs, d)
    except (ValueError, RecursionError, MemoryError, UnicodeError, OSError) as e:
        return None, _clip(str(e) or type(e).__name__)
    if m is None:
        return None, "manifest.json disappeared"
    return m, None


def _damage(m: dict[str, Any] | None, url: str) -> str | None:
    """Why a store's manifest cannot be trusted (None when it can)."""
    if m is None:
        return "manifest.json disappeared"
    try:
        found = manifest_problems(m, url)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        return _clip(str(e) or type(e).__name__)
    return _clip(f"manifest.json {found[0][1]}") if found else None


def list_stores(root: str) -> list[dict[str, Any]]:
    """Every store under `root` with its provenance (key, models, dataset, size, state).

    A store whose manifest is damaged (or hostile: nested past the parser's depth, ...) is
    listed as {"url", "damaged": reason} with what could be read, so one bad store does not
    hide the others; the CLI reports those on stderr.
    """
    fs, base = _root(root)
    if is_local(fs):
        base = os.path.realpath(base)
    out = []
    for d in _store_dirs(base, _scan(fs, base)):
        url = _url(fs, d)
        m, why = _read(fs, d)
        if m is None:
            if why != "manifest.json disappeared":
                out.append({"url": url, "damaged": why})
            continue
        meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
        try:
            key = store_key(StoreMeta.from_dict(meta), m.get("schema_version"))
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
            key = m.get("store_key")
        totals = m.get("totals") if isinstance(m.get("totals"), dict) else {}
        row = {
            "url": url,
            "key": key,
            "schema_version": m.get("schema_version"),
            "models": meta.get("models"),
            "dataset": meta.get("dataset"),
            "fields": meta.get("fields"),
            "n_records": totals.get("n_records", 0),
            "n_tokens": totals.get("n_tokens", 0),
            "n_bytes": totals.get("n_bytes", 0),
            "complete": bool(m.get("complete")),
            "updated": m.get("updated"),
        }
        bad = _damage(m, url)
        if bad:
            row["damaged"] = bad
        out.append(row)
    return out


def _age_s(fs: Any, path: str) -> float:
    try:
        return time.time() - fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, OSError, KeyError):
        return float("inf")


# Temporary files a store's writer leaves at the store's top level when killed: a
# manifest being replaced, a write probe (`temp_name` forms; older versions used a bare
# uuid after the mark). Only these, inside a store with a sound manifest, are collected.
_WRITER_TEMPS = (f".{MANIFEST}{TMP_MARK}", f".{WRITE_PROBE}{TMP_MARK}")


class _GC:
    """One `gc` pass over a root (see `gc`)."""

    def __init__(self, fs: Any, base: str, min_age_s: float, dry_run: bool) -> None:
        self.fs, self.base, self.min_age_s, self.dry_run = fs, base, min_age_s, dry_run
        self.local = is_local(fs)
        self.removed: list[str] = []
        self.skipped: list[str] = []
        self.freed = 0
        self.tree = _scan(fs, base)
        self.now = time.time()

    def age(self, p: str) -> float:
        mtime = self.tree.get(p, (None, 0, None))[2]
        return self.now - mtime if mtime is not None else _age_s(self.fs, p)

    def skip(self, p: str, why: str) -> None:
        self.skipped.append(f"{_url(self.fs, p)}: {why}")

    def inside(self, p: str) -> bool:
        """`p`'s directory is, on disk now, a real directory inside the root (no link in
        between: the tree may have changed since the scan)."""
        if not self.local:
            return _under(p, self.base)
        parent = os.path.dirname(p)
        real = os.path.realpath(parent)
        return real == parent and (real == self.base or _under(real, self.base))

    def locked(self, d: str) -> bool:
        holder = lock_holder(d) if self.local else None
        if holder is not None:
            self.skip(d, f"being written by {describe(holder)}; not collected while its "
                         f"writer runs")
        return holder is not None

    # -------------------------------------------------------------- removal
    def remove_file(self, p: str) -> None:
        size = self.tree[p][1]
        if not self.dry_run:
            if not self.inside(p):
                self.skip(p, "its folder is no longer inside the root; not removed")
                return
            try:
                if self.local:
                    if not stat.S_ISREG(os.lstat(p).st_mode):
                        return
                    os.unlink(p)
                else:
                    self.fs.rm(p)
            except FileNotFoundError:
                return  # gone already (its writer renamed or removed it)
        self.removed.append(_url(self.fs, p))
        self.freed += size

    def remove_dir(self, d: str) -> None:
        size = sum(v[1] for p, v in self.tree.items() if _under(p, d) and v[0] == _FILE)
        if not self.dry_run:
            if not self.inside(d) or (self.local and not stat.S_ISDIR(os.lstat(d).st_mode)):
                self.skip(d, "no longer a folder inside the root; not removed")
                return
            try:
                if self.local:
                    shutil.rmtree(d)  # unlinks links inside, never follows them
                else:
                    self.fs.rm(d, recursive=True)
            except FileNotFoundError:
                return
        self.removed.append(_url(self.fs, d))
        self.freed += size

    # -------------------------------------------------------------- temporary outputs
    def marker(self, d: str) -> dict[str, Any] | None:
        p = join(d, TEMP_MARKER)
        try:
            if self.local:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    data = os.read(fd, 8192)
                finally:
                    os.close(fd)
            else:
                data = self.fs.cat_file(p, start=0, end=8192)
        except OSError:
            return None
        return read_temp_marker(data)

    def temp_output(self, d: str) -> None:
        """A folder kdcache marked as its temporary output (a killed merge's)."""
        if d == self.base:
            self.skip(d, "the root itself is marked temporary; gc never removes the root")
            return
        info = self.marker(d)
        if info is None:
            self.skip(d, f"holds a {TEMP_MARKER} that kdcache did not write; left alone")
            return
        for s in _dirs_holding(d, {p: v for p, v in self.tree.items() if _under(p, d)}, MANIFEST):
            m, _ = _read(self.fs, s)
            if m is not None and m.get("complete") is True:
                self.skip(d, "holds a complete store; a store is never removed")
                return
        if self.locked(d):
            return
        owner = owner_state(info)
        if owner == "alive":
            return  # its merge is still running
        ages = [self.age(p) for p in self.tree if _under(p, d)] or [self.age(d)]
        if owner == "dead" or min(ages) >= self.min_age_s:
            self.remove_dir(d)

    # -------------------------------------------------------------- stores
    def store(self, d: str) -> None:
        m, why = _read(self.fs, d)
        if m is None:
            if why != "manifest.json disappeared":
                self.skip(d, why or "unreadable")
            return
        bad = _damage(m, _url(self.fs, d))
        if bad:
            self.skip(d, bad)
            return
        keep = {join(d, MANIFEST)}
        live = set()
        for s in m["shards"]:
            # read_manifest refused bad names already; gc re-checks what it will keep by
            files = s.get("files") if isinstance(s, dict) else None
            if name_problem(s.get("name") if isinstance(s, dict) else None, "shard") \
                    or not isinstance(files, dict) \
                    or any(name_problem(rel, "file") for rel in files):
                self.skip(d, "manifest.json names a shard or file that is not a name kdcache "
                             "writes; not collected")
                return
            live.add(s["name"])
            keep.update(join(d, SHARDS_DIR, s["name"], rel) for rel in files)
        if self.locked(d):
            return
        # never descend into another store or a marked folder nested in this one
        fenced = [x for x in self.fences if _under(x, d)]
        shards = join(d, SHARDS_DIR)
        for p, (kind, _, _) in sorted(self.tree.items()):
            if not _under(p, d) or any(p == x or _under(p, x) for x in fenced):
                continue
            top = os.path.dirname(p) == d
            if not (_under(p, shards) or (top and p.rsplit("/", 1)[-1].startswith(_WRITER_TEMPS))):
                continue
            if kind == _LINK:
                self.skip(p, "a symlink: gc never follows or removes links")
            elif kind == _FILE and p not in keep:
                name = p.rsplit("/", 1)[-1]
                if (TMP_MARK in name and temp_owner_dead(name)) or self.age(p) >= self.min_age_s:
                    self.remove_file(p)
        if self.local and not self.dry_run:  # now-empty folders of dropped shards
            dirs = [p for p, v in self.tree.items() if v[0] == _DIR and _under(p, shards)
                    and p[len(shards) + 1:].split("/", 1)[0] not in live
                    and not any(p == x or _under(p, x) for x in fenced)]
            for sub in sorted(dirs, key=lambda x: -x.count("/")):
                try:
                    if self.inside(sub) and stat.S_ISDIR(os.lstat(sub).st_mode) \
                            and not os.listdir(sub):
                        os.rmdir(sub)
                        self.removed.append(_url(self.fs, sub))
                except OSError:
                    pass  # not empty, or gone

    def run(self) -> dict[str, Any]:
        marked = _dirs_holding(self.base, self.tree, TEMP_MARKER)
        stores = _store_dirs(self.base, self.tree)
        self.fences = sorted(set(marked) | set(_dirs_holding(self.base, self.tree, MANIFEST)))
        for d in marked:
            if not any(_under(d, x) for x in marked):  # the outermost marked folder decides
                self.temp_output(d)
        for d in stores:
            if any(d == x or _under(d, x) for x in marked):
                continue  # part of a temporary output: its marker decides
            if self.tree.get(join(d, MANIFEST), (_FILE,))[0] != _FILE:
                continue
            self.store(d)
        return {"removed": self.removed, "bytes_freed": self.freed, "dry_run": self.dry_run,
                "skipped": self.skipped}


def gc(root: str, min_age_s: float = DEFAULT_GC_MIN_AGE_S,
       dry_run: bool = False) -> dict[str, Any]:
    """Remove what kdcache wrote and no longer needs, under `root` only.

    In a store whose manifest is sound: files under shards/ that no manifest references,
    and the writer's temporary files at its top level (`.manifest.json.tmp-*`,
    `.kdcache-write-probe.tmp-*`), once older than `min_age_s` (a running writer's next
    shard is unreferenced until it commits) or, for temp files, once their writer process
    is gone (same host); then the emptied folders of dropped shards.  A folder kdcache
    marked as its temporary output (TEMP_MARKER: a killed merge's) goes whole when its
    owner is gone or it is older than `min_age_s`, unless it holds a complete store.
    Never: a folder by its name alone, a store whose writer holds its lock (store/lock.py;
    so `min_age_s=0` is safe), a symlink or anything through one, anything outside `root`.
    A store whose manifest is damaged is skipped: deleting by a corrupt shard list could
    delete live shards.  Returns {"removed": [paths], "bytes_freed": n, "dry_run": bool,
    "skipped": ["url: why", ...]}.
    """
    if not isinstance(min_age_s, (int, float)) or not math.isfinite(min_age_s) \
            or min_age_s < 0:
        raise ValueError(f"min_age_s={min_age_s!r} must be a number of seconds >= 0")
    fs, base = _root(root)
    if is_local(fs):
        base = os.path.realpath(base)  # the root as given; nothing below it is followed
    return _GC(fs, base, float(min_age_s), bool(dry_run)).run()


def merge(urls: list[str], out_url: str, *, order: Iterable[tuple[int, str]] | None = None,
          meta: StoreMeta | None = None, agree: Callable[[StoreMeta], StoreMeta] | None = None,
          shard_records: int | None = None, report_key: str | None = None,
          report: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
          resume: bool = False, option: str = "the merge output") -> str:
    """Concatenate complete stores of one run into one store at `out_url`; returns it.

    - `order`: (input index, example_id) pairs, the groups in the order to write them: each
      is the next group of that input and must have that id (the inputs' own orders are
      kept). Every group of every input must be given. Default: input after input.
    - `meta`: the merged store's meta (default: the first input's). `agree(meta)` maps a
      meta to what the inputs must share (default: all of it; a producer that writes one
      run as several stores drops what tells them apart); the inputs and `meta` must agree.
    - `report_key`, `report` (a dict, or a function called once every group is written):
      the merged store's report section, as `StoreWriter.close(report=)` takes it.
    - `resume=False` (`kdcache store merge`): OUT must be new or empty; the store is built
      under a temporary sibling name marked with TEMP_MARKER (gc removes a killed merge's
      output by it) and renamed into place, so a failure leaves nothing. `resume=True`
      (`precompute --merge-parts`): written in place and resumable like any store: a
      re-run continues after OUT's committed shards.
    - `option`: what the user calls OUT, in error messages (`OUT`, `--out-root`, ...).

    Groups are re-encoded with the shard rule a single run uses (`shard_records`, default the
    first input's), so merging a run's parts in that run's order equals the run written
    in one go (same shard checksums); compact-codec values are already on their grid and
    re-encode exactly. The inputs' tokenizer files are carried over. Example ids must be
    disjoint across the inputs. Locally one merge per OUT runs at a time (its lock).
    """
    if not urls:
        raise ValueError("merge needs at least one input store")
    if shard_records is not None and int(shard_records) < 1:
        raise ValueError(f"shard_records must be >= 1, got {shard_records}")
    fs, out_root = open_fs(out_url)
    for u in urls:
        if open_fs(u)[1] == out_root:
            raise ValueError(f"{option} {out_url} is also an input: write to a new location")
    local = is_local(fs)
    # created below (the lock file's folder, the output's parents), removed on failure
    made = first_missing(os.path.dirname(os.path.abspath(out_root))) if local else None
    try:
        check_output(out_url, option, may_hold="store" if resume else "nothing")
        # one merge per OUT: the lock beside OUT is held until the output is complete
        with StoreLock(out_root) if local else contextlib.nullcontext():
            return _Merge(fs, out_root, out_url, urls, meta, agree).run(
                order, shard_records, report_key, report, resume)
    except BaseException:
        remove_made(os.path.dirname(os.path.abspath(out_root)), made)  # what this merge created
        raise


class _Merge:
    """One `merge`: the inputs checked, then one loop over their groups (see `merge`)."""

    def __init__(self, fs: Any, out_root: str, out_url: str, urls: list[str],
                 meta: StoreMeta | None, agree: Callable[[StoreMeta], StoreMeta] | None) -> None:
        self.fs, self.out_root, self.out_url = fs, out_root, out_url
        self.local = is_local(fs)
        self.stores = [open_store(u) for u in urls]
        self.urls = list(urls)
        self.meta = meta if meta is not None else self.stores[0].meta
        agree = agree or (lambda m: m)
        want = agree(self.meta).content_dict()
        for u, st in zip(urls, self.stores, strict=True):
            got = agree(st.meta).content_dict()
            if got != want:
                diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
                raise ValueError(f"cannot merge {u} into {out_url}: meta differs in {diff}; only "
                                 f"stores of one run (e.g. its parts) can be merged")
        for u, st in zip(urls, self.stores, strict=True):
            if not st.complete:
                raise ValueError(f"cannot merge {u}: the store is incomplete (its writer did not "
                                 f"close); finish or resume that run first")
        # Compact values are on their version's grid; re-encoding them on the same grid is
        # exact, on another grid it would add a second rounding.  v2's grid differs from v3's
        # (v3 and later share theirs), so v2 inputs give a v2 output and are never mixed.
        versions = {2 if st.schema_version <= 2 else 3 for st in self.stores}
        if len(versions) > 1 and self.meta.options.get("codec", "compact") == "compact":
            raise ValueError(f"cannot merge compact stores of schema versions "
                             f"{sorted({st.schema_version for st in self.stores})}: their grids "
                             f"differ; merge stores of one version")
        self.version = 2 if versions == {2} else SCHEMA_VERSION

    def groups(self, order: Iterable[tuple[int, str]] | None) -> Iterator[tuple[str, list]]:
        """(input url, group) in the merge order; an input that does not follow it is named."""
        streams = [iter(st.groups()) for st in self.stores]
        if order is None:
            for u, stream in zip(self.urls, streams, strict=True):
                for group in stream:
                    yield u, group
            return
        for pos, (i, want) in enumerate(order):
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(streams):
                raise ValueError(f"merge order entry {pos} names input {i!r}; there are "
                                 f"{len(streams)} inputs")
            got = next(streams[i], None)
            found = None if got is None else str(got[0]["example_id"])
            if found != want:
                raise ValueError(f"input {i} ({self.urls[i]}) does not hold its groups in the "
                                 f"merge order: expected example {want!r} next (entry {pos}), "
                                 f"found {found!r}; the stores belong to another run or dataset")
            yield self.urls[i], got
        for i, rest in enumerate(streams):
            if next(rest, None) is not None:
                raise ValueError(f"input {i} ({self.urls[i]}) holds more groups than the merge "
                                 "order gives it; it belongs to another run or dataset")

    def run(self, order: Iterable[tuple[int, str]] | None, shard_records: int | None,
            report_key: str | None, report: Any, resume: bool) -> str:
        # Nothing is written before this point.  Without `resume`, the store is built under a
        # temporary sibling name and renamed into place (atomic) locally; on object stores
        # nothing is committed until the one manifest write at the end, and a failure removes
        # what was written.  With `resume`, OUT is written in place (this process holds its
        # lock), and created only with its first group.
        temp = self.local and not resume
        parent, leaf = os.path.split(self.out_root) if self.local else ("", self.out_root)
        target = os.path.join(parent, temp_name(leaf)) if temp else self.out_url
        listed = self.meta.tokenizer.get("files") if isinstance(self.meta.tokenizer, dict) else None
        kw = {"shard_records": int(shard_records or self.stores[0].manifest.get("shard_records", 1024)),
              "resume": resume, "_schema_version": self.version,
              "_staged": not self.local and not resume, "_lock": not resume,
              "report_key": report_key,
              "tokenizer_files": self.stores[0].tokenizer_files() if listed else None}
        w: StoreWriter | None = None
        try:
            if temp:  # gc removes a killed merge's output by this marker, never by its name
                write_temp_marker(target, "merge output", self.out_root)
            if not resume or _holds_store(self.fs, self.out_root):
                w = StoreWriter(target, self.meta, **kw)
            done = w.done_example_ids if w is not None else set()
            seen: set[str] = set()
            for u, group in self.groups(order):
                eid = str(group[0]["example_id"])
                if eid in seen:
                    raise ValueError(f"example_id {eid!r} of {u} is also in an earlier input; "
                                     "the merged stores must be disjoint")
                seen.add(eid)
                if eid not in done:
                    w = w or StoreWriter(target, self.meta, **kw)
                    w.add_group(group)
            w = w or StoreWriter(target, self.meta, **kw)
            w.close(report() if callable(report) else report)
            if temp:
                os.remove(os.path.join(target, TEMP_MARKER))  # complete: no longer temporary
                if os.path.isdir(self.out_root):
                    os.rmdir(self.out_root)  # empty (checked); rename cannot replace it portably
                os.rename(target, self.out_root)
        except BaseException:
            if w is not None:
                w.abort()  # a staged writer removes its shards; a resumable one keeps them
            if temp and self.fs.exists(target):
                self.fs.rm(target, recursive=True)
            raise
        return self.out_url


def _holds_store(fs: Any, root: str) -> bool:
    return fs.exists(join(root, MANIFEST))
