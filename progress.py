"""The one rich progress bar of kdcache's long loops (precompute, rollout, training), on
stderr: stdout carries only a command's result. Shared by precompute and train, which do
not import each other."""

from __future__ import annotations


def progress_bar(title: str, *stats: str, enabled: bool = True, eta_label: bool = False):
    """A rich Progress: `title` (bold; may name `{task.description}`), a bar, done/total,
    one text column per `stats` template (e.g. "{task.fields[tps]} tok/s"), elapsed time and
    the time remaining (after the word ETA with `eta_label`)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                    *(TextColumn(s) for s in stats), TimeElapsedColumn(),
                    *([TextColumn("ETA")] if eta_label else []), TimeRemainingColumn(),
                    disable=not enabled, transient=False, console=Console(stderr=True))
