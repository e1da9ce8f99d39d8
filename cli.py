"""`kdcache` command line.

Commands whose options are a config dataclass (precompute, rollout, train, eval) get one
flag per field, generated from the dataclass and its fields' `metadata` (one-line help,
help panel, allowed values), so a YAML config file, the dataclass and the flags never drift
apart: `--config FILE` loads the file and any flag given on the command line overrides it.

Conventions every command keeps: stdout carries only the result (a URL, a path, a table,
JSON), so `url=$(kdcache precompute ...)` captures just the URL; progress and logs go to
stderr. Bad input ends in one `error: ...` line on stderr and exit code 2. Heavy modules
(torch, transformers) are imported only by the command that runs, so `kdcache --help`
starts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import os
import reprlib
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from kdcache import pipelines
from kdcache.precompute.checks import COLUMN_ROLES  # no torch: plain checks

ESSENTIALS = "Essentials"
# The config commands: where each one's dataclass lives and what it does. They are built
# only when invoked: precompute's config module imports torch and transformers.
CONFIG_COMMANDS = {
    "precompute": ("kdcache.precompute.config:PrecomputeConfig",
                   "Score a dataset or a rollout store with the DPO teacher and its reference; "
                   "write a store and print its URL."),
    "rollout": ("kdcache.precompute.config:RolloutConfig",
                "Sample N responses per prompt with behavior log-probs (and rewards); write a "
                "store and print its URL."),
    "train": ("kdcache.train.config:TrainConfig",
              "Train a student from a store (sft, seqkd, kd, dckd, adpa, tvkd, dpo, tgpo, pbsd); "
              "print the trained model's directory."),
    "eval": ("kdcache.train.eval:EvalConfig",
             "Reward accuracy, top-K KL to the teacher and a reward on samples, on an eval store; "
             "print them as JSON and save eval.json/eval.csv next to the run.\n\n"
             "reward_accuracy: the share of pairs whose chosen response has the higher mean token log-prob "
             "under the student. kl_topk: the KL from the teacher (renormalised over its stored top-K) to the "
             "student, nats per token. With --reward: reward_mean, the mean of fn(prompt_text, response_text, "
             "None) over samples (prompt_text: the prompt decoded without special tokens), and eos_rate, the "
             "share of samples that end with the tokenizer's EOS (eos_token)."),
}
# Values a config command takes below its --config file and flags: `kdcache train --recipe`.
CONFIG_LAYERS = {"train": "kdcache.train.recipe:with_recipe"}


def _keep_option_names() -> None:
    """typer draws each options panel as a table whose columns rich shrinks alike when the
    terminal is narrow, cutting option names (`--stochastic-roundi…` at 80 columns). Here
    the name and type columns never wrap or shrink; the help column (the last) takes the
    squeeze and folds long words instead of cutting them. (Patched where the panel is made,
    once, when a help is first drawn: rich is not imported otherwise.)"""
    from rich.table import Table
    from typer import rich_utils

    panel_cls = rich_utils.Panel
    if getattr(panel_cls, "_kdcache", False):
        return

    def panel(renderable, *args, **kwargs):
        if isinstance(renderable, Table) and renderable.columns:
            *names, helps = renderable.columns
            for c in names:
                c.no_wrap = True
            helps.overflow = "fold"
            for cell in helps._cells:  # typer's help texts (in Columns) carry their own overflow
                for text in getattr(cell, "renderables", [cell]):
                    if hasattr(text, "overflow"):
                        text.overflow = "fold"
        return panel_cls(renderable, *args, **kwargs)

    panel._kdcache = True
    rich_utils.Panel = panel


class _Command(TyperCommand):
    """A command whose `--help` shows the Essentials panel (where it has other panels too)
    and whose `--help-all` shows every option."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None and self._has_panels():  # into the first panel, not a panel of its own
            opt.rich_help_panel = ESSENTIALS
        return opt

    def _has_panels(self) -> bool:
        return any(getattr(p, "rich_help_panel", None) == ESSENTIALS for p in self.params)

    def format_help(self, ctx, formatter):
        _keep_option_names()
        if self.help:  # docstrings as prose: a single line break is a space, a blank line a paragraph
            self.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(self.help).split("\n\n"))
        if (ctx.meta.get("kdcache_help_all") or not self._has_panels()
                or not any(p.name == "help_all" for p in self.params)):  # nowhere else to list them
            return super().format_help(ctx, formatter)
        rest = [p for p in self.params if getattr(p, "rich_help_panel", None) != ESSENTIALS
                and not p.hidden and isinstance(p, click_option_types())]
        for p in rest:
            p.hidden = True
        epilog = self.epilog
        if rest:
            self.epilog = f"{len(rest)} more options: `{ctx.command_path} --help-all` lists them all."
        try:
            return super().format_help(ctx, formatter)
        finally:
            for p in rest:
                p.hidden = False
            self.epilog = epilog


def click_option_types() -> tuple[type, ...]:
    return (typer.core.TyperOption,)


def _show_all(ctx, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    ctx.meta["kdcache_help_all"] = True
    typer.echo(ctx.get_help())
    raise typer.Exit()


def help_all_option():
    """`--help-all` for a command with an Essentials panel (its `--help` shows only that)."""
    return typer.Option(False, "--help-all", is_eager=True, callback=_show_all,
                        rich_help_panel=ESSENTIALS, help="show every option, not only the Essentials, and exit")


def _essential(kind: Callable, *args, **kwargs):
    """typer.Option / typer.Argument listed in the Essentials panel."""
    return kind(*args, rich_help_panel=ESSENTIALS, **kwargs)


def _help_all_parameter() -> inspect.Parameter:
    return inspect.Parameter("help_all", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                             default=help_all_option())


class _Placeholder(TyperCommand):
    """Lists a config command in `kdcache --help` until the command itself is invoked."""


class _Group(TyperGroup):
    """Swaps a placeholder for the real config command when it is invoked (or asked for
    --help), so only that command's config module is imported."""

    def resolve_command(self, ctx, args):
        if args and isinstance(self.commands.get(args[0]), _Placeholder):
            self.commands[args[0]] = build_config_command(args[0])
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """A usage error (unknown option, unparsable value, unknown command) is one `error:`
        line on stderr with exit code 2, like every other bad input, not a boxed panel."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        except Exception as e:
            # click's exceptions (vendored by newer typer, so matched by their interface)
            if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
                raise
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `kdcache store`
                typer.echo(ctx.get_help(), err=True)
            elif ctx is not None:  # a usage error: say where the options are listed
                typer.echo(f"error: {e.format_message()} (see `{ctx.command_path} --help`)", err=True)
            else:
                typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Precompute teacher signals once; train small students from them on a small GPU.",
)
store_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                        help="Manage stores: ls, verify, gc, merge.")
app.add_typer(store_app, name="store")
_verbose = False


@app.callback()
def _options(verbose: bool = typer.Option(
        False, "--verbose", "-v",
        help="show transformers' warnings and progress bars, debug logs, and a traceback on errors")) -> None:
    global _verbose
    _verbose = verbose
    if verbose:
        logging.getLogger("kdcache").setLevel(logging.DEBUG)
        return
    # Quiet by default: only the CLI's own loads, and only through the environment read when
    # transformers / huggingface_hub are first imported; a Python user's setup is untouched.
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub|torch)(\.|$)")


# --------------------------------------------------------------------------- config plumbing
def option_help(f: dataclasses.Field) -> str:
    """A field's one-line help: its description, then its default (or `required`) and its
    allowed values, e.g. `loss to train with  [default: sft; one of: sft, seqkd, ...]`."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        tags = ["required"]
    else:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        tags = [f"default: {_show(default)}"]
    if f.metadata.get("choices"):
        tags.append("one of: " + ", ".join(map(str, f.metadata["choices"])))
    if _unsettable(f.type):
        tags.append("none: unset")
    return f"{f.metadata.get('help', '')}  [{'; '.join(tags)}]".strip()


def _unsettable(tp) -> bool:
    """An optional number: its flag takes `none` (as YAML takes `null`) to unset it."""
    if isinstance(tp, str):  # postponed annotations: `int | None`
        return tp.replace(" ", "") in ("int|None", "float|None", "Optional[int]", "Optional[float]")
    return type(None) in typing.get_args(tp) and _base_type(tp) in (int, float)


def _show(value) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or '""'
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    if isinstance(value, str):
        return value.encode("unicode_escape").decode() if value else '""'
    return str(value)


def _base_type(tp):
    """Optional[X] -> X; other unions (e.g. str | Callable) stay as they are."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _flag_type(tp):
    """The type click parses a field's flag as: lists and tuples are strings (`1,2`, `i/N`)."""
    tp = _base_type(tp)
    return tp if tp in (str, int, float, bool) else str


_LIST_FORMS = {float: "comma-separated numbers, e.g. 1,2", int: "comma-separated integers, e.g. 0,1"}


def _parse(where: str, tp, value, about: str = ""):
    """A flag's string or a YAML value -> the field's type; one clear error otherwise
    (`about`: the field's help, quoted where the expected form needs it)."""
    optional = type(None) in typing.get_args(tp)
    tp = _base_type(tp)
    if optional and tp in (int, float) and isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        value = None  # `--max-length none`, as YAML `max_length: null`
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: a value is required here")
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        form = _LIST_FORMS.get(item, "comma-separated values, no empty ones" + (f" ({about})" if about else ""))
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, int | float) and not isinstance(items, bool):
            items = [items]  # YAML `betas: 2`
        if not isinstance(items, list) or any(isinstance(v, str) and not v.strip() for v in items):
            raise ValueError(f"{where} {_clip(value)}: expected {form}")
        try:
            return [_scalar(item, v.strip() if isinstance(v, str) else v) for v in items]
        except (TypeError, ValueError):
            raise ValueError(f"{where} {_clip(value)}: expected {form}") from None
    if origin is tuple:  # (index, count) partitions
        parts = value.split("/") if isinstance(value, str) else value
        try:
            if not isinstance(parts, list | tuple) or len(parts) != 2:
                raise ValueError
            return tuple(_scalar(int, p.strip() if isinstance(p, str) else p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"{where} {_clip(value)}: expected i/N (this part, the number of parts), e.g. 0/4") from None
    if tp in (str, int, float, bool):
        try:
            return _scalar(tp, value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {_clip(value)}") from None
    return value  # e.g. a reward given as `module:function` or a callable


def _clip(value, limit: int = 80) -> str:
    """repr of a parsed value for an error message, cut to `limit` characters (a config's
    value may be large; it is never echoed whole)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _scalar(tp, v):
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise TypeError
    if isinstance(v, bool):
        raise TypeError  # YAML `true` is not a number
    if tp is str:
        if isinstance(v, str | int | float):
            return str(v)  # e.g. YAML `devices: [0, 1]`
        raise TypeError
    if tp is int and isinstance(v, float):
        raise TypeError
    return tp(v)  # int / float from numbers or command-line strings


def _read_config(path: Path, cls) -> dict:
    import stat

    import yaml

    from kdcache import plainyaml

    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device never end
            raise ValueError(f"--config {path}: not a regular file; pass the YAML config file")
        if st.st_size > plainyaml.MAX_BYTES:
            raise ValueError(f"--config {path}: larger than a config may be "
                             f"({plainyaml.MAX_BYTES} bytes); pass the YAML config file")
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:  # no aliases (billion laughs), bounded depth (RecursionError)
        values = plainyaml.load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"--config {path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a YAML mapping of {cls.__name__} fields "
                         f"(key: value), got a {type(values).__name__}")
    if hasattr(cls, "upgrade_keys"):  # keys of configs written by older versions
        values = cls.upgrade_keys(values, f"--config {path}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, values)) - set(known))
    if unknown:
        hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(k, known, 1))]
        raise ValueError(f"--config {path}: unknown keys {unknown}"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                         + "; the keys are the command's options with underscores, see --help")
    return values


def _refuse_memory(values: dict) -> None:
    for key, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v.startswith("memory://"):
                raise ValueError(
                    f"--{key.replace('_', '-')} {v}: a memory:// store lives only inside one Python "
                    f"process, so a one-shot command would hand out a URL to a store that is gone "
                    f"when it exits; use a local path, file://, s3:// or gs:// (memory:// is for "
                    f"the Python API)")


def make_config(name: str, cls, path: Path | None, flags: dict):
    """The config a command runs with: the file's values, then the flags given, parsed and
    checked (one clear error for anything malformed) before anything runs."""
    hints = typing.get_type_hints(cls)
    about = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    values = {k: _parse(f"--config {path}: {k}", hints[k], v, about[k])
              for k, v in (_read_config(path, cls) if path else {}).items()}
    flags = {k: v for k, v in flags.items() if v is not None}
    if hasattr(cls, "upgrade_keys"):  # a flag's old name (hidden from --help) -> today's
        flags = cls.upgrade_keys(flags, flags=True)
    values.update({k: _parse(f"--{k.replace('_', '-')}", hints[k], v, about[k]) for k, v in flags.items()})
    _refuse_memory(values)
    if name in CONFIG_LAYERS:  # values below the file and the flags (e.g. a training recipe)
        module, _, attr = CONFIG_LAYERS[name].partition(":")
        values = getattr(importlib.import_module(module), attr)(values, cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} "
                         f"(see `kdcache {name} --help`)")
    return cls(**values)


def config_command(name: str, cls, help: str) -> Callable:
    """The typer function of `kdcache NAME`: --config, then one --flag per field of `cls`
    (the Essentials panel first), running `RUNS[name](cfg)` and printing what it returns."""
    from rich.markup import escape

    hints = typing.get_type_hints(cls)
    params = [_help_all_parameter(),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                default=typer.Option(None, "--config", "-c", rich_help_panel=ESSENTIALS,
                                                     help="YAML file whose keys are these options "
                                                          "(underscored); flags override it"))]
    fields = dataclasses.fields(cls)
    # Essentials first; the other panels in the order their last field is declared (so a
    # panel of bookkeeping options declared at the end comes last)
    last = {f.metadata.get("panel"): i for i, f in enumerate(fields)}
    fields = sorted(fields, key=lambda f: -1 if f.metadata.get("panel") == ESSENTIALS else last[f.metadata.get("panel")])
    for f in fields:
        tp = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{f.name.replace('_', '-')}" if tp is bool else flag
        metavar = {list: "A,B", tuple: "I/N"}.get(typing.get_origin(_base_type(hints[f.name])))
        if _unsettable(hints[f.name]):  # a number or `none`: parsed by _parse, not click
            tp, metavar = str, f"<{_base_type(hints[f.name]).__name__}>"
        elif f.metadata.get("multiple"):  # `--store A --store B` (each may also be comma-separated)
            tp, metavar = list[str], "A"
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=tp | None,
                                        default=typer.Option(None, decl, show_default=False, metavar=metavar,
                                                             help=escape(option_help(f)),
                                                             rich_help_panel=f.metadata.get("panel"))))

    for old, new in getattr(cls, "RENAMED", {}).items():  # old names still parse, hidden from --help
        tp, flag = _flag_type(hints[new]), "--" + old.replace("_", "-")
        params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, annotation=tp | None, default=typer.Option(
            None, f"{flag}/--no-{old.replace('_', '-')}" if tp is bool else flag, hidden=True,
            help=f"deprecated: use --{new.replace('_', '-')}")))

    def command(**kwargs):
        kwargs.pop("help_all")  # handled by its callback
        path = kwargs.pop("config")
        for f in fields:  # a repeated flag arrives as a list: one comma-separated value, as in YAML
            if f.metadata.get("multiple"):
                kwargs[f.name] = ",".join(kwargs[f.name]) if kwargs[f.name] else None
        result = _friendly(lambda: RUNS[name](make_config(name, cls, path, kwargs)))
        if isinstance(result, Outcome):
            typer.echo(result.text)
            if result.exit_code:
                raise typer.Exit(result.exit_code)
        elif result is not None:
            typer.echo(result)

    command.__signature__ = inspect.Signature(params)
    command.__name__ = name
    command.__doc__ = help
    return command


def build_config_command(name: str):
    """The click command of config command NAME (imports its config module)."""
    spec, help = CONFIG_COMMANDS[name]
    module, _, attr = spec.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    sub = typer.Typer(add_completion=False, rich_markup_mode="rich")
    sub.command(name, help=help, cls=_Command)(config_command(name, cls, help))
    cmd = typer.main.get_command(sub)
    cmd.name = name
    return cmd


def _placeholder() -> None:  # never runs: _Group swaps in the real command first
    raise RuntimeError("config command placeholder invoked")


for _name, (_, _help) in CONFIG_COMMANDS.items():
    app.command(_name, help=_help, cls=_Placeholder, add_help_option=False)(_placeholder)


class Outcome(typing.NamedTuple):
    """A command's result with a non-zero exit code (e.g. `--estimate-memory --require-fit`
    that does not fit): the text still goes to stdout."""

    text: str
    exit_code: int = 0


def _friendly(fn: Callable, *args):
    """Run fn with its stdout sent to stderr (progress bars and stray prints stay out of the
    result the caller prints); user errors (bad input, missing files) print one line, not a
    traceback (-v shows the traceback)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return fn(*args)
    except (ValueError, OSError, RecursionError, MemoryError, RuntimeError) as e:
        # OSError: FileNotFoundError, PermissionError, ...; UnpicklingError and YAMLError are
        # matched by name (their modules load only with the commands that raise them)
        msg = _error_line(e)
        if _verbose or msg is None:
            raise
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        if _verbose or type(e).__name__ not in _INPUT_ERRORS:
            raise
        typer.secho(f"error: {_error_line(e)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


# a damaged or hostile pickle / YAML file (checkpoint, weights, config)
_INPUT_ERRORS = {"UnpicklingError": "a pickled file (checkpoint or weights) is damaged or holds "
                 "code, which is never run",
                 "ConstructorError": "a YAML file holds a Python object tag, which is never built",
                 "ComposerError": "a YAML file holds anchors, aliases or deep nesting"}
_MAX_ERROR_CHARS = 2000  # an error quotes input; a hostile input is not echoed whole


def _error_line(e: BaseException) -> str | None:
    """The one `error:` line for `e` (None: a bug, shown as a traceback), cut short."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    name = type(e).__name__
    if isinstance(e, RecursionError):
        msg = (f"an input is nested too deeply to read ({msg or name}): a manifest, config or "
               "checkpoint file is damaged or hostile; check stores with `kdcache store verify`, "
               "restore or delete the damaged file")
    elif isinstance(e, MemoryError):
        msg = (f"out of memory ({msg or name}): an input declares more than this machine holds "
               "(a damaged or hostile store or checkpoint, or too large a batch); check stores "
               "with `kdcache store verify`, or lower the batch/sequence settings")
    elif isinstance(e, RuntimeError) and not isinstance(e, NotImplementedError):
        low = msg.lower()
        if not any(w in low for w in ("no space left", "file write failed", "enospc",
                                      "disk quota", "pytorchstreamwriter failed writing")):
            return None  # a bug or a device error, not bad input: keep the traceback
        msg = (f"the disk is full ({msg}): free space and re-run the same command (a run "
               "resumes from its last checkpoint or committed shard)")
    elif name in _INPUT_ERRORS:  # the first sentence: torch's goes on to suggest unsafe loading
        msg = f"{_INPUT_ERRORS[name]} ({name}: {msg.split('. ')[0][:200]}); delete or replace that file"
    msg = msg or name
    return msg if len(msg) <= _MAX_ERROR_CHARS else msg[:_MAX_ERROR_CHARS] + " ..."


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- stage commands
# What each config command runs with its checked config (looked up when the command runs).
RUNS: dict[str, Callable] = {}


def _runs(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        RUNS[name] = fn
        return fn

    return register


@_runs("precompute")
def _precompute(cfg) -> str:
    from kdcache.precompute import run_precompute

    return run_precompute(cfg)


@_runs("rollout")
def _rollout(cfg) -> str:
    from kdcache.precompute.rollout import run_rollout

    return run_rollout(cfg)


@_runs("train")
def _train(cfg) -> str | Outcome | None:
    if cfg.estimate_memory:  # the step's memory on a CUDA GPU, simulated: no weights loaded
        from kdcache.train.memory import estimate_for_cli

        est = estimate_for_cli(cfg, progress=lambda msg: typer.echo(f"memory estimate: {msg} ...", err=True))
        return Outcome(est.format(), 1 if cfg.require_fit and not est.runs else 0)
    from kdcache.train.distributed import PeerFailure
    from kdcache.train.trainer import train

    try:
        res = train(cfg)
    except PeerFailure as e:  # another rank died or hung: one line naming it, exit 1
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if res.rank != 0:  # under torchrun only rank 0 prints the result
        return None
    typer.echo(f"{res.steps} steps, {res.tokens} tokens, {res.seconds:.1f}s, "
               f"final loss {res.final_loss:.4f}", err=True)
    return str(Path(res.out) / "model")


@_runs("eval")
def _eval(cfg) -> str:
    from kdcache.train.eval import evaluate, results_dir, save_results

    results_dir(cfg)  # nowhere to save: fail before the work
    result = evaluate(cfg)
    path = save_results(cfg, result)
    typer.echo(f"saved {path} and {path.with_suffix('.csv').name}", err=True)
    return json.dumps(result, indent=2, default=str)


@app.command("inspect", cls=_Command)
def inspect_(url: str = typer.Argument(..., help="store URL or path"),
             as_json: bool = _essential(typer.Option, False, "--json", help="print the summary as JSON"),
             student: str | None = _essential(
                 typer.Option, None, "--student", help="a student model directory with another tokenizer: also "
                 "report the aligned fraction of its tokens and the teacher top-K mass that maps "
                 "(METHODS §5; default: none)"),
             student_records: int = _essential(
                 typer.Option, 2000, "--student-records", help="records the --student report reads (default 2000)")) -> None:
    """Manifest summary, sequences and tokens, bytes/token per field, top-K mass."""
    from kdcache.store import open_store, summarize

    store = _friendly(open_store, url)
    summary = _friendly(lambda: summarize(store))
    if student:
        from kdcache.train.xtok.report import alignment_report

        summary["cross_tokenizer"] = _friendly(alignment_report, store, student, student_records)
    if as_json:
        _echo_json(summary)
        return
    from kdcache.store.summary import format_summary

    typer.echo(format_summary(summary))
    if student:
        from kdcache.train.xtok.report import format_report

        typer.echo(format_report(summary["cross_tokenizer"]))



@store_app.command("ls", cls=_Command)
def store_ls(root: str = typer.Argument(..., help="directory or URL holding stores")) -> None:
    """Stores under ROOT with their provenance, one JSON object per line."""
    from kdcache.store.admin import list_stores

    for row in _friendly(list_stores, root):
        if "damaged" in row:  # reported, not listed: the others still are
            typer.secho(f"warning: skipped {row['url']}: {row['damaged']}", fg=typer.colors.YELLOW, err=True)
        else:
            typer.echo(json.dumps(row, default=str))


@store_app.command("verify", cls=_Command)
def store_verify(
        url: str = typer.Argument(..., help="store URL or path"),
        repair: bool = _essential(typer.Option,
            False, "--repair", help="drop the first damaged shard and all later ones from the "
            "manifest, so re-running the command that wrote the store rewrites them "
            "(default: off, only report)")) -> None:
    """Check every file's checksum and the manifest; print `ok`, or name each damaged shard
    and file and exit 1."""
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


@store_app.command("gc", cls=_Command)
def store_gc(root: str = typer.Argument(..., help="directory or URL holding stores"),
             dry_run: bool = _essential(typer.Option, False, "--dry-run",
                                          help="only list what would be removed (default: off)"),
             min_age: float = _essential(typer.Option,
                 3600.0, "--min-age", help="remove unreferenced files only when at least this "
                 "many seconds old (default 3600: a live writer's next shard is unreferenced "
                 "until it commits); temp files of dead writers go at any age")) -> None:
    """Remove shards no manifest references and uncommitted temporary files; print JSON."""
    from kdcache.store.admin import gc

    report = _friendly(lambda: gc(root, min_age_s=min_age, dry_run=dry_run))
    for why in report["skipped"]:
        typer.secho(f"warning: skipped {why}", fg=typer.colors.YELLOW, err=True)
    _echo_json(report)


@store_app.command("merge", cls=_Command)
def store_merge(out: str = typer.Argument(..., help="URL of the merged store"),
                parts: list[str] = typer.Argument(..., help="the stores to merge, in order")) -> None:
    """Merge the complete partition stores of one precompute run (`--partition i/N`, all N
    parts) into OUT, under the unpartitioned run's meta; print OUT. Stores whose meta
    differs otherwise are refused. (`kdcache precompute ... --merge-parts N` does the same
    from the config and also restores the single run's shard order.)"""
    from kdcache.precompute.partitions import merge_stores

    def run() -> str:
        _refuse_memory({"out": out})
        return merge_stores(parts, out, option="OUT")

    typer.echo(_friendly(run))


@app.command(cls=_Command)
def plot(sources: list[Path] = typer.Argument(
             ..., help="training run directories (metrics.jsonl, eval.json) or a demo results.json"),
         out: Path = _essential(typer.Option, Path("plot.png"), "--out", "-o", help="image to write"),
         table: bool = _essential(typer.Option, False, "--table",
                                    help="also print a table of the runs' eval results and final "
                                         "loss (stdout), one row per run, and draw the eval bars"),
         log_y: bool = _essential(typer.Option, False, "--log-y",
                                    help="log loss axis (symlog if a loss is <= 0): losses are per-sequence "
                                         "sums that fall by orders of magnitude; default: linear")) -> None:
    """Loss curves of training runs; with --table, their eval results as a table too. Prints
    the image path (with --table: the table; the path goes to stderr)."""
    from kdcache.train.plot import plot_runs

    path, text = _friendly(plot_runs, sources, out, table, log_y)
    if text is None:
        typer.echo(path)
        return
    typer.echo(text)
    typer.echo(f"wrote {path}", err=True)


@app.command(cls=_Command)
def demo(out: Path = _essential(typer.Option, Path("kdcache-demo"), "--out", "-o", help="artefact directory"),
         quick: bool = _essential(typer.Option, False, "--quick", help="a smaller run (CI smoke test)"),
         methods: str = _essential(typer.Option, "", help="comma-separated subset of the table rows"),
         seed: int = _essential(typer.Option, 0, help="seed of data, models and sampling")) -> None:
    """Train a tiny teacher (SFT, then DPO), precompute its signals, distil students with
    every method, and print the table: rule preference rate, reward accuracy, time, store size
    (stages on stderr, the table on stdout)."""
    from kdcache import demo as demo_module

    result = _friendly(demo_module.run_demo, out, quick, [m for m in methods.split(",") if m], seed)
    typer.echo(demo_module.demo_table(result["rows"]))


# --------------------------------------------------------------------------- pipelines
pipeline_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                           help="Multi-stage recipes, one command each; each prints the final model's directory.")
app.add_typer(pipeline_app, name="pipeline")


ROLES_HELP = f"ROLE=COLUMN,... with ROLE one of {', '.join(COLUMN_ROLES)}"


def _read_options(what: str, also: str = "", flag: str = "") -> dict[str, tuple[type, typing.Any]]:
    """--data-config / --split / --columns (as the stage commands') for the data input
    `what`; `also` names a further input they read; `flag` prefixes them (`prompts`:
    --prompts-split ...) with the help's `unset` saying what an unset one means."""
    unset = {"data_config": "the dataset's default", "split": "train, or its only split",
             "columns": "TRL's names (prompt, chosen, rejected, ...)"}
    if flag:
        unset = {k: f"as --{k.replace('_', '-')} when --prompts is unset, else {v}" for k, v in unset.items()}
    panel = {"rich_help_panel": "Data"}
    return {
        f"{flag}_config" if flag else "data_config": (str | None, typer.Option(
            None, help=f"config (subset) of {what}, a `datasets` hub id or folder{also}; unset: "
                       f"{unset['data_config']}", **panel)),
        f"{flag}_split" if flag else "split": (str | None, typer.Option(
            None, help=f"split of {what} to read, a `datasets` hub id or folder (not a JSONL/Parquet "
                       f"file){also}; unset: {unset['split']}", **panel)),
        f"{flag}_columns" if flag else "columns": (str | None, typer.Option(
            None, help=f"column names of {what} where they differ from TRL's: {ROLES_HELP}, e.g. "
                       f"prompt=question,chosen=response_j{also}; unset: {unset['columns']}", **panel)),
    }


def pipeline_command(name: str, run: Callable, *, n: tuple[int, str], lr: float,
                     batch_groups: tuple[int, str], max_new_tokens: int,
                     reads: dict[str, tuple[type, typing.Any]]) -> Callable:
    """Registers `kdcache pipeline NAME`: the decorated function declares the pipeline's own
    options; the options every pipeline shares (--out, --n, --lr, --batch-groups,
    --max-new-tokens, --seed, --backend, with this pipeline's defaults) are added here, once,
    with `reads` (`_read_options`: how its data input is read), and the command prints
    `run(PipelineOptions(...), **own and reads options)`."""
    shared = {
        "out": (Path, _essential(typer.Option, Path(f"runs/{name}"), help="directory of the pipeline's stores "
                                   "(stores/) and runs (runs/); a re-run reuses both")),
        "n": (int, typer.Option(n[0], help=n[1])),
        "lr": (float, typer.Option(lr, help="learning rate" + (" of every stage" if name == "adpa-plus" else ""))),
        "batch_groups": (int, typer.Option(batch_groups[0], help=batch_groups[1])),
        "max_new_tokens": (int, typer.Option(max_new_tokens, help="longest rollout in tokens")),
        "seed": (int, typer.Option(0, help="seed of rollouts and training")),
        "backend": (str, typer.Option("hf", help="rollout sampler (rollout --backend): hf or vllm")),
    }

    def register(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(fn).parameters.values()]
        params = [_help_all_parameter(), *own] + [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=tp, default=opt)
            for k, (tp, opt) in {**reads, **shared}.items()]
        for p in params:  # the required inputs and --out first; the stages' settings below
            if p.default.rich_help_panel is None:
                p.default.rich_help_panel = ESSENTIALS if p.default.default is ... else "Stages"

        def command(**kwargs):
            kwargs.pop("help_all")  # handled by its callback
            opts = pipelines.PipelineOptions(**{k: kwargs.pop(k) for k in shared})
            typer.echo(_friendly(lambda: run(opts, **kwargs)))

        command.__signature__ = inspect.Signature(params)
        command.__doc__ = fn.__doc__
        pipeline_app.command(name, cls=_Command)(command)
        return fn

    return register


@pipeline_command("adpa-plus", pipelines.run_adpa_plus, n=(2, "rollouts per prompt"), lr=1e-5,
                  batch_groups=(8, "example groups per micro-batch"), max_new_tokens=256,
                  reads={**_read_options("--data (the preference pairs)",
                                         also="; also of the rollout prompts when --prompts is unset"),
                         **_read_options("the rollout prompts (--prompts, or --data when unset)",
                                         flag="prompts")})
def _pipeline_adpa_plus(
    student: str = typer.Option(..., help="SFT'd student model dir"),
    teacher: str = typer.Option(..., help="DPO teacher model dir"),
    reference: str = typer.Option(..., help="the teacher's pre-DPO reference model dir"),
    data: str = typer.Option(..., help="preference data (prompt, chosen, rejected)"),
    prompts: str = typer.Option("", help="prompts for rollouts (default: --data)"),
    dckd_steps: int = typer.Option(1000, help="optimizer steps of the DCKD stage"),
    adpa_steps: int = typer.Option(1000, help="optimizer steps of the ADPA stage"),
    k: int = typer.Option(50, help="teacher top-K entries stored per token"),
    dckd_alpha: float = typer.Option(0.2, help="DCKD's alpha (train --dckd-alpha)"),
    adpa_gamma: float = typer.Option(3.0, help="ADPA's gamma (train --adpa-gamma)"),
) -> None:
    """DCKD -> rollouts -> precompute -> ADPA, one command (ADPA+)."""


@pipeline_command("tgpo", pipelines.run_tgpo, n=(8, "rollouts per prompt (the GRPO group)"), lr=1e-6,
                  batch_groups=(4, "prompts (groups of n rollouts) per micro-batch"), max_new_tokens=512,
                  reads=_read_options("--prompts (every round's rollouts)"))
def _pipeline_tgpo(
    student: str = typer.Option(..., help="the student to improve (model dir)"),
    teacher: str = typer.Option(..., help="the teacher whose top-K guides it (model dir)"),
    prompts: str = typer.Option(..., help="prompts (+ answer column for numeric rewards)"),
    reward: str = typer.Option(..., help="module:function, or built in: numeric_exact_match, sort_rule"),
    rounds: int = typer.Option(1, help="rollout -> precompute -> train rounds"),
    steps: int = typer.Option(200, help="train steps per round"),
    k: int = typer.Option(50, help="teacher top-K entries stored per token"),
    shaping: bool = typer.Option(False, help="TGPO_R reward shaping"),
) -> None:
    """TGPO in offline rounds: rollout -> reward -> precompute -> train N steps -> repeat."""


@pipeline_command("pbsd", pipelines.run_pbsd, n=(1, "rollouts per prompt, on each side"), lr=1e-5,
                  batch_groups=(8, "pairs per micro-batch"), max_new_tokens=256,
                  reads=_read_options("--prompts (both rollouts)"))
def _pipeline_pbsd(
    student: str = typer.Option(..., help="the initial student (also the teacher, given context)"),
    prompts: str = typer.Option(..., help="prompts with a `context` column (privileged information)"),
    steps: int = typer.Option(500, help="optimizer steps"),
    beta: float = typer.Option(0.1, help="PBSD's beta (train --pbsd-beta)"),
) -> None:
    """PBSD: teacher-with-context samples y+, student samples y-, precompute, train."""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app(prog_name="kdcache")


if __name__ == "__main__":
    sys.exit(main())
