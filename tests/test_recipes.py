"""Recipes (train/recipes/*.yaml): each is a valid, fully cited TrainConfig layer; layering is
recipe < --config file < flags, the same through load_config and the CLI; a run saves the
resolved values. Also: the per-variant weights of ADPA and DCKD resolve to the published
defaults, and a weight of the variant not in use is refused."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
import types
import typing

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import kdcache.cli as cli
from kdcache.train import objectives
from kdcache.train.config import OBJECTIVES, OptimSettings, ScheduleSettings, TrainConfig
from kdcache.train.recipe import _dir, available_recipes, recipe_values

runner = CliRunner()
RECIPES = available_recipes()
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def test_the_papers_have_recipes():
    assert set(RECIPES) >= {"adpa", "adpa-code", "dckd", "dckd-code", "tvkd", "tgpo", "pbsd", "dpo", "seqkd"}


def _accepts(tp, value) -> bool:
    """Whether a YAML value fits a TrainConfig annotation (int is fine where float is asked)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_a_valid_config(name):
    values = recipe_values(name)
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        # e.g. YAML reads `5e-7` (no dot) as a string: the recipes must write 5.0e-7
        assert _accepts(hints[key], value), f"{name}: {key}: {value!r} is not a {hints[key]}"
    assert values["objective"] in OBJECTIVES
    TrainConfig(**values, model="m", store="s").validated()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_value_cites_its_source(name):
    lines = (_dir() / f"{name}.yaml").read_text().splitlines()
    assert lines[0].startswith("# "), "a recipe opens with a comment naming its paper"
    keys = [ln for ln in lines if re.match(r"^[a-z_]+:", ln)]
    assert keys and len(keys) == len(recipe_values(name))
    for ln in keys:
        assert re.search(r"\s#\s+\S", ln), f"{name}: no source comment on `{ln}`"


def load_config(path, flags):
    return cli.make_config("train", TrainConfig, path, flags)  # the one loader, as the CLI runs it


def test_layers_recipe_then_file_then_flags(tmp_path):
    base = recipe_values("tvkd")
    f = tmp_path / "c.yaml"
    f.write_text("recipe: tvkd\nlr: 0.5\ntvkd_alpha: 0.1\n")
    cfg = load_config(f, {"lr": 0.1, "tvkd_alpha": None})
    assert (cfg.recipe, cfg.objective, cfg.lr, cfg.tvkd_alpha) == ("tvkd", "tvkd", 0.1, 0.1)
    assert (cfg.tvkd_beta, cfg.epochs) == (base["tvkd_beta"], base["epochs"])
    cfg = load_config(f, {"recipe": "dckd-code"})  # a flag names another recipe
    assert (cfg.objective, cfg.dckd_released_code, cfg.lr) == ("dckd", True, 0.5)
    assert load_config(None, {}).recipe == ""
    with pytest.raises(ValueError, match=r"unknown recipe 'nope': available recipes are adpa, adpa-code"):
        load_config(None, {"recipe": "nope"})


def test_recipe_keys_are_checked(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("objective: sft  # x\nlearning_rate: 1  # x\n")
    monkeypatch.setattr("kdcache.train.recipe._dir", lambda: tmp_path)
    with pytest.raises(ValueError, match=r"recipe bad: unknown keys \['learning_rate'\]"):
        recipe_values("bad", TrainConfig)


def test_help_lists_the_recipes():
    out = runner.invoke(cli.app, ["train", "--help"], env=WIDE).output
    assert "--recipe" in out
    flat = " ".join(out.split())
    for name in RECIPES:
        assert name in flat


def test_cli_layers_and_unknown_recipe(tmp_path, monkeypatch):
    seen = {}
    done = types.SimpleNamespace(steps=0, tokens=0, seconds=0.0, final_loss=0.0, out="o", rank=0)
    monkeypatch.setattr("kdcache.train.trainer.train", lambda cfg: seen.setdefault("cfg", cfg) and done)
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nstore: s\nlr: 0.5\nbatch_groups: 3\n")
    res = runner.invoke(cli.app, ["train", "--recipe", "adpa-code", "-c", str(f), "--lr", "0.25"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.recipe, cfg.objective, cfg.adpa_released_code, cfg.adpa_weight) == ("adpa-code", "adpa", True, 1.6)
    assert (cfg.lr, cfg.batch_groups, cfg.grad_accum) == (0.25, 3, 128)  # flag > file > recipe
    res = runner.invoke(cli.app, ["train", "--recipe", "nope", "--model", "m", "--store", "s"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errors) == 1 and all(n in errors[0] for n in RECIPES), res.output


# ---------------------------------------------------------------- variant weights


@pytest.mark.parametrize("kw,match", [
    ({"adpa_released_code": True, "adpa_gamma": 2.0}, r"adpa_gamma is a weight of the paper form.*set adpa_weight"),
    ({"adpa_weight": 2.0}, r"adpa_weight is a weight of the released-code variant.*--adpa-released-code"),
    ({"dckd_released_code": True, "dckd_alpha": 0.5}, r"dckd_alpha .*set dckd_sft_weight, dckd_chosen_weight"),
    ({"dckd_chosen_weight": 0.5}, r"dckd_chosen_weight is a weight of the released-code variant"),
])
def test_a_weight_of_the_other_variant_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(model="m", store="s", **kw).validated()


def _capture(monkeypatch, name):
    seen = {}

    def fake(*args, **kw):
        seen.update(kw)
        return torch.zeros(()), {}

    monkeypatch.setattr(objectives.losses, name, fake)
    return seen


def _fake_batch():
    mask = torch.ones(2, 3, dtype=torch.bool)
    student = types.SimpleNamespace(token_logprobs=torch.zeros(2, 3), topk_logprobs=torch.zeros(2, 3, 4))
    stored = {"topk_logprobs": torch.zeros(2, 3, 4), "ref_topk_logprobs": torch.zeros(2, 3, 4)}
    return student, types.SimpleNamespace(block_ids=[0, 1], mask=mask, stored=stored)


@pytest.mark.parametrize("kw,gamma", [({}, 3.0), ({"adpa_gamma": 1.5}, 1.5),
                                      ({"adpa_released_code": True}, 1.6),
                                      ({"adpa_released_code": True, "adpa_weight": 0.5}, 0.5)])
def test_adpa_weight_defaults_follow_the_variant(monkeypatch, kw, gamma):
    seen = _capture(monkeypatch, "adpa_loss")
    objectives._adpa(*_fake_batch(), TrainConfig(**kw), 0)
    assert seen["gamma"] == gamma and seen["released_code"] == kw.get("adpa_released_code", False)


@pytest.mark.parametrize("kw,alpha,weights", [
    ({}, 0.2, (1.0, 0.1, 0.1)),
    ({"dckd_alpha": 1.0}, 1.0, (1.0, 0.1, 0.1)),
    ({"dckd_released_code": True, "dckd_rejected_weight": 0.0}, 0.2, (1.0, 0.1, 0.0)),
])
def test_dckd_weight_defaults_follow_the_variant(monkeypatch, kw, alpha, weights):
    seen = _capture(monkeypatch, "dckd_loss")
    objectives._dckd(*_fake_batch(), TrainConfig(**kw), 0)
    assert (seen["alpha"], seen["weights"]) == (alpha, weights)
    assert seen["released_code"] == kw.get("dckd_released_code", False)


# ---------------------------------------------------------------- a real run saves the resolved recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdcache.store import StoreMeta, StoreWriter
    from kdcache.train.tiny import build_tokenizer, save_tiny

    root = tmp_path_factory.mktemp("recipes")
    tok = build_tokenizer()
    model = save_tiny(root / "student", tok, hidden=16, layers=1, heads=2)
    rng = np.random.default_rng(0)
    v, k = len(tok), 4
    meta = StoreMeta(k=k, betas=[1.0], fields=["topk_ids", "topk_logprobs", "ref_topk_logprobs"],
                     models={}, tokenizer={"vocab_size": v}, dataset={}, options={"codec": "lossless"},
                     code_version="test")

    def rec(eid, role, group):
        t = int(rng.integers(1, 5))
        lp = np.log(rng.dirichlet(np.ones(v), size=t))
        ids = np.argsort(-lp, -1)[:, :k].astype(np.int32)
        ref = np.log(rng.dirichlet(np.ones(v), size=t))
        return {"example_id": eid, "role": role, "group": group, "prompt_ids": np.array([6, 7], np.int32),
                "response_ids": rng.integers(6, v, size=t).astype(np.int32), "is_terminal": True,
                "topk_ids": ids, "topk_logprobs": np.take_along_axis(lp, ids, -1).astype(np.float32),
                "ref_topk_logprobs": np.take_along_axis(ref, ids, -1).astype(np.float32)}

    url = str(root / "store")
    with StoreWriter(url, meta) as w:
        for e in range(4):
            w.add_group([rec(f"e{e}", "chosen", 0), rec(f"e{e}", "rejected", 0), rec(f"e{e}", "student_rollout", 0)])
    return str(model), url


@pytest.mark.parametrize("name", ["dckd-code", "adpa-code"])
def test_a_recipe_run_saves_its_resolved_values(tiny, tmp_path, name):
    model, url = tiny
    out = tmp_path / name
    res = runner.invoke(cli.app, ["train", "--recipe", name, "--model", model, "--store", url, "--out", str(out),
                                  "--max-steps", "1", "--grad-accum", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    want = {**recipe_values(name), "max_steps": 1, "grad_accum": 2}
    assert saved["recipe"] == name and {k: saved[k] for k in want} == want
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------- a config is frozen, checked once


def test_a_config_is_frozen_normalised_and_validated_returns_it():
    stores = ["a"]
    cfg = TrainConfig(model="m", store=stores)
    stores.append("b")  # the caller's list is not the config's
    assert cfg.store == ["a"] and TrainConfig(model="m", store="a").store == ["a"]
    assert cfg.validated() is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    changed = dataclasses.replace(cfg, lr=0.5, lr_schedule="cosine", warmup_ratio=0.1)
    assert (changed.optim_settings.lr, changed.schedule_settings) == (0.5, ScheduleSettings("cosine", 0, 0.1))
    assert changed.optim_settings == OptimSettings("adamw", 0.5, 0.0, "auto", True)


# ---------------------------------------------------------------- renamed options: the old names still work


OLD_NEW = [("dckd_reference_code", "dckd_released_code"), ("adpa_reference_code", "adpa_released_code")]


def _notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def _fake_train(monkeypatch) -> dict:
    seen = {}
    done = types.SimpleNamespace(steps=0, tokens=0, seconds=0.0, final_loss=0.0, out="o", rank=0)
    monkeypatch.setattr("kdcache.train.trainer.train", lambda cfg: seen.setdefault("cfg", cfg) and done)
    return seen


def test_renamed_options_are_the_ones_listed():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert list(TrainConfig.RENAMED.items()) == OLD_NEW
    assert all(new in fields and old not in fields for old, new in OLD_NEW)


def test_old_flags_still_work_hidden_from_help(monkeypatch, caplog):
    seen = _fake_train(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):
        res = runner.invoke(cli.app, ["train", "--model", "m", "--store", "s", "--objective", "dckd",
                                      "--dckd-reference-code"])
    assert res.exit_code == 0, res.output
    assert seen.pop("cfg").dckd_released_code is True
    assert _notes(caplog) == ["note: --dckd-reference-code is deprecated: use --dckd-released-code (the same option)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):  # the --no- form, over a recipe
        res = runner.invoke(cli.app, ["train", "--model", "m", "--store", "s", "--recipe", "adpa-code",
                                      "--no-adpa-reference-code"])
    assert res.exit_code == 0, res.output
    assert (seen["cfg"].adpa_released_code, seen["cfg"].adpa_weight) == (False, 1.6)  # flag > recipe
    assert _notes(caplog) == ["note: --adpa-reference-code is deprecated: use --adpa-released-code (the same option)"]
    shown = runner.invoke(cli.app, ["train", "--help-all"], env=WIDE).output
    assert "--dckd-released-code" in shown and "reference-code" not in shown


def test_old_and_new_flag_together_are_refused(monkeypatch):
    _fake_train(monkeypatch)
    res = runner.invoke(cli.app, ["train", "--model", "m", "--store", "s", "--dckd-reference-code",
                                  "--no-dckd-released-code"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert errors == ["error: both --dckd-reference-code and --dckd-released-code are given: "
                      "--dckd-reference-code is the old name of --dckd-released-code; keep only "
                      "--dckd-released-code"], res.output


def test_the_old_flag_prints_one_note_line_on_stderr(tmp_path):
    """End to end, as a user runs it: one note line on stderr, nothing on stdout (the run itself
    then fails on the missing store, with its one error line)."""
    res = subprocess.run([sys.executable, "-m", "kdcache.cli", "train", "--model", "m", "--store",
                          str(tmp_path / "nowhere"), "--objective", "dckd", "--dckd-reference-code"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "", res.stderr
    lines = res.stderr.splitlines()
    assert [ln for ln in lines if "deprecated" in ln] == [
        "note: --dckd-reference-code is deprecated: use --dckd-released-code (the same option)"], res.stderr
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, res.stderr


@pytest.mark.parametrize("old,new", OLD_NEW)
def test_old_keys_in_a_config_file_still_work(tmp_path, caplog, old, new):
    f = tmp_path / "c.yaml"
    f.write_text(f"model: m\nstore: s\n{old}: true\n")
    with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):
        cfg = load_config(f, {})
    assert getattr(cfg, new) is True
    assert _notes(caplog) == [f"note: --config {f}: {old} is deprecated: use {new} (the same option)"]
    assert getattr(load_config(f, {new: False}), new) is False  # a flag still overrides the file
    f.write_text(f"model: m\nstore: s\n{old}: true\n{new}: false\n")
    with pytest.raises(ValueError, match=f"--config {re.escape(str(f))}: both {old} and {new} are given"):
        load_config(f, {})


def test_old_keys_in_a_recipe_still_work(tmp_path, monkeypatch, caplog):
    (tmp_path / "old.yaml").write_text("objective: dckd  # x\ndckd_reference_code: true  # x\n")
    monkeypatch.setattr("kdcache.train.recipe._dir", lambda: tmp_path)
    with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):
        values = recipe_values("old", TrainConfig)
    assert values == {"objective": "dckd", "dckd_released_code": True}
    assert _notes(caplog) == ["note: recipe old: dckd_reference_code is deprecated: use dckd_released_code "
                              "(the same option)"]


def test_old_keywords_of_the_python_api_still_work(caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.train.config"):
        cfg = TrainConfig(model="m", store="s", objective="adpa", adpa_reference_code=True, adpa_weight=1.0)
    assert cfg == TrainConfig(model="m", store="s", objective="adpa", adpa_released_code=True, adpa_weight=1.0)
    assert _notes(caplog) == ["note: TrainConfig: adpa_reference_code is deprecated: use adpa_released_code "
                              "(the same option)"]
    assert dataclasses.replace(cfg, lr=0.5).adpa_released_code is True  # copies go through the same __init__
