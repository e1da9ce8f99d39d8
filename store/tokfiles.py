"""The teacher tokenizer's files inside a store (METHODS §5: a student with another tokenizer).

Why in the store: aligning a student's tokens with the teacher's needs the teacher's
tokenizer at train time, long after (and far from) precompute.  The files are small (a few
MB), listed in `meta.tokenizer["files"]` with their sha256 and size, so their hash is part
of the store key and of the manifest checksum; the bytes live at `tokenizer/NAME`.  Only the
names below are accepted on either side: a store someone else wrote is untrusted input.
"""

from __future__ import annotations

from typing import Any

from ._io import UnsafeFile, cat_files, join, write_files
from .fingerprint import hash_bytes

__all__ = ["TOKENIZER_DIR", "TOKENIZER_FILE_NAMES", "MAX_TOKENIZER_BYTES", "describe_files",
           "write_tokenizer_files", "read_tokenizer_files"]

TOKENIZER_DIR = "tokenizer"
#: What a fast HF tokenizer needs to be rebuilt exactly (no slow-tokenizer model files).
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "chat_template.jinja", "chat_template.json")
#: Refused above this, before anything is read (a real tokenizer.json is 2-20 MB).
MAX_TOKENIZER_BYTES = 64 * 2**20


def describe_files(files: dict[str, bytes]) -> dict[str, Any]:
    """{name: {"sha256", "bytes"}} for `meta.tokenizer["files"]` (names checked)."""
    bad = sorted(set(files) - set(TOKENIZER_FILE_NAMES))
    if bad:
        raise ValueError(f"tokenizer files {bad} are not stored; allowed: {list(TOKENIZER_FILE_NAMES)}")
    total = sum(len(b) for b in files.values())
    if total > MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer files take {total} bytes > {MAX_TOKENIZER_BYTES}")
    return {n: {"sha256": hash_bytes(files[n]), "bytes": len(files[n])} for n in sorted(files)}


def write_tokenizer_files(fs: Any, root: str, files: dict[str, bytes],
                          listed: dict[str, Any]) -> None:
    """Write `files` under `tokenizer/` (before the manifest that lists them is committed);
    they must be exactly what `listed` (the meta's entry) describes."""
    if describe_files(files) != listed:
        raise ValueError("the tokenizer files given to the writer differ from meta.tokenizer"
                         "['files']; build the meta entry with describe_files(files)")
    write_files(fs, {join(root, TOKENIZER_DIR, n): b for n, b in sorted(files.items())})


def read_tokenizer_files(fs: Any, root: str, listed: Any, url: str) -> dict[str, bytes]:
    """The listed files, each checked against its recorded size and sha256."""
    if not isinstance(listed, dict) or not listed:
        raise ValueError(f"store at {url} lists no tokenizer files")
    bad = sorted(n for n in listed if n not in TOKENIZER_FILE_NAMES)
    sizes = [e.get("bytes") if isinstance(e, dict) else None for e in listed.values()]
    if bad or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise ValueError(f"store at {url} lists unexpected tokenizer files {bad or list(listed)}; "
                         "the manifest is damaged or not written by kdcache")
    if sum(sizes) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"store at {url} lists {sum(sizes)} bytes of tokenizer files "
                         f"(> {MAX_TOKENIZER_BYTES}); refusing to read them")
    paths = {name: join(root, TOKENIZER_DIR, name) for name in sorted(listed)}
    # local stores: only regular files inside the root, at most the recorded size + 1 bytes
    raw = cat_files(fs, list(paths.values()), root=root,
                    limits={p: int(listed[n]["bytes"]) for n, p in paths.items()})
    out: dict[str, bytes] = {}
    for name, path in paths.items():
        entry, data = listed[name], raw.get(path)
        if isinstance(data, FileNotFoundError) or data is None:
            raise ValueError(f"store at {url}: {TOKENIZER_DIR}/{name} is missing; copy the "
                             "store whole, or re-run precompute")
        if isinstance(data, UnsafeFile):
            raise ValueError(f"store at {url}: {TOKENIZER_DIR}/{name} {data.what}: kdcache reads "
                             "only regular files inside a store")
        if isinstance(data, BaseException):
            raise ValueError(f"store at {url}: cannot read {TOKENIZER_DIR}/{name} ({data})")
        if len(data) != entry["bytes"] or hash_bytes(data) != entry.get("sha256"):
            raise ValueError(f"store at {url}: {TOKENIZER_DIR}/{name} does not match its "
                             "recorded size/sha256 (damaged); re-copy the store or re-run precompute")
        out[name] = bytes(data)
    return out
