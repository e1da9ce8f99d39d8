"""`kdcache plot`: loss curves of training runs and, optionally, the demo's eval table."""

from __future__ import annotations

import json
from pathlib import Path


def _read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass training output directories (`--out` of kdcache train)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: list[Path], out: Path, table: Path | None = None) -> Path:
    """One loss-vs-step curve per run; a bar chart of the eval table beside it when given."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("kdcache plot needs matplotlib: pip install 'kdcache[plot]'") from e
    runs = [r for r in runs if (r / "metrics.jsonl").exists()] or runs
    ncols = 2 if table else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    for run in runs:
        rows = _read_metrics(run)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=run.name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=7)
    if table:
        rows = json.loads(Path(table).read_text())["rows"]
        names = [r["method"] for r in rows]
        ax2 = axes[0][1]
        x = range(len(rows))
        ax2.bar([i - 0.2 for i in x], [r.get("reward_mean") or 0 for r in rows], 0.4, label="pref rate (rule)")
        ax2.bar([i + 0.2 for i in x], [r.get("reward_accuracy") or 0 for r in rows], 0.4, label="reward accuracy")
        ax2.set_xticks(list(x), names, rotation=40, ha="right", fontsize=7)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        ax2.set_title("eval", pad=24)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
