"""Multi-stage recipes (ADPA+, TGPO rounds, PBSD), callable from Python and run by
`kdcache pipeline ...`.

Each recipe is a small function over `Stages`, which chains the public stage APIs
(`run_precompute`, `run_rollout`, `train`) with shared defaults. Every intermediate store is
content-addressed under `<out>/stores`, so unchanged inputs are never recomputed, and every
training run resumes (or is skipped when finished) in `<out>/runs/<name>`. This is the one
module besides the demo that imports both `kdcache.precompute` and `kdcache.train`.

Progress goes to stderr: one `[n/k] stage` line per stage when a run is given its stage
count (the `run_*` entry points do), as the demo does.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any


def announce(line: str) -> None:
    """A stage line on stderr (stdout carries only a command's result)."""
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class DataInput:
    """A stage's data input: `data` read with the stage commands' --data-config, --split and
    --columns. None (or "") is their default, so an input given as a plain string builds the
    same stage config, and so the same store key, as before these options existed."""

    data: str
    config: str | None = None
    split: str | None = None
    columns: str | None = None
    flags: str = dataclasses.field(default="", compare=False)  # the options behind it, for errors

    def __post_init__(self) -> None:
        for name in ("config", "split", "columns"):  # "" (an unset CLI string) is unset
            object.__setattr__(self, name, getattr(self, name) or None)

    @classmethod
    def of(cls, data: str | DataInput) -> DataInput:
        return data if isinstance(data, DataInput) else cls(str(data))

    def stage_kw(self) -> dict[str, Any]:
        """The PrecomputeConfig / RolloutConfig fields that read this input."""
        return {"data": self.data, "data_config": self.config, "split": self.split,
                "columns": self.columns}

    def check(self) -> None:
        """Before any stage runs (a stage would find out only after the ones before it, e.g.
        the rollout prompts after DCKD's training): the config and split exist, --columns
        parses and names columns that the first row has. A ValueError naming the options."""
        from kdcache.precompute import check_input

        try:
            check_input(self.data, self.config, self.split, self.columns)
        except ValueError as e:
            raise ValueError(f"{self.flags}: {e}" if self.flags else str(e)) from None

    def __str__(self) -> str:
        how = [f"{k} {v}" for k, v in (("config", self.config), ("split", self.split),
                                        ("columns", self.columns)) if v]
        return self.data + (f" ({', '.join(how)})" if how else "")


def _described(kw: dict) -> str:
    """A stage line's name for its input: the store(s) it reads, or its data and options."""
    if kw.get("input_store") or not kw.get("data"):
        return str(kw.get("input_store"))
    return str(DataInput(kw["data"], kw.get("data_config"), kw.get("split"), kw.get("columns")))


class Stages:
    """Chains the stages through their public APIs with shared defaults; every intermediate
    store is content-addressed under `store_root`, so unchanged inputs are never recomputed,
    and every training run resumes (or is skipped when finished) in `runs/<name>`.

    With `stages=k`, each stage announces itself as `[n/k] ...` on stderr."""

    def __init__(self, out: Path, seed: int = 0, precompute: dict | None = None,
                 rollout: dict | None = None, train: dict | None = None,
                 stages: int | None = None) -> None:
        self.out, self.seed = Path(out), seed
        self.store_root = str(self.out / "stores")
        self.defaults = {"precompute": precompute or {}, "rollout": rollout or {}, "train": train or {}}
        self.timings: dict[str, float] = {}
        self.stages, self.done = stages, 0

    def _stage(self, what: str) -> None:
        if self.stages:
            self.done += 1
            announce(f"[{self.done}/{self.stages}] {what}")

    def precompute(self, **kw) -> str:
        from kdcache.precompute import PrecomputeConfig, run_precompute

        scorers = [f"{role} {kw[role]}" for role in ("teacher", "reference") if kw.get(role)]
        self._stage(f"precompute {_described(kw)}" + (f" ({', '.join(scorers)})" if scorers else ""))
        base = {"out_root": self.store_root, **self.defaults["precompute"]}
        return run_precompute(PrecomputeConfig(**{**base, **kw}))

    def rollout(self, **kw) -> str:
        from kdcache.precompute.rollout import RolloutConfig, run_rollout
        self._stage(f"rollout {kw.get('n', 1)} per prompt of {_described(kw)} from {kw.get('model')}")
        base = {"out_root": self.store_root, "seed": self.seed, **self.defaults["rollout"]}
        return run_rollout(RolloutConfig(**{**base, **kw}))

    def train(self, name: str, model: str, store: str | list[str], objective: str, steps: int, **kw) -> str:
        from kdcache.train.config import TrainConfig
        from kdcache.train.trainer import train

        run = self.out / "runs" / name
        self._stage(f"train {objective} {steps} steps from {model} -> {run}")
        cfg = TrainConfig(**{"seed": self.seed, **self.defaults["train"], "model": str(model),
                             "store": store, "out": str(run), "objective": objective,
                             "max_steps": steps, **kw})
        # the run's own training time (summed over resumes), so a cached re-run reports it too
        self.timings[name] = train(cfg).seconds
        return str(run / "model")


# --------------------------------------------------------------------------- the recipes
def adpa_plus(st: Stages, student: str, teacher: str, reference: str, pref_data: str | DataInput,
              prompts_data: str | DataInput, dckd_steps: int, adpa_steps: int, n: int = 2,
              dckd: dict | None = None, adpa: dict | None = None, name: str = "adpa+") -> tuple[str, list[str]]:
    """ADPA+ (seed 001, Algorithm 2): DCKD, rollouts from the DCKD student, precompute on
    them, then ADPA from the DCKD student. Returns the model and the stores it used."""
    pref = st.precompute(**DataInput.of(pref_data).stage_kw(), teacher=teacher, reference=reference)
    dckd_model = st.train("dckd", student, pref, "dckd", dckd_steps, **(dckd or {}))
    return adpa_from(st, dckd_model, teacher, reference, prompts_data, adpa_steps, n, adpa, name)


def adpa_from(st: Stages, start: str, teacher: str, reference: str, prompts_data: str | DataInput, steps: int,
              n: int = 2, adpa: dict | None = None, name: str = "adpa") -> tuple[str, list[str]]:
    """ADPA on the student's own rollouts (with the preferred response for its SFT term)."""
    roll = st.rollout(model=start, **DataInput.of(prompts_data).stage_kw(), n=n, include_chosen=True)
    scored = st.precompute(input_store=roll, teacher=teacher, reference=reference)
    return st.train(name, start, scored, "adpa", steps, **(adpa or {})), [roll, scored]


def tgpo_rounds(st: Stages, student: str, teacher: str, prompts_data: str | DataInput, reward, steps: int,
                rounds: int = 1, n: int = 4, train_kw: dict | None = None,
                name: str = "tgpo") -> tuple[str, list[str]]:
    """TGPO offline rounds: rollout (with rewards) -> precompute the teacher's top-K ->
    train `steps` -> regenerate from the new student. The guidance weight's schedule runs
    on across rounds."""
    model, stores = student, []
    for r in range(rounds):
        roll = st.rollout(model=model, **DataInput.of(prompts_data).stage_kw(), n=n, reward=reward)
        scored = st.precompute(input_store=roll, teacher=teacher, reference=None)
        stores += [roll, scored]
        run = name if rounds == 1 else f"{name}-round{r}"
        model = st.train(run, model, scored, "tgpo", steps, tgpo_step_offset=r * steps, **(train_kw or {}))
    return model, stores


def pbsd(st: Stages, student: str, prompts_data: str | DataInput, steps: int, n: int = 1,
         train_kw: dict | None = None, name: str = "pbsd") -> tuple[str, list[str]]:
    """PBSD (seed 003): the initial student, given privileged context c (the data's
    `context` column), is the fixed teacher. y+ is sampled WITH c, y- without; the teacher
    (with c) scores both; the student (without c) trains on the pair."""
    prompts = DataInput.of(prompts_data).stage_kw()
    pos = st.rollout(model=student, **prompts, n=n, role="teacher_rollout", use_context=True)
    neg = st.rollout(model=student, **prompts, n=n, role="student_rollout", use_context=True)
    scored = st.precompute(input_store=f"{pos},{neg}", teacher=student, reference=None)
    return st.train(name, student, scored, "pbsd", steps, **(train_kw or {})), [pos, neg, scored]


# --------------------------------------------------------------------------- entry points
@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """The options every pipeline takes (`kdcache pipeline NAME` declares them once)."""

    out: Path
    n: int
    lr: float
    batch_groups: int
    max_new_tokens: int
    seed: int = 0
    backend: str = "hf"

    def stages(self, count: int, precompute: dict | None = None) -> Stages:
        return Stages(self.out, self.seed, precompute=precompute,
                      rollout={"max_new_tokens": self.max_new_tokens, "backend": self.backend},
                      train={"lr": self.lr, "batch_groups": self.batch_groups}, stages=count)


def run_adpa_plus(opts: PipelineOptions, student: str, teacher: str, reference: str, data: str,
                  prompts: str = "", dckd_steps: int = 1000, adpa_steps: int = 1000, k: int = 50,
                  dckd_alpha: float = 0.2, adpa_gamma: float = 3.0, data_config: str | None = None,
                  split: str | None = None, columns: str | None = None,
                  prompts_config: str | None = None, prompts_split: str | None = None,
                  prompts_columns: str | None = None) -> str:
    """DCKD -> rollouts -> precompute -> ADPA (ADPA+); returns the final model's directory.

    `data_config`/`split`/`columns` read `data` (the preference pairs); `prompts_*` read the
    rollout prompts. Without `prompts`, the prompts are `data`, and each unset `prompts_*`
    is its `data` counterpart (the same dataset, read the same way, unless told otherwise,
    e.g. another split); with `prompts`, another dataset, an unset `prompts_*` is the
    stage's default, never the `data` one."""
    pref = DataInput(data, data_config, split, columns,
                     flags="the preference data (--data, --data-config, --split, --columns)")
    rest = "--prompts-config, --prompts-split, --prompts-columns"
    if prompts:
        roll = DataInput(prompts, prompts_config, prompts_split, prompts_columns,
                         flags=f"the rollout prompts (--prompts, {rest})")
    else:
        roll = DataInput(data, prompts_config or data_config, prompts_split or split,
                         prompts_columns or columns,
                         flags=f"the rollout prompts (--data, {rest} or else --data-config, --split, --columns)")
    pref.check()
    if roll != pref:
        roll.check()
    st = opts.stages(5, precompute={"k": k})
    model, _ = adpa_plus(st, student, teacher, reference, pref, roll, dckd_steps,
                         adpa_steps, opts.n, {"dckd_alpha": dckd_alpha}, {"adpa_gamma": adpa_gamma})
    return model


def run_tgpo(opts: PipelineOptions, student: str, teacher: str, prompts: str, reward,
             rounds: int = 1, steps: int = 200, k: int = 50, shaping: bool = False,
             data_config: str | None = None, split: str | None = None,
             columns: str | None = None) -> str:
    """TGPO in offline rounds; returns the final model's directory. `data_config`/`split`/
    `columns` read `prompts` (every round's rollouts)."""
    data = DataInput(prompts, data_config, split, columns,
                     flags="the prompts (--prompts, --data-config, --split, --columns)")
    data.check()
    st = opts.stages(3 * rounds, precompute={"k": k})
    model, _ = tgpo_rounds(st, student, teacher, data, reward, steps, rounds, opts.n,
                           {"tgpo_shaping": shaping})
    return model


def run_pbsd(opts: PipelineOptions, student: str, prompts: str, steps: int = 500,
             beta: float = 0.1, data_config: str | None = None, split: str | None = None,
             columns: str | None = None) -> str:
    """PBSD from the initial student; returns the final model's directory. `data_config`/
    `split`/`columns` read `prompts` (both rollouts: with and without the context)."""
    data = DataInput(prompts, data_config, split, columns,
                     flags="the prompts (--prompts, --data-config, --split, --columns)")
    data.check()
    model, _ = pbsd(opts.stages(4), student, data, steps, opts.n, {"pbsd_beta": beta})
    return model
