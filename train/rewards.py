"""Reward callables named as `module:function` (TGPO rewards, eval rule rewards).

A reward is `fn(prompt: str, response: str, row: dict | None) -> float`, where `row` is the
dataset row the prompt came from (None where there is none, e.g. in eval). Built in:
`sort_rule` (the demo task) and `numeric_exact_match` (the last number of the response
equals the last number of the row's `answer`, `completion` or `chosen`). Names are resolved
by `kdcache.rewards.resolve_reward` (re-exported here), the one resolver precompute's
rollouts use too.
"""

from __future__ import annotations

import re

from kdcache.rewards import BUILTIN, RewardFn, resolve_reward

from .tasks import sort_rule

__all__ = ["BUILTIN", "RewardFn", "numeric_exact_match", "resolve_reward", "sort_rule"]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numeric_exact_match(prompt: str, response: str, row: dict | None = None) -> float:
    """1.0 when the response's last number equals the reference answer's last number."""
    row = row or {}
    answer = next((row[k] for k in ("answer", "completion", "chosen") if isinstance(row.get(k), str)), None)
    if answer is None:
        return 0.0
    got, want = _NUMBER.findall(response), _NUMBER.findall(answer)
    return float(bool(got) and bool(want) and float(got[-1]) == float(want[-1]))
