"""The one resolver of `--reward` specs, shared by precompute (rollout rewards) and train
(TGPO, eval): neither imports the other, both import this.

A reward is `fn(prompt: str, response: str, row: dict | None) -> float`, where `row` is the
dataset row the prompt came from (None where there is none, e.g. in eval). Built in:
`sort_rule` (the demo task) and `numeric_exact_match` (the last number of the response
equals the last number of the row's `answer`, `completion` or `chosen`). Any other reward
is `module:function` (or `module:Class.method`), resolved with `pkgutil.resolve_name`; a
module that is not importable from sys.path is looked up in the current directory too, as
`python -m` would find it: `--reward myrewards:score` works next to myrewards.py.
"""

from __future__ import annotations

import os
import pkgutil
import sys
from collections.abc import Callable

RewardFn = Callable[..., float]
#: Built-in names and the functions they stand for (imported when named: this module
#: imports neither precompute nor train).
BUILTIN: dict[str, str] = {
    "sort_rule": "kdcache.train.tasks:sort_rule",
    "numeric_exact_match": "kdcache.train.rewards:numeric_exact_match",
}


def resolve_reward(spec: str) -> RewardFn:
    """A built-in name or `module:function` -> the callable; one clear error otherwise."""
    if spec in BUILTIN:
        return pkgutil.resolve_name(BUILTIN[spec])
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(
            f"reward {spec!r} is not `module:function`: e.g. mypkg.rewards:exact "
            f"(built in: {', '.join(BUILTIN)})"
        )
    try:
        fn = _resolve(spec)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name != top:  # the module exists but imports something missing
            raise ValueError(f"cannot load reward {spec!r}: {e}") from e
        raise ValueError(
            f"cannot load reward {spec!r}: {e}, cannot import it; put {top}.py (or the package) in the current "
            f"directory or on PYTHONPATH, or name a built-in: {', '.join(BUILTIN)}"
        ) from e
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load reward {spec!r}: {e} (no attribute {name!r}?)") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def _resolve(spec: str):
    """pkgutil.resolve_name, falling back to the current directory (the `kdcache` entry
    point, unlike `python -m`, does not put it on sys.path). Appended, not prepended, so a
    file in the current directory never shadows an installed package."""
    try:
        return pkgutil.resolve_name(spec)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != spec.partition(":")[0].split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return pkgutil.resolve_name(spec)
