"""Option checks shared by `PrecomputeConfig` and `RolloutConfig`.

Why up front: an option is checked before any file is read, any model is loaded or anything
is written, so a typo costs one `error:` line and leaves nothing behind. Each message names
the flag (`--k`), the value given and what would be accepted.
"""

from __future__ import annotations

import math
from typing import Any

# "exact" (gather at DPO ids) | "paper" (ADPA's approximation) | "paper-dpo-floor" (that
# approximation as the ADPA authors' released data pipeline builds it, METHODS §2). Here,
# with the other rules: config (no torch) and scoring both read it.
REF_MODES = ("exact", "paper", "paper-dpo-floor")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_int(name: str, value: Any, lo: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag(name)} must be an integer >= {lo}, got {value!r}")
    if value < lo:
        raise ValueError(f"{flag(name)} must be >= {lo}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag(name)} must be one of {', '.join(choices)}; got {value!r}")


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = True) -> float:
    """A finite number within (lo, hi] (or [lo, hi] when lo_open=False)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag(name)} must be a number, got {value!r}") from None
    low_bad = lo is not None and (x <= lo if lo_open else x < lo)
    if not math.isfinite(x) or low_bad or (hi is not None and x > hi):
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"<= {hi:g}"
        want = " and ".join(s for s in (lo_s, hi_s) if s) or "finite"
        raise ValueError(f"{flag(name)} must be a finite number {want}, got {value!r}")
    return x


def parse_betas(value: Any) -> list[float]:
    """β list from a list or a comma-separated string: non-empty, numeric, > 0, distinct."""
    example = "e.g. --betas 1 or --betas 0.5,1,2"
    if isinstance(value, str):
        items: list[Any] = [s.strip() for s in value.split(",")] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"--betas must be a list of numbers, got {value!r} ({example})")
    if not items:
        raise ValueError(f"--betas is empty: give at least one soft-value β > 0 ({example})")
    out: list[float] = []
    for x in items:
        if x is None or (isinstance(x, str) and not x.strip()):
            raise ValueError(f"--betas {value!r} has an empty entry ({example})")
        try:
            if isinstance(x, bool):
                raise TypeError
            b = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"--betas: {x!r} is not a number ({example})") from None
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"--betas: every β must be a finite number > 0, got {x!r} ({example})")
        if b in out:
            raise ValueError(f"--betas lists β={b:g} twice; give each β once")
        out.append(b)
    return out


def parse_partition(value: Any) -> tuple[int, int] | str | None:
    """None, "auto", "i/N" or (i, N) -> (i, N) with 0 <= i < N, or "auto"."""
    if value is None:
        return None
    fix = "use --partition i/N with 0 <= i < N (e.g. 0/4), or auto under torchrun / a Slurm array"
    if isinstance(value, str):
        s = value.strip().lower()
        if s == "auto":
            return "auto"
        parts = s.replace(",", "/").split("/")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ValueError(f"--partition: cannot read {value!r}; {fix}")
    try:
        if len(parts) != 2 or any(isinstance(p, bool) for p in parts):
            raise ValueError
        i, n = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--partition: cannot read {value!r}; {fix}") from None
    if not 0 <= i < n:
        raise ValueError(f"--partition {i}/{n}: need 0 <= index < count; {fix}")
    return i, n


def check_device(device: Any) -> None:
    """A device torch understands and this machine has ("auto", "cpu", "cuda", "cuda:1")."""
    import torch

    if device in (None, "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or "
                         "cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: no CUDA device is visible here; use --device "
                             "cpu (or auto), or check CUDA_VISIBLE_DEVICES")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: only {n} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{n - 1})")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


def check_codec(codec: Any, error_bound: Any) -> None:
    """Asks the store whether it can write this codec (before anything is written)."""
    from .storeapi import resolve_codec

    opts: dict[str, Any] = {"codec": codec}
    if error_bound is not None:
        opts["error_bound"] = check_float("error_bound", error_bound, lo=0.0)
    try:
        resolve_codec(opts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--codec {codec!r} / --error-bound {error_bound!r}: {e}") from None


def check_template(name: str, template: Any, keys: tuple[str, ...]) -> None:
    """A str.format template that uses exactly the given keys (each at least once)."""
    if not isinstance(template, str):
        raise ValueError(f"{flag(name)} must be a string, got {template!r}")
    try:
        template.format(**{k: "" for k in keys})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{flag(name)} {template!r} is not a valid template ({e!r}); it may "
                         f"use only {', '.join('{' + k + '}' for k in keys)}") from None
    missing = [k for k in keys if "{" + k + "}" not in template]
    if missing:
        raise ValueError(f"{flag(name)} {template!r} lacks {', '.join('{' + k + '}' for k in missing)}")


def check_fields(value: Any, teacher: Any, reference: Any) -> list[str]:
    """--fields: METHODS.md §1 per-token fields to store (a list or comma-separated)."""
    from .storeapi import REF_FIELDS, TEACHER_FIELDS  # the store's field groups

    fields = ([f.strip() for f in value.split(",")] if isinstance(value, str) else list(value))
    shown = ",".join(map(str, fields))
    known = TEACHER_FIELDS + REF_FIELDS
    unknown = [f for f in fields if f not in known]
    if unknown or not fields or any(not f for f in fields):
        raise ValueError(f"--fields {shown!r}: give per-token fields among {', '.join(known)} "
                         "(behavior_logprob is carried over from rollout stores by itself)")
    if len(set(fields)) != len(fields):
        raise ValueError(f"--fields {shown!r} names a field twice")
    refs = [f for f in fields if f in REF_FIELDS]
    if teacher is None and reference is None:
        raise ValueError("--fields needs a --teacher (without one the store holds token ids only)")
    if teacher is None and fields != ["ref_token_logprob"]:
        need = [f for f in fields if f != "ref_token_logprob"]
        raise ValueError(f"--fields {need} need the teacher (ref_topk_logprobs is read at its top-K ids): pass "
                         "--teacher; a --reference alone stores ref_token_logprob only (a DPO store)")
    if refs and reference is None:
        raise ValueError(f"--fields {refs} are the reference's: pass --reference")
    if reference is not None and not refs:
        raise ValueError(f"--reference is not used by --fields {fields}: drop it, or store "
                         "ref_token_logprob / ref_topk_logprobs")
    if ("topk_ids" in fields) != ("topk_logprobs" in fields):
        raise ValueError("--fields: topk_ids and topk_logprobs go together")
    if "ref_topk_logprobs" in fields and "topk_ids" not in fields:
        raise ValueError("--fields: ref_topk_logprobs is read at the teacher's top-K ids; add "
                         "topk_ids,topk_logprobs")
    return fields


COLUMN_ROLES = ("prompt", "chosen", "rejected", "completion", "id", "context")


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`prompt=question,chosen=response_j` -> {"prompt_column": "question", ...} (DataOptions
    fields); one clear error for anything else."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (
        p.split("=", 1) if "=" in p else (p, "") for p in str(spec).split(",") if p.strip())
    out: dict[str, str] = {}
    for ours, theirs in pairs:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if ours not in COLUMN_ROLES or not theirs:
            raise ValueError(f"--columns {spec!r}: each entry is ROLE=COLUMN with ROLE one of "
                             f"{', '.join(COLUMN_ROLES)}, e.g. --columns "
                             "prompt=question,chosen=response_j,rejected=response_k")
        out[f"{ours}_column"] = theirs
    return out
