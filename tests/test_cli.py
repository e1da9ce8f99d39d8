"""The `kdcache` CLI: flags mirror the config dataclasses (every one with help, default and
allowed values), a YAML file is overridden by flags, bad input ends in one clear line (exit
2) with nothing written, stdout carries only the result, and `--help` never imports torch."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import pytest
from reference_checks import one_error
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.train.config import TrainConfig

runner = CliRunner()
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def _config_classes():
    import importlib

    for name, (spec, _) in cli.CONFIG_COMMANDS.items():
        module, _, attr = spec.partition(":")
        yield name, getattr(importlib.import_module(module), attr)


def test_help_lists_every_command():
    out = runner.invoke(cli.app, ["--help"]).output
    for cmd in ("precompute", "rollout", "train", "eval", "inspect", "demo", "plot", "store", "pipeline"):
        assert cmd in out


def test_every_config_field_has_help_and_a_panel():
    """A field added without `metadata={"help": ..., "panel": ...}` is named here."""
    missing = [f"{cls.__name__}.{f.name}" for _, cls in _config_classes()
               for f in dataclasses.fields(cls)
               if not str(f.metadata.get("help", "")).strip() or not f.metadata.get("panel")]
    assert not missing, f"config fields without help/panel metadata: {', '.join(missing)}"


@pytest.mark.parametrize("name", list(cli.CONFIG_COMMANDS))
def test_every_option_shows_help_default_and_choices(name):
    cls = dict(_config_classes())[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    cmd = cli.build_config_command(name)
    options = {p.name: p for p in cmd.params if p.name not in ("help", "help_all") and not p.hidden}
    assert set(options) == set(fields) | {"config"}
    # the old names of renamed options still parse, hidden from --help
    assert {p.name for p in cmd.params if p.hidden} == set(getattr(cls, "RENAMED", {}))
    for pname, p in options.items():
        description, _, tags = (p.help or "").partition("  \\[")
        assert description.strip(), f"--{pname}: no description"
        if pname == "config":
            continue
        assert tags.startswith(("default: ", "required")), f"--{pname}: no default in {p.help!r}"
        for choice in fields[pname].metadata.get("choices", ()):
            assert choice in tags, f"--{pname}: choice {choice} not shown"


@pytest.mark.parametrize("name", list(cli.CONFIG_COMMANDS))
def test_help_starts_with_the_essentials(name):
    out = runner.invoke(cli.app, [name, "--help"], env=WIDE).output
    panels = [line.split("─ ")[1].split(" ─")[0] for line in out.splitlines() if line.startswith("╭─ ")]
    assert panels[0] == cli.ESSENTIALS, panels
    essentials = out.split("╭─ ")[1]
    cls = dict(_config_classes())[name]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        listed = re.search(rf"│ {flag}\s", essentials) is not None
        assert listed == (f.metadata.get("panel") == cli.ESSENTIALS), flag
    assert "--config" in essentials and "--help" in essentials
    assert "[default: " in out


def test_train_flags_mirror_the_dataclass():
    out = runner.invoke(cli.app, ["train", "--help-all"], env=WIDE).output
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "[default: sft; one of: sft, seqkd, kd, dckd" in out


def _commands():
    """(argv prefix, click command) of every command, config commands built."""
    import typer

    group = typer.main.get_command(cli.app)
    for name, cmd in group.commands.items():
        if name in cli.CONFIG_COMMANDS:
            yield [name], cli.build_config_command(name)
        elif hasattr(cmd, "commands"):
            for sub, c in cmd.commands.items():
                yield [name, sub], c
        else:
            yield [name], cmd


NARROW = {"COLUMNS": "80", "TERMINAL_WIDTH": "80"}


@pytest.mark.parametrize("argv, cmd", [pytest.param(a, c, id=" ".join(a)) for a, c in _commands()])
def test_help_at_80_columns_never_cuts_an_option_name(argv, cmd, monkeypatch):
    """Every option name is printed whole at 80 columns (with --help-all where the command
    has it), and nothing is cut with an ellipsis."""
    from typer import rich_utils

    monkeypatch.setattr(rich_utils, "MAX_WIDTH", 80)  # read from TERMINAL_WIDTH once, at import
    names = {o for p in cmd.params if not getattr(p, "hidden", False)  # old names of renamed options
             for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())) if o.startswith("--")}
    flag = "--help-all" if "--help-all" in names else "--help"
    out = runner.invoke(cli.app, [*argv, flag], env=NARROW).output
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out, [line for line in out.splitlines() if "…" in line]
    words = set(re.findall(r"--[\w-]+", out))
    assert names <= words | {"--help-all"}, sorted(names - words)


@pytest.mark.parametrize("argv", [["inspect"], ["plot"], ["demo"], ["pipeline", "adpa-plus"],
                                  ["pipeline", "tgpo"], ["pipeline", "pbsd"], ["train"], ["precompute"]])
def test_help_shows_the_essentials_and_help_all_the_rest(argv):
    out = runner.invoke(cli.app, [*argv, "--help"], env=WIDE).output
    panels = [line.split("─ ")[1].split(" ─")[0] for line in out.splitlines() if line.startswith("╭─ ")]
    assert [p for p in panels if p != "Arguments"] == [cli.ESSENTIALS], panels
    full = runner.invoke(cli.app, [*argv, "--help-all"], env=WIDE).output if "--help-all" in out else out
    if full is not out:
        assert "--help-all` lists them all" in out and len(full.splitlines()) > len(out.splitlines())
        assert full.count("╭─ ") > out.count("╭─ ")


def test_help_imports_no_torch():
    """`kdcache --help` and every command's --help build their options without torch,
    transformers, datasets or wandb (the options live in config modules apart from the code that runs them)."""
    code = (
        "import sys\nfrom kdcache.cli import app\n"
        "for args in (['--help'], ['train', '--help'], ['eval', '--help'], ['store', '--help'],\n"
        "             ['precompute', '--help'], ['rollout', '--help'], ['train', '--help-all'],\n"
        "             ['pipeline', 'pbsd', '--help-all'], ['demo', '--help']):\n"
        "    try:\n        app(args, prog_name='kdcache')\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'wandb', 'kdcache.precompute.run')\n"
        "         if m in sys.modules]\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().endswith("HEAVY="), res.stderr[-300:]


def test_config_file_then_flags(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.RUNS, "train", lambda cfg: seen.setdefault("cfg", cfg) and "runs/x/model")
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nstore: s\nobjective: dckd\nlr: 0.5\nlora_targets: [q_proj]\nepochs: 2\n")
    res = runner.invoke(cli.app, ["train", "-c", str(f), "--lr", "0.1", "--no-grad-checkpointing",
                                  "--lora-targets", "q_proj,v_proj"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.objective, cfg.lr, cfg.grad_checkpointing, cfg.epochs) == ("dckd", 0.1, False, 2.0)
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert res.stdout == "runs/x/model\n"


def test_list_options_parse(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.RUNS, "precompute", lambda cfg: seen.setdefault("cfg", cfg) and "url")
    res = runner.invoke(cli.app, ["precompute", "--teacher", "t", "--data", "d", "--betas", " 1, 2.5 ",
                                  "--partition", "1/4"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    checked = cfg.validated()  # "i/N" or "auto": the partition is resolved when checked
    assert checked.betas == (1.0, 2.5) and checked.partition == (1, 4)
    assert cfg.partition == "1/4"  # the config itself is frozen: checking returns a new one


@pytest.mark.parametrize("word", ["none", "None", "null", ""])
def test_optional_numbers_take_none(monkeypatch, word):
    """`--max-length none` unsets an optional number, as `max_length: null` does in YAML;
    the help says so; a required number still refuses it."""
    seen = {}
    monkeypatch.setitem(cli.RUNS, "precompute", lambda cfg: seen.setdefault("cfg", cfg) and "url")
    res = runner.invoke(cli.app, ["precompute", "--teacher", "t", "--data", "d", "--max-length", word])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].max_length is None
    assert "none: unset" in runner.invoke(cli.app, ["precompute", "--help-all"], env=WIDE).output
    _one_error(runner.invoke(cli.app, ["precompute", "--teacher", "t", "--data", "d", "--k", word]), "--k")


def _one_error(res, *needles: str) -> str:
    return one_error(res, *needles, alone=True)


PRE = ["precompute", "--teacher", "t", "--data", "d.jsonl"]


@pytest.mark.parametrize("args, needles", [
    (PRE + ["--betas", "1,,x"], ["--betas", "comma-separated numbers"]),
    (PRE + ["--betas", "1,x"], ["--betas", "comma-separated numbers"]),
    (PRE + ["--betas", ""], ["--betas"]),
    (PRE + ["--devices", "0,,1"], ["--devices", "comma-separated"]),
    (PRE + ["--partition", "1/"], ["--partition", "i/N"]),
    (PRE + ["--partition", "a/b"], ["--partition", "i/N"]),
    (PRE + ["--partition", "0/2/3"], ["--partition", "i/N"]),
    (["train", "--model", "m", "--store", "s", "--lora-targets", "q_proj,,v_proj"], ["--lora-targets"]),
    (["train", "--model", "m", "--store", "s", "--lora-targets", ","], ["--lora-targets"]),
    (PRE + ["--out-root", "memory://kdcache"], ["--out-root memory://kdcache", "Python API"]),
    (["rollout", "--model", "m", "--data", "d", "--out", "memory://x/y"], ["--out memory://x/y"]),
    (["precompute", "--data", "d.jsonl"], ["no --teacher", "--tokenizer DIR"]),
])
def test_malformed_options_are_one_error_line(tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    _one_error(runner.invoke(cli.app, args), *needles)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("text, needles", [
    (None, ["no such file"]),
    ("lr: [1\nx: 2\n", ["not valid YAML", "line 2"]),
    ("- a\n- b\n", ["mapping"]),
    ("learning_rate: 1\nlr_warmup: 3\n", ["unknown keys", "learning_rate"]),
    ("lr: abc\n", ["lr", "expected float"]),
    ("max_steps: 1.5\n", ["max_steps", "expected int"]),
    ("lora_targets: [q_proj, '']\n", ["lora_targets"]),
    ("grad_checkpointing: 3\n", ["grad_checkpointing", "expected bool"]),
])
def test_bad_config_file_is_one_error_line(tmp_path, text, needles):
    f = tmp_path / "conf.yaml"
    if text is not None:
        f.write_text(text)
    before = sorted(tmp_path.iterdir())
    line = _one_error(runner.invoke(cli.app, ["train", "-c", str(f), "--out", str(tmp_path / "run")]), *needles)
    assert str(f) in line  # the file is named
    assert sorted(tmp_path.iterdir()) == before


def test_bad_input_is_one_line(tmp_path):
    res = runner.invoke(cli.app, ["train", "--model", str(tmp_path / "nope"), "--store",
                                  str(tmp_path / "nostore"), "--out", str(tmp_path / "o")])
    _one_error(res)


def test_verbose_shows_the_traceback(tmp_path):
    res = runner.invoke(cli.app, ["-v", "inspect", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and res.exception is not None and not isinstance(res.exception, SystemExit)
    res = runner.invoke(cli.app, ["inspect", str(tmp_path / "nothing")])  # -v does not stick
    _one_error(res)


def test_quiet_by_default_only_through_the_environment(tmp_path, monkeypatch):
    """The CLI asks transformers for errors only and no progress bars (read when it is first
    imported by the command); an already-configured transformers is left alone."""
    import transformers

    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    monkeypatch.setattr(os, "environ", env)
    level = transformers.logging.get_verbosity()
    runner.invoke(cli.app, ["store", "ls", str(tmp_path)])
    assert env["TRANSFORMERS_VERBOSITY"] == "error" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert transformers.logging.get_verbosity() == level


def test_memory_url_refused_by_store_merge(tmp_path):
    _one_error(runner.invoke(cli.app, ["store", "merge", "memory://m", str(tmp_path / "a")]), "memory://")


def test_demo_table_on_stdout_stages_on_stderr(monkeypatch):
    import kdcache.demo

    def fake_demo(out, quick, methods, seed):
        cli.typer.echo("[1/5] teacher: ...")  # a stray stdout write still lands on stderr
        return {"rows": [{"method": "sft", "reward_mean": 0.5, "eos_rate": 1.0, "reward_accuracy": 0.9,
                          "kl_topk": 1.0, "train_s": 2.0, "store_mb": 0.1}]}

    monkeypatch.setattr(kdcache.demo, "run_demo", fake_demo)
    res = runner.invoke(cli.app, ["demo", "--quick"])
    assert res.exit_code == 0, res.output
    assert "[1/5]" in res.stderr and "[1/5]" not in res.stdout
    assert "sft" in res.stdout and "0.500" in res.stdout


def test_demo_table_names_the_tokenizer_s_eos():
    from kdcache.demo import demo_table

    row = {"method": "sft", "reward_mean": 0.5, "eos_rate": 1.0, "eos_token": "<|im_end|>"}
    assert "ends <|im_end|>" in demo_table([row])
    assert "ends EOS" in demo_table([{k: v for k, v in row.items() if k != "eos_token"}])


def _tiny_store(url):
    import numpy as np

    from kdcache.store import StoreMeta, StoreWriter

    meta = StoreMeta(k=2, betas=[1.0], fields=["topk_ids", "topk_logprobs"], options={"codec": "lossless"})
    with StoreWriter(url, meta) as w:
        for e in range(3):
            w.add_group([{"example_id": f"e{e}", "role": "chosen", "group": 0,
                          "prompt_ids": np.array([4, 5], np.int32), "response_ids": np.array([7, 2], np.int32),
                          "is_terminal": True, "topk_ids": np.array([[7, 8], [2, 9]], np.int32),
                          "topk_logprobs": np.log(np.array([[0.6, 0.3], [0.9, 0.05]], np.float32))}])


def test_inspect_verify_gc(tmp_path):
    url = str(tmp_path / "s")
    _tiny_store(url)
    out = runner.invoke(cli.app, ["inspect", url]).output
    assert "bytes/token per field" in out and "mean top-K mass  0.9250" in out and "chosen=3" in out
    assert runner.invoke(cli.app, ["store", "verify", url]).output.strip() == "ok"
    stray = tmp_path / "s" / "shards" / "orphan"
    stray.mkdir(parents=True)
    (stray / "x.bin").write_bytes(b"0" * 10)
    res = runner.invoke(cli.app, ["store", "gc", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0 and '"dry_run": true' in res.output
    json.loads(res.stdout)  # the result alone, as JSON
    assert stray.exists()  # a dry run removes nothing
    res = runner.invoke(cli.app, ["inspect", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "error:" in res.output


# ------------------------------------------------------------------ stage commands end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdcache.train.tasks import make_demo_data
    from kdcache.train.tiny import build_tokenizer, save_tiny

    d = tmp_path_factory.mktemp("stages")
    tok = build_tokenizer()
    return {"dir": d, "teacher": str(save_tiny(d / "teacher", tok, hidden=32, layers=1, heads=2, seed=1)),
            "student": str(save_tiny(d / "student", tok, hidden=16, layers=1, heads=2, seed=2)),
            "other": str(save_tiny(d / "other", build_tokenizer(words=["x", "y", "z"]), hidden=16,
                                   layers=1, heads=2, seed=3)),
            "data": make_demo_data(d / "data", n_sft=4, n_pref=6, n_rollout_prompts=4, n_eval=4)}


@pytest.fixture(scope="module")
def chain(tiny):
    """precompute -> train -> eval through the CLI; each stdout is exactly its result."""
    d = tiny["dir"]
    pre = runner.invoke(cli.app, ["precompute", "--teacher", tiny["teacher"], "--reference", tiny["teacher"],
                                  "--data", str(tiny["data"]["pref"]), "--k", "4", "--out-root", str(d / "stores"),
                                  "--progress"])
    assert pre.exit_code == 0, pre.output
    url = pre.stdout.strip()
    train = runner.invoke(cli.app, ["train", "--model", tiny["student"], "--store", url, "--objective", "dckd",
                                    "--max-steps", "2", "--batch-groups", "2", "--log-every", "1",
                                    "--out", str(d / "runs" / "dckd")])
    assert train.exit_code == 0, train.output
    ev = runner.invoke(cli.app, ["eval", "--model", train.stdout.strip(), "--store", url,
                                 "--reward", "sort_rule", "--samples", "1", "--max-new-tokens", "3"])
    assert ev.exit_code == 0, ev.output
    return {"pre": pre, "train": train, "eval": ev, "url": url, "run": d / "runs" / "dckd"}


def test_stdout_is_the_result_alone(chain):
    from kdcache.store import open_store

    assert chain["pre"].stdout == chain["url"] + "\n"
    assert open_store(chain["url"]).complete
    assert "precompute" in chain["pre"].stderr  # the progress bar went to stderr
    assert chain["train"].stdout == str(chain["run"] / "model") + "\n"
    assert "2 steps" in chain["train"].stderr
    json.loads(chain["eval"].stdout)  # JSON and nothing else


def test_metrics_have_each_step_once(chain):
    steps = [json.loads(line)["step"] for line in (chain["run"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_eval_saves_json_and_csv_next_to_the_run(chain):
    import csv

    printed = json.loads(chain["eval"].stdout)
    saved = json.loads((chain["run"] / "eval.json").read_text())
    assert {k: saved[k] for k in printed} == printed
    assert saved["model"].endswith("model") and saved["store"] == chain["url"]
    rows = list(csv.DictReader((chain["run"] / "eval.csv").open()))
    assert len(rows) == 1 and float(rows[0]["reward_accuracy"]) == pytest.approx(printed["reward_accuracy"])
    assert not [p for p in chain["run"].iterdir() if ".tmp" in p.name]


def test_plot_table_of_run_dirs(chain, tmp_path):
    res = runner.invoke(cli.app, ["plot", str(chain["run"]), "--table", "-o", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("| run | steps | final loss |")
    assert "| dckd | 2 |" in res.stdout and (tmp_path / "p.png").exists()


def test_eval_refuses_another_vocabulary(tiny, chain, tmp_path):
    res = runner.invoke(cli.app, ["eval", "--model", tiny["other"], "--store", chain["url"],
                                  "--out", str(tmp_path / "ev")])
    _one_error(res, "vocab", tiny["other"])
    assert not (tmp_path / "ev").exists()


def test_rollout_reward_from_the_current_directory(tiny, tmp_path, monkeypatch):
    """`--reward mymodule:fn` finds mymodule.py in the current directory, as `python -m` would."""
    (tmp_path / "kdc_test_rewards.py").write_text("def score(prompt, response, row=None):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "kdc_test_rewards", raising=False)
    res = runner.invoke(cli.app, ["rollout", "--model", tiny["student"], "--data", str(tiny["data"]["prompts"]),
                                  "--n", "2", "--max-new-tokens", "2", "--reward", "kdc_test_rewards:score",
                                  "--out-root", str(tmp_path / "stores")])
    assert res.exit_code == 0, res.output
    from kdcache.store import open_store

    store = open_store(res.stdout.strip())
    assert {r["reward"] for r in store} == {0.25}
    _one_error(runner.invoke(cli.app, ["rollout", "--model", tiny["student"], "--data", "d",
                                       "--reward", "no_such_module_here:fn"]), "current directory")


@pytest.fixture(autouse=True)
def _restore_log_level():
    level = logging.getLogger("kdcache").level
    yield
    logging.getLogger("kdcache").setLevel(level)


@pytest.mark.parametrize("args, needle", [
    (["train", "--no-such-flag", "1"], "No such option: --no-such-flag"),
    (["train", "--lr", "abc"], "Invalid value for '--lr'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["store", "verify"], "Missing argument 'url'"),
])
def test_usage_errors_are_one_error_line(args, needle):
    """Unknown options, unparsable values and unknown commands: one `error:` line on stderr
    naming the problem and where the options are listed, exit code 2 (no boxed panel)."""
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "--help`)" in lines[0] and res.stdout == ""
