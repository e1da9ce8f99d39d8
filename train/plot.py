"""`kdcache plot`: loss curves of training runs, and a table of their eval results.

A source is a run directory (`--out` of `kdcache train`: `metrics.jsonl`, and `eval.json`
once `kdcache eval` has run on its model) or a results file holding `{"rows": [...]}` (the
demo's `results.json`), whose rows are tabulated as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

# eval columns in the order a reader wants them, with their table headings
EVAL_COLUMNS = {"reward_mean": "pref rate", "eos_rate": "ends </s>", "reward_accuracy": "reward acc",
                "kl_topk": "KL top-K", "train_s": "train s", "store_mb": "store MB"}
COUNTS = {"groups", "pairs", "samples"}  # sizes of the eval, not results: left out of the table


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl rows, one per step (a repeated step keeps its last row: logs written by
    older versions could hold the final step twice)."""
    path = run / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def read_source(path: Path) -> list[dict]:
    """Table rows of one source: {"name", "steps", "final_loss", eval keys...}, and the run's
    metrics under "_metrics" (absent for a results file)."""
    path = Path(path)
    if path.is_file():
        try:
            rows = json.loads(path.read_text())["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a results file with a `rows` list ({e})") from None
        return [{"name": r.get("method", r.get("name", "?")), **r} for r in rows]
    has_metrics, has_eval = (path / "metrics.jsonl").exists(), (path / "eval.json").exists()
    if not (has_metrics or has_eval):
        raise FileNotFoundError(f"{path}: no metrics.jsonl or eval.json: pass training run "
                                f"directories (`--out` of kdcache train) or a demo results.json")
    row: dict = {"name": path.name}
    if has_metrics:
        metrics = read_metrics(path)
        row["_metrics"] = metrics
        if metrics:
            row.update(steps=metrics[-1]["step"], final_loss=metrics[-1].get("loss"))
    if has_eval:
        row.update({k: v for k, v in json.loads((path / "eval.json").read_text()).items()
                    if isinstance(v, int | float) and not isinstance(v, bool)})
    return [row]


def _unique_names(pairs: list[tuple[Path, dict]]) -> list[dict]:
    """Runs of one name from different places (runs/dckd, demo/runs/dckd) get their paths."""
    names = [r["name"] for _, r in pairs]
    for path, r in pairs:
        if names.count(r["name"]) > 1 and not path.is_file():
            r["name"] = path.as_posix()
    return [r for _, r in pairs]


def format_table(rows: list[dict]) -> str:
    """A Markdown table: run, steps, final loss, then every eval column any row has."""
    cols = ["steps", "final_loss"] + [k for k in EVAL_COLUMNS if any(k in r for r in rows)]
    extra = sorted({k for r in rows for k, v in r.items() if k not in cols and k != "name" and k not in COUNTS
                    and not k.startswith("_") and isinstance(v, int | float) and not isinstance(v, bool)})
    cols += extra
    heads = {"steps": "steps", "final_loss": "final loss", **EVAL_COLUMNS}

    def cell(v) -> str:
        if v is None:
            return "-"
        return str(v) if isinstance(v, int) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"

    lines = ["| run | " + " | ".join(heads.get(c, c) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join([str(r["name"])] + [cell(r.get(c)) for c in cols]) + " |" for r in rows]
    return "\n".join(lines)


def run_styles(n: int) -> list[dict]:
    """n distinct line styles: matplotlib's 10 default colours repeat after 10 runs, so more
    runs take tab20's colours and then a line style per block of 20."""
    from matplotlib import colormaps

    if n <= 10:
        return [{"color": colormaps["tab10"](i), "linestyle": "-"} for i in range(n)]
    cmap = colormaps["tab20"]
    dashes = ("-", "--", ":", "-.")
    return [{"color": cmap(i % 20), "linestyle": dashes[(i // 20) % len(dashes)]} for i in range(n)]


def draw(sources: list[Path], table: bool = False):
    """The figure: one loss-vs-step curve per run (a marker where a run has one point) and,
    with `table`, a bar chart of the eval columns beside it. Returns (figure, table rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("kdcache plot needs matplotlib: pip install 'kdcache[plot]'") from e
    rows = _unique_names([(Path(s), r) for s in sources for r in read_source(s)])
    runs = [r for r in rows if r.get("_metrics")]
    scored = [r for r in rows if r.get("reward_mean") is not None or r.get("reward_accuracy") is not None]
    ncols = 2 if table and scored else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    for run, style in zip(runs, run_styles(len(runs)), strict=True):
        m = run["_metrics"]
        ax.plot([r["step"] for r in m], [r["loss"] for r in m], label=run["name"],
                marker="o" if len(m) == 1 else None, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    if runs:
        ax.legend(fontsize=7, ncol=1 if len(runs) <= 12 else 2)
    if ncols == 2:
        ax2 = axes[0][1]
        x = range(len(scored))
        ax2.bar([i - 0.2 for i in x], [r.get("reward_mean") or 0 for r in scored], 0.4, label="pref rate (rule)")
        ax2.bar([i + 0.2 for i in x], [r.get("reward_accuracy") or 0 for r in scored], 0.4, label="reward accuracy")
        ax2.set_xticks(list(x), [r["name"] for r in scored], rotation=40, ha="right", fontsize=7)
        ax2.set_xlim(-0.6, len(scored) - 0.4)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        ax2.set_title("eval", pad=24)
    fig.tight_layout()
    return fig, rows


def plot_runs(sources: list[Path], out: Path, table: bool = False) -> tuple[Path, str | None]:
    """Draw `sources` into `out` (written whole: a temporary file, then a rename). Returns the
    image path and, with `table`, the Markdown table of the sources."""
    fig, rows = draw(sources, table)
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out, (format_table(rows) if table else None)
