"""The byte-string vocabulary map M: teacher id -> student id (METHODS §5).

M(t) = s where both tokens decode to the same byte string and the student has exactly one
such id. A token's byte string is what it contributes to decoded text, read from the
tokenizer's own decoder settings (tokenizer.json), not from `decode([id])`, which would
strip a sentencepiece word's leading space or garble a partial UTF-8 byte:
- byte-level BPE (GPT-2, Llama 3, Qwen): the token's characters through the inverse of the
  GPT-2 byte-to-unicode table;
- byte-fallback tokens `<0xNN>`: the byte NN;
- sentencepiece-style (`Metaspace`, `Replace("▁", " ")`): "▁" is a space;
- WordPiece: a continuation's `##` prefix is dropped;
- added / special tokens: their text.
Decisions (docs/METHODS.md §5): a student byte string claimed by a byte-fallback id and a
regular id counts once, for the regular id (byte-fallback ids are only emitted for text the
regular vocabulary cannot spell); the teacher's EOS maps to the student's EOS (both end the
response); several teacher ids may map to one student id (their probabilities are summed at
a position, train/xtok/translate.py).

Built once per (teacher tokenizer hash, student tokenizer hash) and cached as safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["token_bytes", "build_map", "load_or_build_map", "UNMAPPED"]

UNMAPPED = -1
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_kinds(spec: Any) -> list[dict]:
    if not isinstance(spec, dict):
        return []
    if spec.get("type") == "Sequence":
        return [d for sub in spec.get("decoders", []) for d in _decoder_kinds(sub)]
    return [spec]


def token_bytes(tok: Any) -> list[bytes | None]:
    """The byte string of every id in [0, size) (None for holes in the id space)."""
    backend = tok.backend_tokenizer
    spec = json.loads(backend.to_str())
    decs = _decoder_kinds(spec.get("decoder"))
    kinds = {d.get("type") for d in decs}
    byte_level = "ByteLevel" in kinds
    fallback = bool((spec.get("model") or {}).get("byte_fallback")) or "ByteFallback" in kinds
    replace = [(d["pattern"].get("String"), d.get("content", "")) for d in decs
               if d.get("type") == "Replace" and isinstance(d.get("pattern"), dict)]
    replace += [(d.get("replacement", "▁"), " ") for d in decs if d.get("type") == "Metaspace"]
    wp_prefix = next((d.get("prefix", "##") for d in decs if d.get("type") == "WordPiece"), None)
    added = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    inv = _byte_decoder() if byte_level else {}
    out: list[bytes | None] = [None] * size
    for piece, i in vocab.items():
        if i in added:
            out[i] = added[i].encode("utf-8")
            continue
        m = _BYTE_FALLBACK.match(piece) if fallback else None
        if m:
            out[i] = bytes([int(m.group(1), 16)])
        elif byte_level:
            out[i] = bytes(inv[c] if c in inv else ord(c) for c in piece) \
                if all(c in inv for c in piece) else piece.encode("utf-8")
        else:
            s = piece
            if wp_prefix and s.startswith(wp_prefix) and len(s) > len(wp_prefix):
                s = s[len(wp_prefix):]
            for pat, content in replace:
                if pat:
                    s = s.replace(pat, content)
            out[i] = s.encode("utf-8")
    return out


def build_map(teacher_tok: Any, student_tok: Any) -> torch.Tensor:
    """M as an int64 tensor over the teacher's ids: the student id, or UNMAPPED (-1)."""
    t_bytes, s_bytes = token_bytes(teacher_tok), token_bytes(student_tok)
    s_fallback = _fallback_ids(student_tok)
    claims: dict[bytes, list[int]] = {}
    for i, b in enumerate(s_bytes):
        if b:
            claims.setdefault(b, []).append(i)
    unique: dict[bytes, int] = {}
    for b, ids in claims.items():
        regular = [i for i in ids if i not in s_fallback]
        pick = regular if regular else ids
        if len(pick) == 1:
            unique[b] = pick[0]
    m = torch.full((len(t_bytes),), UNMAPPED, dtype=torch.int64)
    for i, b in enumerate(t_bytes):
        if b and b in unique:
            m[i] = unique[b]
    t_eos, s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
    if t_eos is not None and s_eos is not None and t_eos < len(m):
        m[t_eos] = s_eos  # both end the response, whatever they are called
    return m


def _fallback_ids(tok: Any) -> set[int]:
    spec = json.loads(tok.backend_tokenizer.to_str())
    if not (spec.get("model") or {}).get("byte_fallback"):
        return set()
    return {i for p, i in tok.backend_tokenizer.get_vocab().items() if _BYTE_FALLBACK.match(p)}


def load_or_build_map(teacher_tok: Any, student_tok: Any, teacher_hash: str, student_hash: str,
                      cache_dir: str | Path | None) -> torch.Tensor:
    """M from `cache_dir/map-<teacher>-<student>.safetensors`, built and saved on a miss.

    The file is ours to trust only when its recorded hashes are the pair asked for; anything
    else (another pair, a damaged file) is rebuilt, never trusted. Written atomically."""
    from safetensors.torch import load_file, save_file

    if cache_dir is None:
        return build_map(teacher_tok, student_tok)
    path = Path(cache_dir) / f"map-{teacher_hash[:16]}-{student_hash[:16]}.safetensors"
    if path.is_file():
        try:
            d = load_file(str(path))
            m = d["map"]
            meta = d["hashes"].to(torch.uint8).numpy().tobytes().decode()
            if meta == f"{teacher_hash}|{student_hash}" and m.dtype == torch.int64 and m.dim() == 1:
                return m
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
    m = build_map(teacher_tok, student_tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    hashes = torch.tensor(list(f"{teacher_hash}|{student_hash}".encode()), dtype=torch.uint8)
    save_file({"map": m.contiguous(), "hashes": hashes}, str(tmp))
    tmp.replace(path)
    return m
