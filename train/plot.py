"""`kdcache plot`: loss curves of training runs, and a table of their eval results.

A source is a run directory (`--out` of `kdcache train`: `metrics.jsonl`, and `eval.json`
once `kdcache eval` has run on its model) or a results file holding `{"rows": [...]}` (the
demo's `results.json`). A results row names its run (`run`, else its `method`): when one run
directory of that name is also given, the two are one row (the run's loss, the row's eval).
"""

from __future__ import annotations

import json
from pathlib import Path

# eval columns in the order a reader wants them, with their table headings (the reward's and
# the EOS token's are named from the rows: `headings`)
EVAL_COLUMNS = {"reward_mean": "pref rate", "eos_rate": "ends EOS", "reward_accuracy": "reward acc",
                "kl_topk": "KL top-K", "train_s": "train s", "store_mb": "store MB"}
COUNTS = {"groups", "pairs", "samples"}  # sizes of the eval, not results: left out of the table
LABELS = ("reward", "eos_token")  # eval.json's names of what was measured, not numbers


def _one(rows: list[dict], key: str, metric: str) -> str | None:
    """The value of `key` shared by every row that has `metric` (None if they differ or lack it)."""
    seen = {r.get(key) for r in rows if r.get(metric) is not None}
    return seen.pop() if len(seen) == 1 else None


def reward_label(rows: list[dict]) -> str:
    """What `reward_mean` is: the reward's name (`eval --reward`), `pref rate` for rows that
    predate the name (the demo's rule), `reward` for a mix."""
    if not any(r.get("reward_mean") is not None for r in rows):
        return "reward"
    if not any(r.get("reward") for r in rows if r.get("reward_mean") is not None):
        return "pref rate"
    name = _one(rows, "reward", "reward_mean")
    return f"reward {name.rsplit(':', 1)[-1]}" if name else "reward (mixed)"


def headings(rows: list[dict]) -> dict[str, str]:
    eos = _one(rows, "eos_token", "eos_rate")
    return {"steps": "steps", "final_loss": "final loss", **EVAL_COLUMNS, "reward_mean": reward_label(rows),
            "eos_rate": f"ends {eos}" if eos else "ends EOS"}


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
        ev = json.loads((path / "eval.json").read_text())
        row.update({k: v for k, v in ev.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        row.update({k: ev[k] for k in LABELS if isinstance(ev.get(k), str)})
        if "reward" not in row and isinstance((ev.get("config") or {}).get("reward"), str):
            row["reward"] = ev["config"]["reward"]  # eval.json written before `reward` was a key
    return [row]


def merge_rows(pairs: list[tuple[Path, dict]]) -> list[dict]:
    """One row per run. A results-file row joins the one run directory of its name (its `run`
    key, else its method), taking the run's loss; runs of one name from different places
    (runs/dckd, demo/runs/dckd) keep apart, named by their paths."""
    dirs = [(p, r) for p, r in pairs if not p.is_file()]
    by_name: dict[str, list[dict]] = {}
    for _, r in dirs:
        by_name.setdefault(r["name"], []).append(r)
    out: list[dict] = []
    for path, r in pairs:
        if not path.is_file():
            out.append(r)
            continue
        match = by_name.get(str(r.get("run") or r["name"]), [])
        if len(match) == 1:  # the run's own eval.json wins where both hold a value
            run = match[0]
            run.update({k: v for k, v in r.items() if k not in run or k == "name"})
        else:
            out.append(r)
    for path, r in dirs:
        if len(by_name[path.name]) > 1 and r["name"] == path.name:
            r["name"] = path.as_posix()
    return out


def format_table(rows: list[dict]) -> str:
    """A Markdown table: run, steps, final loss, then every eval column any row has."""
    cols = ["steps", "final_loss"] + [k for k in EVAL_COLUMNS if any(k in r for r in rows)]
    extra = sorted({k for r in rows for k, v in r.items() if k not in cols and k not in ("name", "run") and k not in COUNTS
                    and not k.startswith("_") and isinstance(v, int | float) and not isinstance(v, bool)})
    cols += extra
    heads = headings(rows)

    def cell(v) -> str:
        if v is None:
            return "-"
        return str(v) if isinstance(v, int) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"

    def esc(text: str) -> str:  # a `|` in a name (<|im_end|>) would split the Markdown cell
        return text.replace("|", "\\|")

    lines = ["| run | " + " | ".join(esc(heads.get(c, c)) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join([esc(str(r["name"]))] + [cell(r.get(c)) for c in cols]) + " |" for r in rows]
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


def draw(sources: list[Path], table: bool = False, log_y: bool = False):
    """The figure: one loss-vs-step curve per run (a marker where a run has one point; the
    legend outside the axes, so many runs hide no curve) and, with `table`, bars of the eval
    columns: the reward and reward accuracy (0..1) beside top-K KL (nats per token).
    `log_y`: a log loss axis (symlog when a loss is <= 0), for losses that fall by orders of
    magnitude (per-sequence sums). Returns (figure, table rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("kdcache plot needs matplotlib: pip install 'kdcache[plot]'") from e
    rows = merge_rows([(Path(s), r) for s in sources for r in read_source(s)])
    runs = [r for r in rows if r.get("_metrics")]
    scored = [r for r in rows if any(r.get(k) is not None for k in ("reward_mean", "reward_accuracy", "kl_topk"))]
    kl = [r for r in scored if r.get("kl_topk") is not None]
    panels = 1 + (table and bool(scored)) + (table and bool(kl))
    fig, axes = plt.subplots(1, panels, figsize=(6.5 + 4.5 * (panels - 1) + (2.2 if runs else 0), 4.4),
                             squeeze=False, width_ratios=[1.5] + [1] * (panels - 1))
    ax = axes[0][0]
    for run, style in zip(runs, run_styles(len(runs)), strict=True):
        m = run["_metrics"]
        ax.plot([r["step"] for r in m], [r["loss"] for r in m], label=run["name"],
                marker="o" if len(m) == 1 else None, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (as trained)")
    ax.set_title("training loss")
    if log_y:
        positive = all(r["loss"] > 0 for run in runs for r in run["_metrics"])
        ax.set_yscale("log" if positive else "symlog")
    if runs:
        ax.legend(fontsize=7, ncol=1 if len(runs) <= 16 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    if table and scored:
        ax2 = axes[0][1]
        x = range(len(scored))
        ax2.bar([i - 0.2 for i in x], [r.get("reward_mean") or 0 for r in scored], 0.4, label=reward_label(rows))
        ax2.bar([i + 0.2 for i in x], [r.get("reward_accuracy") or 0 for r in scored], 0.4, label="reward accuracy")
        ax2.set_xticks(list(x), [r["name"] for r in scored], rotation=40, ha="right", fontsize=7)
        ax2.set_xlim(-0.6, len(scored) - 0.4)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        ax2.set_title("eval (higher is better)", pad=24)
    if table and kl:
        ax3 = axes[0][-1]
        ax3.bar(range(len(kl)), [r["kl_topk"] for r in kl], 0.6, color="tab:green")
        ax3.set_xticks(list(range(len(kl))), [r["name"] for r in kl], rotation=40, ha="right", fontsize=7)
        ax3.set_ylabel("nats per token")
        ax3.set_title("KL top-K to the teacher (lower is closer)", pad=24)
    fig.tight_layout()
    return fig, rows


def plot_runs(sources: list[Path], out: Path, table: bool = False, log_y: bool = False) -> tuple[Path, str | None]:
    """Draw `sources` into `out` (written whole: a temporary file, then a rename). Returns the
    image path and, with `table`, the Markdown table of the sources."""
    fig, rows = draw(sources, table, log_y)
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # the legend outside the axes stays in
    plt.close(fig)
    tmp.replace(out)
    return out, (format_table(rows) if table else None)
