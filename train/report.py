"""Following a run in the tools people watch training in: `--report-to tensorboard,wandb`.

Each tracker gets what metrics.jsonl has (one row per log step), the resolved config, and the
store's key and provenance (teacher / reference fingerprints, the dataset fingerprint, the
precompute options, the code version: the store's StoreMeta), so a run traces back to the
signals it was trained on. The trainer calls this on rank 0 only.

The run directory keeps `report.json` (the trackers and the W&B run id): a resumed run logs
to the same W&B run, and `kdcache eval` of runs/x/model adds its results to it.
TensorBoard writes <out>/tb; W&B writes under $WANDB_DIR, else the run directory
(WANDB_MODE=offline: nothing leaves the machine; `wandb sync` uploads later).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPORT_TO = ("none", "tensorboard", "wandb")
STATE = "report.json"
_INSTALL = {"tensorboard": "pip install tensorboard (or pip install 'kdcache[tensorboard]')",
            "wandb": "pip install wandb (or pip install 'kdcache[wandb]')"}


def parse_report_to(value: Any) -> list[str]:
    """`none`, `tensorboard`, `wandb` or a comma-separated list of them -> the trackers
    (without `none`); one clear error for anything else."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise ValueError(f"--report-to {bad[0]!r}: use none, tensorboard, wandb or a comma-separated "
                         "list of them (e.g. --report-to tensorboard,wandb)")
    if "none" in names and len(set(names)) > 1:
        raise ValueError(f"--report-to {','.join(names)}: 'none' cannot be combined with a tracker")
    return list(dict.fromkeys(n for n in names if n != "none"))


def _need(name: str) -> None:
    """Import the tracker's package or fail with one line that says what to install."""
    try:
        if name == "wandb":
            import wandb  # noqa: F401
        else:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError(f"--report-to {name} needs the {name} package: {_INSTALL[name]}") from None


def check_available(names: list[str]) -> None:
    """Up front, before a model loads: every tracker asked for is installed."""
    for n in names:
        _need(n)


def provenance(store: Any) -> dict[str, Any]:
    """The store's key and where its signals came from (StoreMeta), for the trackers."""
    m = store.manifest
    return {"url": str(store.url), "key": m.get("store_key"), "checksum": m.get("checksum"),
            "schema_version": m.get("schema_version"), "records": len(store),
            "tokens": int(store.num_tokens), "meta": store.meta.to_dict()}


class Reporter:
    """The trackers of one run: `log(row)` per metrics row, `close()` at the end. `config`
    maps a section name ("train", "store", "eval") to what is logged as the run's config."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any],
                 run_name: str | None = None, project: str | None = None,
                 job: str = "train", fresh: bool = False) -> None:
        self.names, self.out = names, Path(out)
        self._tb = self._wandb = None
        check_available(names)
        state = {} if fresh else _read_state(self.out)  # fresh: a new run in a used --out
        saved = state.get("wandb") or {}
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
            for section, value in config.items():
                self._tb.add_text(section, "```\n" + json.dumps(value, indent=1, default=str)
                                  + "\n```")
        if "wandb" in names:
            import wandb

            run_id = saved.get("id") if isinstance(saved.get("id"), str) else None
            self._wandb = wandb.init(
                project=(project or saved.get("project") or os.environ.get("WANDB_PROJECT")
                         or "kdcache"),
                name=run_name or saved.get("name") or self.out.name, id=run_id,
                resume="allow" if run_id else None, job_type=job,
                dir=os.environ.get("WANDB_DIR") or str(self.out), config=config,
                reinit="finish_previous")
            # metrics.jsonl's `step` is the x axis of every train/ and eval/ curve
            self._wandb.define_metric("train/step")
            self._wandb.define_metric("train/*", step_metric="train/step")
            self._wandb.define_metric("eval/*", step_metric="train/step")
            store = config.get("store") or {}
            if store.get("key"):
                self._wandb.summary["store_key"] = store["key"]
            saved = {"id": self._wandb.id, "project": self._wandb.project,
                     "name": self._wandb.name}
        names_all = sorted(set(state.get("report_to", [])) | set(names))
        _write_state(self.out, {"report_to": names_all, **({"wandb": saved} if saved else {})})

    def log(self, row: dict[str, Any], prefix: str = "train") -> None:
        step = int(row.get("step", 0))
        nums = {f"{prefix}/{k}": float(v) for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({"train/step": step, **nums})
            if prefix == "eval":
                self._wandb.summary.update(nums)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def open_reporter(names: list[str], out: Path, config: dict[str, Any], store: Any,
                  resuming: bool, run_name: str | None = None, project: str | None = None
                  ) -> Reporter | None:
    """The training run's trackers (None when --report-to none); a resumed run continues
    the W&B run it started, a run started over (--no-resume, a new run) gets a new one."""
    if not names:
        return None
    return Reporter(names, out, {"train": config, "store": provenance(store)}, run_name, project,
                    fresh=not resuming)


def report_eval(names: list[str] | None, run: Path, result: dict[str, Any],
                config: dict[str, Any]) -> list[str]:
    """Add eval results to the run's trackers: `names` (eval --report-to), else those the
    training run in `run` used (its report.json). Logged at the run's last step under eval/.
    Returns the trackers written to."""
    if names is None:  # the training run's trackers (report.json is checked like any input)
        try:
            names = parse_report_to(_read_state(run).get("report_to", []))
        except ValueError:
            names = []
    if not names:
        return []
    rep = Reporter(names, run, {"eval": config}, job="eval")
    try:
        rep.log({"step": _last_step(run), **result}, prefix="eval")
    finally:
        rep.close()
    return names


def _last_step(run: Path) -> int:
    try:
        with (run / "metrics.jsonl").open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return int(rows[-1]["step"]) if rows else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _read_state(out: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(out) / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(out: Path, state: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, out / STATE)
