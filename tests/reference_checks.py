"""Assertions and float64 references shared by several test files (not a test module)."""

from __future__ import annotations

import torch


def one_error(res, *needles: str, stream: str = "output", alone: bool = False,
              quiet_stdout: bool = False, max_len: int | None = None) -> str:
    """A CLI result (typer's CliRunner) that exited 2 with exactly one `error:` line holding
    every needle, and no traceback.

    stream: where the line is looked for, "output" (stdout and stderr) or "stderr";
    alone: the error line is the only non-blank line of that stream;
    quiet_stdout: nothing at all on stdout (a refused command prints no result);
    max_len: the line is shorter than this (one line, not a dump)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    text = res.stderr if stream == "stderr" else res.output
    shown = [ln for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in shown if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    if alone:
        assert shown == lines, res.output
    if quiet_stdout:
        assert res.stdout == "", res.stdout
    if max_len is not None:
        assert len(lines[0]) < max_len, lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
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
