"""`kdcache` command line. Commands whose options are a config dataclass (precompute,
rollout, train, eval) get one flag per field, generated from the dataclass, so a YAML
config file, the dataclass and the flags never drift apart: `--config FILE` loads the file
and any flag given on the command line overrides it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import typer
import yaml

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Precompute teacher signals once; train small students from them on a small GPU.",
)
store_app = typer.Typer(no_args_is_help=True, help="Manage stores: ls, verify, gc, merge.")
app.add_typer(store_app, name="store")


# --------------------------------------------------------------------------- config plumbing
def _flag_type(tp):
    """The typer-facing type of a dataclass field: Optional[X] -> X, lists/tuples -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple) or tp in (list, tuple):
        return str  # comma-separated on the command line
    if tp in (str, int, float, bool):
        return tp
    return str


def _coerce(tp, value):
    """Parse a command-line string for list/tuple fields (`1,2` or `i/N` partitions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value) if len(args) == 1 else value
    if origin is list and isinstance(value, str):
        (item,) = typing.get_args(tp) or (str,)
        return [item(v.strip()) for v in value.split(",") if v.strip()]
    if origin is tuple and isinstance(value, str):
        parts = value.replace("/", ",").split(",")
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise typer.BadParameter(f"expected i/N, got {value!r}") from None
    return value


def config_command(name: str, cls, run: Callable, help: str, extra: dict | None = None):
    """Register `kdcache NAME` with one --flag per field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                default=typer.Option(None, "--config", "-c", help="YAML file of these options"))]
    for f in dataclasses.fields(cls):
        tp = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{f.name.replace('_', '-')}" if tp is bool else flag
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp | None,
                                        default=typer.Option(None, decl, show_default=False)))

    def command(**kwargs):
        path = kwargs.pop("config")
        values = yaml.safe_load(path.read_text()) if path else {}
        if values is not None and not isinstance(values, dict):
            raise typer.BadParameter(f"{path}: expected a YAML mapping of {cls.__name__} fields")
        values = values or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise typer.BadParameter(f"{path}: unknown keys {unknown}; valid: {sorted(known)}")
        values.update({k: _coerce(hints[k], v) for k, v in kwargs.items() if v is not None})
        values = {k: _coerce(hints[k], v) for k, v in values.items()}
        try:
            cfg = cls(**values)
        except TypeError as e:
            raise typer.BadParameter(f"{e}: see `kdcache {name} --help`") from None
        _friendly(run, cfg)

    command.__signature__ = inspect.Signature(params)
    command.__name__ = name.replace("-", "_")
    command.__doc__ = help
    app.command(name, help=help)(command)


def _friendly(fn: Callable, *args):
    """Run fn; user errors (bad input, missing files) print one clear line, not a traceback."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError) as e:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- stage commands
def _precompute(cfg) -> None:
    from kdcache.precompute.run import run_precompute

    typer.echo(run_precompute(cfg))


def _rollout(cfg) -> None:
    from kdcache.precompute.rollout import run_rollout
    from kdcache.train.rewards import resolve_reward

    if isinstance(cfg.reward, str):  # built-in names and module:function, resolved in one place
        cfg = dataclasses.replace(cfg, reward=resolve_reward(cfg.reward))
    typer.echo(run_rollout(cfg))


def _train(cfg) -> None:
    from kdcache.train.trainer import train

    res = train(cfg)
    typer.echo(f"{res.steps} steps, {res.tokens} tokens, {res.seconds:.1f}s, "
               f"final loss {res.final_loss:.4f} -> {res.out}/model")


def _eval(cfg) -> None:
    from kdcache.train.eval import evaluate

    _echo_json(evaluate(cfg))


def _register() -> None:
    from kdcache.precompute.rollout import RolloutConfig
    from kdcache.precompute.run import PrecomputeConfig
    from kdcache.train.config import TrainConfig
    from kdcache.train.eval import EvalConfig

    config_command("precompute", PrecomputeConfig, _precompute,
                   "Score a dataset or a rollout store with the DPO teacher and its reference; write a store.")
    config_command("rollout", RolloutConfig, _rollout,
                   "Sample N responses per prompt with behavior log-probs (and rewards); write a store.")
    config_command("train", TrainConfig, _train,
                   "Train a student from a store (sft, seqkd, kd, dckd, adpa, tvkd, dpo, tgpo, pbsd).")
    config_command("eval", EvalConfig, _eval,
                   "Reward accuracy, top-K KL to the teacher and a rule reward on an eval store.")


_register()


@app.command()
def inspect_(url: str = typer.Argument(..., help="store URL or path"),
             as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Manifest summary, sequences and tokens, bytes/token per field, top-K mass."""
    from kdcache.store import open_store, summarize

    summary = _friendly(lambda: summarize(open_store(url)))
    if as_json:
        _echo_json(summary)
        return
    from kdcache.store.summary import format_summary

    typer.echo(format_summary(summary))


app.registered_commands[-1].name = "inspect"


@store_app.command("ls")
def store_ls(root: str = typer.Argument(..., help="directory or URL holding stores")) -> None:
    """Stores under ROOT with their provenance."""
    from kdcache.store.admin import list_stores

    for row in _friendly(list_stores, root):
        typer.echo(json.dumps(row, default=str))


@store_app.command("verify")
def store_verify(url: str, repair: bool = typer.Option(
        False, "--repair", help="drop the first damaged shard and all later ones from the "
        "manifest, so re-running the command that wrote the store rewrites them")) -> None:
    """Check every file's sha256 and the manifest; exit 1 and name shard and file on damage."""
    from kdcache.store.verify import repair as repair_store
    from kdcache.store.verify import verify

    if repair:
        res = _friendly(repair_store, url)
        for p in res["problems"]:
            typer.secho(str(p), fg=typer.colors.RED, err=True)
        _echo_json({k: v for k, v in res.items() if k != "problems"})
        return
    problems = _friendly(verify, url)
    for p in problems:
        typer.secho(str(p), fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    typer.echo("ok")


@store_app.command("gc")
def store_gc(root: str, dry_run: bool = typer.Option(False, "--dry-run"),
             min_age: float = typer.Option(
                 3600.0, "--min-age", help="remove unreferenced files only when at least this "
                 "many seconds old (a live writer's next shard is unreferenced until it "
                 "commits); temp files of dead writers go at any age")) -> None:
    """Remove shards no manifest references and uncommitted temporary files."""
    from kdcache.store.admin import gc

    _echo_json(_friendly(lambda: gc(root, min_age_s=min_age, dry_run=dry_run)))


@store_app.command("merge")
def store_merge(out: str, parts: list[str]) -> None:
    """Merge partition stores (same meta) into OUT: equal to one run over all partitions."""
    from kdcache.store.admin import merge

    typer.echo(_friendly(merge, parts, out))


@app.command()
def plot(run_dirs: list[Path] = typer.Argument(..., help="training output directories"),
         out: Path = typer.Option(Path("plot.png"), "--out", "-o"),
         table: Path | None = typer.Option(None, "--table", help="a demo results.json to draw as a table")) -> None:
    """Loss curves of training runs (metrics.jsonl), and optionally the eval table."""
    from kdcache.train.plot import plot_runs

    typer.echo(_friendly(plot_runs, run_dirs, out, table))


@app.command()
def demo(out: Path = typer.Option(Path("kdcache-demo"), "--out", "-o", help="artefact directory"),
         quick: bool = typer.Option(False, "--quick", help="a smaller run (CI smoke test)"),
         methods: str = typer.Option("", help="comma-separated subset of the table rows"),
         seed: int = typer.Option(0)) -> None:
    """Train a tiny teacher (SFT, then DPO), precompute its signals, distil students with
    every method, and print the table: rule preference rate, reward accuracy, time, store size."""
    _friendly(run_demo, out, quick, [m for m in methods.split(",") if m], seed)


# --------------------------------------------------------------------------- the demo
DEMO_METHODS = ("sft", "seqkd", "dckd", "adpa", "adpa-code", "adpa+", "tvkd", "dpo", "tgpo", "pbsd")
# Sequence-margin objectives (DPO, TVKD, PBSD) are run at a lower learning rate than the
# token-level ones, as is customary: at 1e-3 they push y_l's likelihood down without bound.
PREF_LR = 2e-4


def _dir_bytes(url: str) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return sum(fs.du(root, total=False).values()) if fs.exists(root) else 0


class Stages:
    """Chains the stages through their public APIs with shared defaults; every intermediate
    store is content-addressed under `store_root`, so unchanged inputs are never recomputed,
    and every training run resumes (or is skipped when finished) in `runs/<name>`."""

    def __init__(self, out: Path, seed: int = 0, precompute: dict | None = None,
                 rollout: dict | None = None, train: dict | None = None) -> None:
        self.out, self.seed = Path(out), seed
        self.store_root = str(self.out / "stores")
        self.defaults = {"precompute": precompute or {}, "rollout": rollout or {}, "train": train or {}}
        self.timings: dict[str, float] = {}

    def precompute(self, **kw) -> str:
        from kdcache.precompute.run import PrecomputeConfig, run_precompute

        base = {"out_root": self.store_root, **self.defaults["precompute"]}
        return run_precompute(PrecomputeConfig(**{**base, **kw}))

    def rollout(self, **kw) -> str:
        from kdcache.precompute.rollout import RolloutConfig, run_rollout
        from kdcache.train.rewards import resolve_reward

        if isinstance(kw.get("reward"), str):
            kw["reward"] = resolve_reward(kw["reward"])
        base = {"out_root": self.store_root, "seed": self.seed, **self.defaults["rollout"]}
        return run_rollout(RolloutConfig(**{**base, **kw}))

    def train(self, name: str, model: str, store: str, objective: str, steps: int, **kw) -> str:

        from kdcache.train.config import TrainConfig
        from kdcache.train.trainer import train

        run = self.out / "runs" / name
        cfg = TrainConfig(**{"seed": self.seed, **self.defaults["train"], "model": str(model),
                             "store": store, "out": str(run), "objective": objective,
                             "max_steps": steps, **kw})
        # the run's own training time (summed over resumes), so a cached re-run reports it too
        self.timings[name] = train(cfg).seconds
        return str(run / "model")


def adpa_plus(st: Stages, student: str, teacher: str, reference: str, pref_data: str,
              prompts_data: str, dckd_steps: int, adpa_steps: int, n: int = 2,
              dckd: dict | None = None, adpa: dict | None = None, name: str = "adpa+") -> tuple[str, list[str]]:
    """ADPA+ (seed 001, Algorithm 2): DCKD, rollouts from the DCKD student, precompute on
    them, then ADPA from the DCKD student. Returns the model and the stores it used."""
    pref = st.precompute(data=pref_data, teacher=teacher, reference=reference)
    dckd_model = st.train("dckd", student, pref, "dckd", dckd_steps, **(dckd or {}))
    return adpa_from(st, dckd_model, teacher, reference, prompts_data, adpa_steps, n, adpa, name)


def adpa_from(st: Stages, start: str, teacher: str, reference: str, prompts_data: str, steps: int,
              n: int = 2, adpa: dict | None = None, name: str = "adpa") -> tuple[str, list[str]]:
    """ADPA on the student's own rollouts (with the preferred response for its SFT term)."""
    roll = st.rollout(model=start, data=prompts_data, n=n, include_chosen=True)
    scored = st.precompute(input_store=roll, teacher=teacher, reference=reference)
    return st.train(name, start, scored, "adpa", steps, **(adpa or {})), [roll, scored]


def tgpo_rounds(st: Stages, student: str, teacher: str, prompts_data: str, reward, steps: int,
                rounds: int = 1, n: int = 4, train_kw: dict | None = None,
                name: str = "tgpo") -> tuple[str, list[str]]:
    """TGPO offline rounds: rollout (with rewards) -> precompute the teacher's top-K ->
    train `steps` -> regenerate from the new student. The guidance weight's schedule runs
    on across rounds."""
    model, stores = student, []
    for r in range(rounds):
        roll = st.rollout(model=model, data=prompts_data, n=n, reward=reward)
        scored = st.precompute(input_store=roll, teacher=teacher, reference=None)
        stores += [roll, scored]
        run = name if rounds == 1 else f"{name}-round{r}"
        model = st.train(run, model, scored, "tgpo", steps, tgpo_step_offset=r * steps, **(train_kw or {}))
    return model, stores


def pbsd(st: Stages, student: str, prompts_data: str, steps: int, n: int = 1,
         train_kw: dict | None = None, name: str = "pbsd") -> tuple[str, list[str]]:
    """PBSD (seed 003): the initial student, given privileged context c (the data's
    `context` column), is the fixed teacher. y+ is sampled WITH c, y- without; the teacher
    (with c) scores both; the student (without c) trains on the pair."""
    pos = st.rollout(model=student, data=prompts_data, n=n, role="teacher_rollout", use_context=True)
    neg = st.rollout(model=student, data=prompts_data, n=n, role="student_rollout", use_context=True)
    scored = st.precompute(input_store=f"{pos},{neg}", teacher=student, reference=None)
    return st.train(name, student, scored, "pbsd", steps, **(train_kw or {})), [pos, neg, scored]


pipeline_app = typer.Typer(no_args_is_help=True, help="Multi-stage recipes, one command each.")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("adpa-plus")
def pipeline_adpa_plus(
    student: str = typer.Option(..., help="SFT'd student model dir"),
    teacher: str = typer.Option(..., help="DPO teacher model dir"),
    reference: str = typer.Option(..., help="the teacher's pre-DPO reference model dir"),
    data: str = typer.Option(..., help="preference data (prompt, chosen, rejected)"),
    prompts: str = typer.Option("", help="prompts for rollouts (default: --data)"),
    out: Path = typer.Option(Path("runs/adpa-plus")),
    dckd_steps: int = typer.Option(1000), adpa_steps: int = typer.Option(1000),
    n: int = typer.Option(2, help="rollouts per prompt"),
    k: int = typer.Option(50), dckd_alpha: float = typer.Option(0.2), adpa_gamma: float = typer.Option(3.0),
    lr: float = typer.Option(1e-5), batch_groups: int = typer.Option(8),
    max_new_tokens: int = typer.Option(256), seed: int = typer.Option(0),
) -> None:
    """DCKD -> rollouts -> precompute -> ADPA, one command (ADPA+)."""
    st = Stages(out, seed, precompute={"k": k}, rollout={"max_new_tokens": max_new_tokens},
                train={"lr": lr, "batch_groups": batch_groups})
    model, _ = _friendly(adpa_plus, st, student, teacher, reference, data, prompts or data,
                         dckd_steps, adpa_steps, n, {"dckd_alpha": dckd_alpha}, {"adpa_gamma": adpa_gamma})
    typer.echo(model)


@pipeline_app.command("tgpo")
def pipeline_tgpo(
    student: str = typer.Option(...), teacher: str = typer.Option(...),
    prompts: str = typer.Option(..., help="prompts (+ answer column for numeric rewards)"),
    reward: str = typer.Option(..., help="module:function, or built in: numeric_exact_match, sort_rule"),
    out: Path = typer.Option(Path("runs/tgpo")),
    rounds: int = typer.Option(1), steps: int = typer.Option(200, help="train steps per round"),
    n: int = typer.Option(8, help="rollouts per prompt (the GRPO group)"),
    k: int = typer.Option(50), shaping: bool = typer.Option(False, help="TGPO_R reward shaping"),
    lr: float = typer.Option(1e-6), batch_groups: int = typer.Option(4),
    max_new_tokens: int = typer.Option(512), seed: int = typer.Option(0),
) -> None:
    """TGPO in offline rounds: rollout -> reward -> precompute -> train N steps -> repeat."""
    st = Stages(out, seed, precompute={"k": k}, rollout={"max_new_tokens": max_new_tokens},
                train={"lr": lr, "batch_groups": batch_groups})
    model, _ = _friendly(tgpo_rounds, st, student, teacher, prompts, reward, steps, rounds, n,
                         {"tgpo_shaping": shaping})
    typer.echo(model)


@pipeline_app.command("pbsd")
def pipeline_pbsd(
    student: str = typer.Option(..., help="the initial student (also the teacher, given context)"),
    prompts: str = typer.Option(..., help="prompts with a `context` column (privileged information)"),
    out: Path = typer.Option(Path("runs/pbsd")), steps: int = typer.Option(500),
    n: int = typer.Option(1), beta: float = typer.Option(0.1),
    lr: float = typer.Option(1e-5), batch_groups: int = typer.Option(8),
    max_new_tokens: int = typer.Option(256), seed: int = typer.Option(0),
) -> None:
    """PBSD: teacher-with-context samples y+, student samples y-, precompute, train."""
    st = Stages(out, seed, rollout={"max_new_tokens": max_new_tokens},
                train={"lr": lr, "batch_groups": batch_groups})
    model, _ = _friendly(pbsd, st, student, prompts, steps, n, {"pbsd_beta": beta})
    typer.echo(model)


class Demo(Stages):
    """The embedded default: every stage of the product on a tiny sorting task, on CPU.

    Teacher: SFT on a corpus where 30% of answers are sorted, then DPO (+ length-normalised
    NLL on y_w, as in RPO) on its own clean pairs (sorted vs near miss); the SFT model is its
    reference. Student: a smaller model, SFT'd on the same corpus, then trained by each
    method with the same step budget on the students' noisier preference set (chosen is only
    the better of two answers) and the teacher's precomputed signals. Everything goes
    through stores, exactly as on a real cluster.
    """

    def __init__(self, out: Path, quick: bool, seed: int) -> None:
        from kdcache.train.tasks import make_demo_data
        from kdcache.train.tiny import build_tokenizer

        self.k, self.betas = 16, [1.0, 2.0]
        super().__init__(
            out, seed,
            precompute={"k": self.k, "betas": self.betas, "progress": False, "codec": "compact",
                        "max_length": 64},
            rollout={"max_new_tokens": 12, "progress": False, "batch_prompts": 64},
            train={"progress": False, "batch_groups": 16, "lr": 1e-3},
        )
        self.quick = quick
        self.tok = build_tokenizer()
        n = (lambda full, small: small if quick else full)  # noqa: E731
        self.steps = {"teacher_sft": n(600, 120), "teacher_dpo": n(250, 40),
                      "student_sft": n(300, 60), "student": n(300, 30)}
        self.data = make_demo_data(out / "data", seed=seed, n_sft=n(4000, 800), n_pref=n(1500, 300),
                                   n_rollout_prompts=n(600, 120), n_eval=n(200, 60))

    def evaluate(self, model: str, eval_store: str) -> dict:
        from kdcache.train.eval import EvalConfig, evaluate

        return evaluate(EvalConfig(model=str(model), store=eval_store, reward="sort_rule",
                                   samples=4, max_new_tokens=12, seed=self.seed))


def run_demo(out: Path, quick: bool = False, methods: list[str] | None = None, seed: int = 0) -> dict:
    import time

    from kdcache.train.tiny import save_tiny

    unknown = sorted(set(methods or []) - set(DEMO_METHODS))
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}: choose from {', '.join(DEMO_METHODS)}")
    methods = list(methods or DEMO_METHODS)
    # the demo's models are tiny: one intra-op thread beats two that spend their time
    # synchronising (6x faster measured on a busy 2-core machine)
    import torch

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    d = Demo(out, quick, seed)
    typer.echo(f"kdcache demo -> {out}  ({'quick' if quick else 'full'} run)")

    typer.echo("[1/5] teacher: SFT from scratch, then DPO (reference = the SFT model)")
    t_init = save_tiny(out / "models" / "teacher-init", d.tok, hidden=128, layers=4, heads=4, seed=seed)
    sft_store = d.precompute(data=str(d.data["sft"]), teacher=None, tokenizer=str(t_init))
    ref = d.train("teacher-sft", t_init, sft_store, "sft", d.steps["teacher_sft"], batch_groups=64, lr=3e-3)
    dpo_store = d.precompute(data=str(d.data["teacher_pref"]), teacher=ref, reference=ref)
    teacher = d.train("teacher-dpo", ref, dpo_store, "dpo", d.steps["teacher_dpo"], batch_groups=32,
                      lr=5e-4, dpo_beta=0.1, dpo_nll=1.0)

    typer.echo("[2/5] student: SFT on the same corpus (every method starts here)")
    s_init = save_tiny(out / "models" / "student-init", d.tok, hidden=64, layers=2, heads=4, seed=seed + 1)
    student0 = d.train("student-sft-init", s_init, sft_store, "sft", d.steps["student_sft"], batch_groups=64, lr=3e-3)

    typer.echo("[3/5] precompute the teacher's signals once (top-K, reference, soft values)")
    pref = d.precompute(data=str(d.data["pref"]), teacher=teacher, reference=ref)
    evals = d.precompute(data=str(d.data["eval"]), teacher=teacher, reference=ref)

    typer.echo(f"[4/5] distil students: {', '.join(methods)}")
    steps = d.steps["student"]
    stores: dict[str, list[str]] = {}
    models: dict[str, str] = {}

    prompts = str(d.data["prompts"])
    for m in methods:
        if m == "sft":
            stores[m], models[m] = [pref], d.train(m, student0, pref, "sft", steps)
        elif m == "seqkd":
            roll = d.rollout(model=teacher, data=prompts, n=2, role="teacher_rollout")
            stores[m], models[m] = [roll], d.train(m, student0, roll, "seqkd", steps)
        elif m == "dckd":
            stores[m], models[m] = [pref], d.train(m, student0, pref, "dckd", steps, dckd_alpha=0.2)
        elif m == "adpa":
            models[m], stores[m] = adpa_from(d, student0, teacher, ref, prompts, steps, 2)
        elif m == "adpa-code":  # the authors' released code: adv clamped to [0, 1], token mean
            models[m], stores[m] = adpa_from(d, student0, teacher, ref, prompts, steps, 2,
                                             {"adpa_reference_code": True}, name=m)
        elif m == "adpa+":
            models[m], stores[m] = adpa_plus(d, student0, teacher, ref, str(d.data["pref"]), prompts,
                                             steps, steps, 2, {"dckd_alpha": 0.2})
            stores[m].insert(0, pref)
        elif m == "tvkd":
            stores[m], models[m] = [pref], d.train(m, student0, pref, "tvkd", steps, tvkd_beta=2.0,
                                                   tvkd_alpha=0.7, lr=PREF_LR)
        elif m == "dpo":
            own = d.precompute(data=str(d.data["pref"]), teacher=student0, reference=student0)
            stores[m], models[m] = [own], d.train(m, student0, own, "dpo", steps, dpo_beta=0.1, lr=PREF_LR)
        elif m == "tgpo":
            models[m], stores[m] = tgpo_rounds(d, student0, teacher, prompts, "sort_rule", steps, 1, 4)
        elif m == "pbsd":
            models[m], stores[m] = pbsd(d, student0, prompts, steps, 1, {"pbsd_beta": 0.1, "lr": PREF_LR})

    typer.echo("[5/5] evaluate on held-out pairs (rule-judged preference rate on samples)")
    rows = [{"method": "teacher (DPO)", **d.evaluate(teacher, evals), "train_s": d.timings["teacher-dpo"], "store_mb": None},
            {"method": "student init (SFT corpus)", **d.evaluate(student0, evals), "train_s": None, "store_mb": None}]
    for m in methods:
        # ADPA+ is a pipeline: its cost includes the DCKD stage it starts from
        train_s = d.timings[m] + (d.timings["dckd"] if m == "adpa+" else 0.0)
        rows.append({"method": m, **d.evaluate(models[m], evals), "train_s": train_s,
                     "store_mb": sum(_dir_bytes(u) for u in stores.get(m, [])) / 2**20})
    result = {"rows": rows, "seconds": time.perf_counter() - t_all, "quick": quick, "seed": seed,
              "steps": d.steps}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    typer.echo(_demo_table(rows))
    typer.echo(f"total {result['seconds']:.0f}s; results in {out / 'results.json'}; "
               f"`kdcache plot {out}/runs/* --table {out}/results.json` draws them")
    return result


def _demo_table(rows: list[dict]) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="kdcache demo: sort digits ascending (rule-judged)")
    for col in ("method", "pref rate", "ends </s>", "reward acc", "KL top-K", "train s", "store MB"):
        t.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        t.add_row(r["method"], fmt(r.get("reward_mean"), ".3f"), fmt(r.get("eos_rate"), ".3f"),
                  fmt(r.get("reward_accuracy"), ".3f"),
                  fmt(r.get("kl_topk"), ".3f"), fmt(r.get("train_s"), ".1f"), fmt(r.get("store_mb"), ".2f"))
    console = Console(record=True, width=100)
    with console.capture() as cap:
        console.print(t)
    return cap.get()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app(prog_name="kdcache")


if __name__ == "__main__":
    sys.exit(main())
