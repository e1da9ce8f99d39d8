"""The demo's built-in task: a preference a rule can check, so no judge model is needed.

Prompt: `sort : 3 1 4 1 5`. Any permutation of the digits is a fluent answer (that is what
the SFT corpus teaches); the *preferred* answer lists them in ascending order. A student
is judged by the fraction of its sampled answers the rule accepts.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

_DIGITS = re.compile(r"\b\d\b")


def _digits(text: str) -> list[str]:
    return _DIGITS.findall(text)


def sort_rule(prompt: str, response: str, row: dict | None = None) -> float:
    """1.0 when the response is exactly the prompt's digits in ascending order."""
    body = prompt.rsplit("sort", 1)[-1]  # a privileged-context hint may precede the task
    return float(_digits(response) == sorted(_digits(body)) and len(_digits(response)) > 0
                 and len(response.split()) == len(_digits(body)))


def _prompt(rng: random.Random, min_len: int, max_len: int) -> tuple[str, list[int]]:
    digits = [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]
    return "sort : " + " ".join(map(str, digits)), digits


def _near_miss(rng: random.Random, digits: list[int]) -> list[int]:
    """A fluent but dispreferred answer: sorted with one adjacent swap, or shuffled."""
    s = sorted(digits)
    if rng.random() < 0.5:
        for _ in range(20):
            i = rng.randrange(len(s) - 1)
            if s[i] != s[i + 1]:
                s[i], s[i + 1] = s[i + 1], s[i]
                return s
    out = digits[:]
    for _ in range(20):
        rng.shuffle(out)
        if out != s:
            return out
    return out


def _inversions(seq: list[int]) -> int:
    return sum(a > b for i, a in enumerate(seq) for b in seq[i + 1 :])


def _hint(digits: list[int]) -> str:
    return "answer : " + _text(sorted(digits))


def _text(digits: list[int]) -> str:
    return " ".join(map(str, digits))


def make_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    n_sft: int = 4000,
    n_pref: int = 1500,
    n_rollout_prompts: int = 1500,
    n_eval: int = 200,
    p_sorted: float = 0.3,
    p_hint: float = 0.2,
    min_len: int = 3,
    max_len: int = 6,
) -> dict[str, Path]:
    """Write the demo's datasets as JSONL (TRL column names) and return their paths.

    sft.jsonl: prompt/completion, a corpus where only `p_sorted` of answers are sorted.
    teacher_pref.jsonl: the teacher's own alignment data, clean pairs (chosen sorted,
    rejected a near miss): real DPO teachers are aligned on larger, better preference sets
    than a student's distillation budget affords.
    pref.jsonl: the students' preference set: two answers of the corpus's writer, chosen
    the one with fewer inversions (sorted in about 60% of pairs), as in real data.
    prompts.jsonl: prompt/chosen/context for on-policy rollouts (ADPA, TGPO, PBSD); `context`
    is privileged information (the answer) that only PBSD's teacher sees.
    A fraction `p_hint` of the SFT corpus shows such a hint before the task, so the SFT
    model can use one when given it.
    eval.jsonl: held-out preference pairs (reward accuracy, rule preference rate).
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def sft_row():
        p, d = _prompt(rng, min_len, max_len)
        if rng.random() < p_hint:
            return {"prompt": f"{_hint(d)} {p}", "completion": _text(sorted(d))}
        y = sorted(d) if rng.random() < p_sorted else _near_miss(rng, d)
        return {"prompt": p, "completion": _text(y)}

    def noisy(d):  # one answer as the SFT corpus would give it
        return sorted(d) if rng.random() < p_sorted else _near_miss(rng, d)

    def pref_row():
        # As in real preference data, both answers come from the same imperfect writer and
        # `chosen` is only the BETTER one (fewer inversions), often not sorted itself: copying
        # chosen caps a student at chosen's quality; the preference points beyond it.
        p, d = _prompt(rng, min_len, max_len)
        for _ in range(50):
            a, b = noisy(d), noisy(d)
            if _inversions(a) != _inversions(b):
                break
        else:  # e.g. all digits equal: every answer is sorted
            a, b = sorted(d), _near_miss(rng, d)
        chosen, rejected = (a, b) if _inversions(a) < _inversions(b) else (b, a)
        return {"prompt": p, "chosen": _text(chosen), "rejected": _text(rejected)}

    def prompt_row():
        row = pref_row()
        row["context"] = _hint([int(c) for c in row["prompt"].split()[2:]])
        return row

    def teacher_pref_row():
        p, d = _prompt(rng, min_len, max_len)
        return {"prompt": p, "chosen": _text(sorted(d)), "rejected": _text(_near_miss(rng, d))}

    files = {
        "sft": [sft_row() for _ in range(n_sft)],
        "teacher_pref": [teacher_pref_row() for _ in range(n_pref)],
        "pref": [pref_row() for _ in range(n_pref)],
        "prompts": [prompt_row() for _ in range(n_rollout_prompts)],
        "eval": [pref_row() for _ in range(n_eval)],
    }
    paths = {}
    for name, rows in files.items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"id": f"{name}-{i}", **row}) + "\n")
        tmp.replace(path)
        paths[name] = path
    return paths
