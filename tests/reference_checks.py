"""Assertions and float64 references shared by several test files (not a test module)."""

from __future__ import annotations

import torch


def one_error(res, *needles: str) -> str:
    """A CLI result (typer's CliRunner) that exited 2 with exactly one `error:` line holding
    every needle, and no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def processed_logprobs(z: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Independent float64 temperature -> top-k -> nucleus, then log_softmax."""
    z = z.double() / temperature
    if top_k:
        kth = z.topk(top_k, -1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        p = torch.softmax(z, -1)
        sp, order = p.sort(-1, descending=True)
        mass_above = sp.cumsum(-1) - sp  # mass of strictly more probable tokens
        keep_sorted = mass_above < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(z, -1)
