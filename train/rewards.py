"""Reward callables named as `module:function` (TGPO rewards, eval rule rewards).

A reward is `fn(prompt: str, response: str, row: dict | None) -> float`, where `row` is the
dataset row the prompt came from (None where there is none, e.g. in eval). Built in:
`sort_rule` (the demo task) and `numeric_exact_match` (the last number of the response
equals the last number of the row's `answer`, `completion` or `chosen`).

A module that is not importable from sys.path is looked up in the current directory too, as
`python -m` would find it: `--reward myrewards:score` works next to myrewards.py.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
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
        fn = getattr(_import(module), name)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:  # the module exists but imports something missing
            raise ValueError(f"cannot load reward {spec!r}: {e}") from e
        raise ValueError(
            f"cannot load reward {spec!r}: {e}; put {module.split('.')[0]}.py (or the package) in "
            f"the current directory or on PYTHONPATH, or name a built-in: {', '.join(BUILTIN)}"
        ) from e
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def _import(module: str):
    """import_module, falling back to the current directory (the `kdcache` entry point, unlike
    `python -m`, does not put it on sys.path). Appended, not prepended, so a file in the
    current directory never shadows an installed package."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        cwd = os.getcwd()
        if e.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module)
