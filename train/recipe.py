"""Recipes: each paper's published setting as one YAML file of TrainConfig values
(`train/recipes/NAME.yaml`, shipped as package data), every value citing its source.

`kdcache train --recipe NAME` (or `recipe: NAME` in a config file) resolves in layers, lowest
first: the recipe, the `--config` file, explicit flags. The resolved config is what a run
saves in its output directory, so the recipe's values are recorded there too.
"""

from __future__ import annotations

import dataclasses
from importlib import resources

import yaml


def _dir():
    return resources.files("kdcache.train") / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _dir().iterdir() if p.name.endswith(".yaml"))


RECIPE_HELP = (
    "a paper's published setting, below --config and flags: "
    + ", ".join(available_recipes())
    + " (files in kdcache/train/recipes/, each value cites its source)"
)


def recipe_values(name: str, config_cls: type | None = None) -> dict:
    """The config values of recipe `name`; unknown names are refused, and keys that are not
    fields of `config_cls` (TrainConfig; passed in, as config.py imports this module for
    its help text)."""
    names = available_recipes()
    if name not in names:
        raise ValueError(f"unknown recipe {name!r}: available recipes are {', '.join(names)}")
    values = yaml.safe_load((_dir() / f"{name}.yaml").read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {name}: expected a YAML mapping of TrainConfig fields")
    if config_cls is not None and hasattr(config_cls, "upgrade_keys"):  # a key renamed since
        values = config_cls.upgrade_keys(values, f"recipe {name}")
    known = {f.name for f in dataclasses.fields(config_cls)} - {"recipe"} if config_cls else set(values)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {name}: unknown keys {unknown}; valid keys are the TrainConfig fields")
    return values


def with_recipe(values: dict, config_cls: type) -> dict:
    """`values` (config file + flags) over the values of the recipe they name, if any."""
    name = values.get("recipe")
    return {**recipe_values(name, config_cls), **values} if name else dict(values)
