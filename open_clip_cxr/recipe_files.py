"""YAML files with `base:` and `KEY=VALUE` overrides, as nested dicts (torch-free).

    cfg = load_recipe("recipe.yaml", ["optim.lr=1e-4"])   # base: read first, overrides typed

The training wing's recipes (`training/recipe_io.py`, `recipe_check.py`) and the card writer
(`hub_cards/card.py`) both read recipes through this, so a `base:` means the same everywhere;
it lives in the library because both wings sit above it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Optional

import yaml

from open_clip_cxr.errors import UsageError

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """Type inference for a command-line override: int, float, bool, null, list/dict, else str."""
    text = text.strip()
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def set_by_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def get_by_path(d: dict, dotted: str, default: Any = None) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def read_yaml(path: str) -> Any:
    """One YAML file as written (no `base:`), `1e-4` read as a float. A missing file or broken
    YAML is a `UsageError` naming the file (one line at the command line, not a traceback)."""
    if not os.path.isfile(path):
        raise UsageError(f"recipe {path} does not exist: give the path of a YAML recipe "
                         "(the shipped ones are in training/recipes/)")
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"recipe {path} is not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None


def load_recipe(path: Optional[str], overrides: Iterable[str] = ()) -> dict:
    """Read a YAML recipe and apply `a.b.c=value` overrides (values typed by `parse_value`).

    A recipe may name `base: other.yaml` (relative to itself); its keys are read first and
    deep-merged under this one's.
    """
    recipe: dict = {}
    if path:
        recipe = read_yaml(path) or {}
        if not isinstance(recipe, dict):
            raise UsageError(f"{path}: a recipe is a YAML mapping of keys to values, got {type(recipe).__name__}")
        base = recipe.pop("base", None)
        if base:
            base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
            recipe = _deep_merge(load_recipe(base_path), recipe)
    for item in overrides or ():
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not KEY=VALUE: write e.g. --set train.epochs=3")
        key, value = item.split("=", 1)
        set_by_path(recipe, key.strip(), parse_value(value))
    return recipe


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
