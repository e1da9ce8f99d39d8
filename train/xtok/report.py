"""What a (store, student tokenizer) pairing keeps, before anyone trains (METHODS §5):
the aligned fraction of student tokens and the teacher top-K mass that maps.
`kdcache inspect STORE --student DIR` prints it."""

from __future__ import annotations

from typing import Any

from .setup import store_tokenizer, tokenizer_hash, xtok_cache_dir
from .translate import CrossTokenizer
from .vocab_map import UNMAPPED, load_or_build_map

__all__ = ["alignment_report"]


def alignment_report(store: Any, student_dir: str, max_records: int = 2000) -> dict[str, Any]:
    """Translate up to `max_records` records (whole groups, in stored order) into the
    student's tokens and count; the vocabulary map is built (or read from the cache) once."""
    from transformers import AutoTokenizer

    if not store.has_tokenizer_files:
        raise ValueError(f"store {store.url} was written before stores carried their tokenizer's "
                         "files and text: re-run the same `kdcache precompute` command with this "
                         "kdcache, then inspect the new store")
    try:
        student = AutoTokenizer.from_pretrained(student_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the student tokenizer from {student_dir!r} "
                         f"({type(e).__name__}: {e}); pass a local HF model directory") from None
    teacher = store_tokenizer(store)
    t_hash = str(store.meta.tokenizer.get("sha256") or tokenizer_hash(teacher))
    vmap = load_or_build_map(teacher, student, t_hash, tokenizer_hash(student), xtok_cache_dir())
    xt = CrossTokenizer(teacher, student, vmap, "map")
    fields = [f for f in ("topk_ids", "topk_logprobs") if f in store.fields]
    seen = 0
    for group in store.groups(fields=fields):
        for r in group:
            xt(r)
        seen += len(group)
        if seen >= max_records:
            break
    s = xt.stats
    return {
        "student": student_dir,
        "records": s.records,
        "student_tokens": s.student_tokens,
        "aligned_fraction": s.aligned_fraction,
        "mapped_topk_mass": s.mapped_mass_fraction if fields else None,
        "teacher_ids_mapped": float((vmap != UNMAPPED).float().mean()),
        "records_not_respanned": s.unspanned,
    }


def format_report(r: dict[str, Any]) -> str:
    mass = "-" if r["mapped_topk_mass"] is None else f"{100 * r['mapped_topk_mass']:.1f}%"
    return (f"student tokenizer {r['student']}: over {r['records']} records "
            f"({r['student_tokens']} student tokens)\n"
            f"  aligned fraction of student tokens   {100 * r['aligned_fraction']:.1f}%\n"
            f"  teacher top-K mass that maps          {mass} (at aligned positions)\n"
            f"  teacher ids with a student id         {100 * r['teacher_ids_mapped']:.1f}%")
