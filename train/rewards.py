"""Reward callables named as `module:function` (TGPO rewards, eval rule rewards).

A reward is `fn(prompt: str, response: str, row: dict | None) -> float`, where `row` is the
dataset row the prompt came from (None where there is none, e.g. in eval). Built in:
`sort_rule` (the demo task) and `numeric_exact_match` (the last number of the response
equals the last number of the row's `answer`, `completion` or `chosen`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from .tasks import sort_rule

RewardFn = Callable[..., float]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
BUILTIN = {"sort_rule": sort_rule}


def numeric_exact_match(prompt: str, response: str, row: dict | None = None) -> float:
    """1.0 when the response's last number equals the reference answer's last number."""
    row = row or {}
    answer = next((row[k] for k in ("answer", "completion", "chosen") if isinstance(row.get(k), str)), None)
    if answer is None:
        return 0.0
    got, want = _NUMBER.findall(response), _NUMBER.findall(answer)
    return float(bool(got) and bool(want) and float(got[-1]) == float(want[-1]))


BUILTIN["numeric_exact_match"] = numeric_exact_match


def resolve_reward(spec: str) -> RewardFn:
    """`module:function` (or a built-in name) -> the callable, with a clear error."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(
            f"reward {spec!r} is not `module:function`: e.g. kdcache.train.rewards:sort_rule "
            f"(built in: {', '.join(BUILTIN)})"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn
