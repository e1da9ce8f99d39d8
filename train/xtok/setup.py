"""Deciding, once per run, whether a student reads the store through another tokenizer.

`prepare(cfg, store, student_tok, cache_dir)` returns None when the student shares the
store's tokenizer and `--cross-tokenizer` is off, and a `CrossTokenizer` (the data
loader's record translator) when it is on; everything it refuses is one clear line.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .translate import CrossTokenizer
from .vocab_map import load_or_build_map

__all__ = ["prepare", "xtok_cache_dir", "store_tokenizer", "tokenizer_hash", "tokenizers_differ", "REFUSED"]

#: Objectives that read per-state values of the teacher's own tokens (METHODS §5).
REFUSED = {
    "tvkd": "tvkd reads the teacher's soft value at every state of ITS tokens, which another "
            "tokenizer's states do not match; use kd, dckd, adpa, dpo or pbsd across tokenizers",
    "tgpo": "tgpo reads per-token behaviour log-probs and teacher guidance on the sampler's own "
            "tokens; use a student that shares the teacher's tokenizer",
}


def xtok_cache_dir() -> Path:
    """Where vocabulary maps are cached: $KDCACHE_CACHE/xtok, else ~/.cache/kdcache/xtok
    (XDG_CACHE_HOME honoured); shared by runs, keyed by both tokenizers' hashes."""
    root = os.environ.get("KDCACHE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kdcache")
    return Path(root) / "xtok"


def tokenizer_hash(tok: Any) -> str:
    """sha256 over what maps text to ids (the backend's JSON, special tokens, chat template)."""
    payload = {"core": json.loads(tok.backend_tokenizer.to_str()),
               "eos": tok.eos_token_id, "bos": tok.bos_token_id,
               "chat_template": getattr(tok, "chat_template", None)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def store_tokenizer(store: Any) -> Any:
    """The store's teacher tokenizer, rebuilt from the files it carries (no remote code)."""
    from transformers import AutoTokenizer

    files = store.tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="kdcache-tok-") as d:
        for name, data in files.items():  # names were checked by the store
            (Path(d) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - one clear line
            raise ValueError(f"store {store.url}: its tokenizer files do not load "
                             f"({type(e).__name__}: {e}); re-run `kdcache precompute`") from None


def tokenizers_differ(store: Any, student_tok: Any, teacher_tok: Any | None) -> bool:
    """The student's ids would mean other tokens than the store's: a different vocabulary
    size, or (when the store carries its tokenizer) a different token -> id table."""
    size = store.meta.tokenizer.get("vocab_size") if isinstance(store.meta.tokenizer, dict) else None
    if size is not None and int(size) != len(student_tok):
        return True
    if teacher_tok is None:
        return False
    return (teacher_tok.get_vocab() != student_tok.get_vocab()
            or teacher_tok.eos_token_id != student_tok.eos_token_id)


def prepare(cfg: Any, store: Any, student_tok: Any, cache_dir: str | Path | None,
            store_name: str | None = None) -> CrossTokenizer | None:
    name = store_name or store.url
    teacher_tok = store_tokenizer(store) if store.has_tokenizer_files else None
    if cfg.cross_tokenizer == "off":
        # a size mismatch is named by the trainer's own check; same size, other tokens here
        if teacher_tok is not None and tokenizers_differ(store, student_tok, teacher_tok):
            raise ValueError(
                f"the student's tokenizer has other tokens than store {name}'s (both "
                f"{len(student_tok)} ids): the store's ids would mean other tokens to this student; "
                "pass --cross-tokenizer map (or uld) to align the two tokenizers, or use a "
                "student that shares the teachers' tokenizer")
        return None
    if cfg.objective in REFUSED:
        raise ValueError(f"--cross-tokenizer with --objective {cfg.objective}: {REFUSED[cfg.objective]}")
    if teacher_tok is None:
        raise ValueError(
            f"store {name} was written before stores carried their tokenizer's files and text: "
            "re-run the same `kdcache precompute` command with this kdcache (a new store key), "
            "then train with --cross-tokenizer on the new store")
    t_hash = str(store.meta.tokenizer.get("sha256") or tokenizer_hash(teacher_tok))
    vmap = load_or_build_map(teacher_tok, student_tok, t_hash, tokenizer_hash(student_tok), cache_dir)
    return CrossTokenizer(teacher_tok, student_tok, vmap, cfg.cross_tokenizer,
                          own_topk=store.meta.k if cfg.cross_tokenizer == "uld" else 0)
