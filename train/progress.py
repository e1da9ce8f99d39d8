"""A small rich progress bar for long loops: steps, tokens/s, ETA and the running loss, on
stderr (stdout carries only a command's result)."""

from __future__ import annotations

import sys

from kdcache.progress import progress_bar


class StepProgress:
    def __init__(self, total: int, start: int = 0, desc: str = "") -> None:
        self._progress = progress_bar("{task.description}", "{task.fields[tps]:,.0f} tok/s",
                                      "loss {task.fields[loss]:.4f}", enabled=sys.stderr.isatty())
        self._progress.start()
        self._task = self._progress.add_task(desc, total=total, completed=start, loss=float("nan"), tps=0.0)

    def update(self, n: int = 1, **fields) -> None:
        self._progress.update(self._task, advance=n, **fields)

    def close(self) -> None:
        self._progress.stop()
