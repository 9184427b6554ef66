"""A stage's recipe, checked and completed before any work: unknown keys, wrong types, values
out of range are refused; every key left out gets its default (`training/recipe_schema.py`).

    recipe = resolve("training/recipes/clip-cxr-llm-small-cpu.yaml", ["optim.grad_clip=0.5"], "clip")
    recipe = resolve_recipe(a_dict, "text")     # the same from a dict (after `base:` and `--set`)
    typed(recipe, "clip").train.epochs          # a resolved recipe as frozen dataclasses
    check_recipe(a_dict, "text")                # only the refusals
    # -> RecipeError (a user error: one line, exit 2), e.g.
    #    recipe key `train.epochz` is unknown: did you mean `train.epochs`?

Both stages call `check_before_work` first (the recipe, then the data: `training/preflight.py`),
before the accelerator, the run folder or any model exists, so a refused run leaves nothing
behind and the corrected rerun is not mistaken for "another recipe". The resolved recipe is
what the stage reads and what the run folder keeps (`recipe.yaml`, with its `resolved:` block).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import keyword
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from open_clip_cxr.errors import UsageError
from open_clip_cxr_train.recipe_io import get_by_path, load_recipe, set_by_path
from open_clip_cxr_train.recipe_schema import ALIASES, RUN_KEYS, Field, Section, schema, walk


class RecipeError(UsageError):
    """A recipe key is unknown, or its value has the wrong type or lies out of range."""


_WANT = {"float": "a number", "int": "a whole number", "bool": "true/false", "str": "a string",
         "list": "a list", "dict": "a section (key: value lines)"}


def _fail(key: str, problem: str, spec=None) -> None:
    tip = f" ({key}: {spec.help})" if spec is not None else ""
    raise RecipeError(f"recipe key `{key}`: {problem}{tip}")


def _kind(v: Any) -> str:
    for kind, t in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", (list, tuple)),
                    ("dict", dict)):
        if isinstance(v, t):
            return kind
    return type(v).__name__


def _value(key: str, v: Any, spec: Field) -> Any:
    """`v` checked against `spec`; returns it (an int where a float is meant becomes a float)."""
    if v is None:
        if not spec.null:
            _fail(key, "may not be null; give a value or leave the key out for its default", spec)
        return v
    if spec.auto and v == "auto":
        return v
    if spec.choices:
        if v not in spec.choices or (isinstance(v, bool) and False not in spec.choices):
            _fail(key, f"{v!r} is not one of {', '.join(str(c) for c in spec.choices if c is not False)}", spec)
        return v
    kind = _kind(v)
    if kind == "int" and "float" in spec.kinds and "int" not in spec.kinds:
        v, kind = float(v), "float"             # 1 where 1.0 is meant
    if kind not in spec.kinds:
        want = " or ".join(sorted(_WANT[k] for k in spec.kinds)) + (" or auto" if spec.auto else "")
        _fail(key, f"expected {want}, got {v!r}", spec)
    if spec.rng and kind in ("int", "float"):
        lo, lo_in, hi, hi_in = spec.rng
        if (lo is not None and (v < lo or (v == lo and not lo_in))) or \
                (hi is not None and (v > hi or (v == hi and not hi_in))):
            lo_s = "" if lo is None else f"{lo} {'<=' if lo_in else '<'} "
            hi_s = "" if hi is None else f" {'<=' if hi_in else '<'} {hi}"
            _fail(key, f"{v!r} is out of range (needs {lo_s}{key.rsplit('.', 1)[-1]}{hi_s})", spec)
    return list(v) if kind == "list" else v


def _unknown(key: str, table: Dict[str, Any], stage: str) -> None:
    parent, _, leaf = key.rpartition(".")
    near = difflib.get_close_matches(leaf, list(table), n=1, cutoff=0.7)
    if near:
        near = [f"{parent}.{near[0]}" if parent else near[0]]
    else:   # the right name in another section (`train.batch_size` for `data.batch_size`)
        near = [k for k, _ in walk(stage) if k.rsplit(".", 1)[-1] == leaf][:1]
    if near:
        raise RecipeError(f"recipe key `{key}` is unknown: did you mean `{near[0]}`?")
    names = ", ".join(sorted(table))
    raise RecipeError(f"recipe key `{key}` is unknown" + (f"; valid keys here: {names}" if names else ""))


def _section(d: Any, table: Dict[str, Any], prefix: str, stage: str) -> dict:
    """The user's keys of one section, checked, with its defaults filled in."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        spec = table.get(k)
        if spec is None:
            _unknown(key, table, stage)
        if isinstance(spec, Section):
            if v is None and spec.null:
                out[k] = None
            elif v is None and spec.empty_null:
                out[k] = _section({}, spec.fields, key + ".", stage)
            elif v is None:
                _fail(key, "is empty; give its keys or leave it out", spec)
            elif not isinstance(v, dict):
                _fail(key, f"expected a section (key: value lines), got {v!r}", spec)
            else:
                out[k] = _section(v, spec.fields, key + ".", stage)
        else:
            out[k] = _value(key, v, spec)
    for k, spec in table.items():     # defaults of what was left out
        if k not in out:
            if isinstance(spec, Section):
                out[k] = None if spec.default_null else _section({}, spec.fields, f"{prefix}{k}.", stage)
            else:
                out[k] = copy.deepcopy(spec.default)
    return out


def _fold_aliases(recipe: dict) -> dict:
    """Old spellings (`mixed_precision:` at the top) moved to their key, which wins if given."""
    recipe = copy.deepcopy(recipe)
    for alias, key in ALIASES.items():
        parent, _, leaf = alias.rpartition(".")
        holder = get_by_path(recipe, parent) if parent else recipe
        if not isinstance(holder, dict) or leaf not in holder:
            continue
        value = holder.pop(leaf)
        section, _, name = key.rpartition(".")
        target = recipe.get(section)
        if target is not None and not isinstance(target, dict):
            continue                  # `train: 3` is refused as it stands
        present = isinstance(target, dict) and name in target
        # an explicit `train.log_with: null` means no tracker; other keys treat null as unset
        if not present or (target[name] is None and key != "train.log_with"):
            set_by_path(recipe, key, value)
    return recipe


def resolve_recipe(recipe: dict, stage: str) -> dict:
    """`recipe` (a nested dict, after `base:` and `--set`) checked against the stage's schema,
    every key left out at its default: what the stage reads and the run folder keeps. Raises
    `RecipeError` at the first unknown key or bad value. Resolving twice changes nothing."""
    if not isinstance(recipe, dict):
        raise RecipeError(f"a recipe is a YAML mapping of keys to values, got {type(recipe).__name__}")
    table = schema(stage)
    user = _fold_aliases(recipe)
    run_keys = {k: user.pop(k) for k in list(user) if k in RUN_KEYS}
    if run_keys.get("resolved") is not None and not isinstance(run_keys["resolved"], dict):
        _fail("resolved", f"expected a section (key: value lines), got {run_keys['resolved']!r}")
    out = _section(user, table, "", stage)
    if stage == "text" and out["data"]["source"] not in _source_names():
        _fail("data.source", f"{out['data']['source']!r} is not a registered report source; use one of "
                             f"{', '.join(_source_names())} (or register a reader: open_clip_cxr.data.registry)")
    if stage == "text" and out["supcon"]["head_lr"] is None:
        out["supcon"]["head_lr"] = 10 * out["supcon"]["lr"]       # the pooler starts random: a faster rate
    if run_keys.get("resolved") is not None:
        out["resolved"] = run_keys["resolved"]
    return out


def _source_names() -> List[str]:
    """The report sources stage 1 can read: every registered one (a new dataset's reader counts)."""
    from open_clip_cxr.data.registry import sources
    return list(sources())


def check_recipe(recipe: dict, stage: str) -> dict:
    """Raise `RecipeError` at the first unknown key or bad value of `recipe`; returns `recipe` unchanged."""
    resolve_recipe(recipe, stage)
    return recipe


def resolve(path: Optional[str], sets: Iterable[str] = (), stage: str = "clip") -> dict:
    """A recipe file (with its `base:`) and `--set KEY=VALUE` overrides, resolved for `stage`."""
    return resolve_recipe(load_recipe(path, sets), stage)


def resolve_typed(path: Optional[str], sets: Iterable[str] = (), stage: str = "clip"):
    """(resolved dict, the same as the stage's dataclass: `typed`)."""
    recipe = resolve(path, sets, stage)
    return recipe, typed(recipe, stage)


def check_before_work(recipe: dict, stage: str) -> dict:
    """What a stage calls first: the recipe resolved (keys, values, defaults), then its data
    checked (`preflight`). Returns the resolved recipe."""
    from open_clip_cxr_train.preflight import check_training_data
    resolved = resolve_recipe(recipe, stage)
    if stage == "text":               # never train on a test split or on what is evaluated
        from open_clip_cxr_train.supcon import training_split
        try:
            training_split(resolved)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        scfg = resolved.get("supcon") or {}
        for key, off in (("negative_weight", 1.0), ("fact_weight", 0.0), ("llm_variant_p", 0.0),
                         ("section_negatives", False)):  # pairs only
            if scfg.get("views", 2) > 2 and float(scfg.get(key, off)) != off:
                shown = str(off).lower() if isinstance(off, bool) else f"{off:g}"   # as a recipe writes it
                raise RecipeError(f"`supcon.{key}` applies to pairs (supcon.views: 2); set it to {shown} with views > 2")
        if float(scfg.get("llm_variant_p", 0.0)) and scfg.get("variants", "rules") != "both":
            raise RecipeError("`supcon.llm_variant_p` weighs LLM rewrites against rule rewrites: set supcon.variants "
                              "to both, or llm_variant_p to 0")
        if scfg.get("paraphraser_cache") and scfg.get("variants", "rules") == "rules":   # would be ignored
            raise RecipeError("`supcon.paraphraser_cache` holds LLM rewrites, which supcon.variants: rules does not use: "
                              "set supcon.variants to llm or both, or drop the cache key")
        if scfg.get("variants", "rules") != "rules":    # the paraphraser is found now, not after the MNTP steps
            if not scfg.get("paraphraser"):
                raise RecipeError(f"supcon.variants: {scfg['variants']} needs supcon.paraphraser (a local causal LM)")
            from open_clip_cxr.asset_packages import find_local_model
            try:
                find_local_model(scfg["paraphraser"], scfg.get("paraphraser_gguf"), label="supcon.paraphraser")
            except FileNotFoundError as e:
                raise RecipeError(str(e)) from None
            shared = scfg.get("paraphraser_cache")
            if shared and Path(shared).exists() and not Path(shared).is_dir():
                raise RecipeError(f"`supcon.paraphraser_cache` {shared} is a file, not a folder: name a folder "
                                  "(it is made if missing)")
        if float(scfg.get("fact_cosine_scale", 0.0)) and not float(scfg.get("fact_weight", 0.0)):
            raise RecipeError("`supcon.fact_cosine_scale` shapes the fact head, which is off: set supcon.fact_weight > 0")
        if scfg.get("views", 2) > 2 and scfg.get("instruction_prob"):   # every view is a query: no anchor
            raise RecipeError("`supcon.views` > 2 has no anchor to instruct: set supcon.instruction_prob to 0")
        if scfg.get("token_dropout") and not scfg.get("cache"):   # the uncached tower has no token mask to drop
            raise RecipeError("`supcon.token_dropout` works on cached texts: set supcon.cache to true or token_dropout to 0")
    check_training_data(resolved, stage)
    return resolved


# ---------------------------------------------------------------- the typed view

_PY = {"int": int, "float": float, "bool": bool, "str": str, "list": List[Any], "dict": Dict[str, Any]}
_CLASSES: Dict[str, type] = {}


def _annotation(spec: Field):
    types = [_PY[k] for k in sorted(spec.kinds)] + ([str] if spec.auto and "str" not in spec.kinds else [])
    t = Union[tuple(types)] if len(types) > 1 else types[0]
    return Optional[t] if spec.null else t


def _attr(key: str) -> str:
    """The dataclass attribute of a key: `from` (a Python keyword) is `from_`."""
    return key + "_" if keyword.iskeyword(key) else key


def _dataclass(name: str, table: Dict[str, Any]) -> type:
    fields = []
    for key, spec in table.items():
        meta = {"help": spec.help}
        if isinstance(spec, Section):
            sub = _dataclass(name + "_" + key, spec.fields)
            fields.append((_attr(key), Optional[sub] if spec.null else sub, dataclasses.field(metadata=meta)))
        else:
            fields.append((_attr(key), _annotation(spec), dataclasses.field(metadata={**meta, "range": spec.rng,
                                                                             "choices": spec.choices})))
    return dataclasses.make_dataclass(name, fields, frozen=True)


def recipe_class(stage: str) -> type:
    """The stage's recipe as a frozen dataclass (one nested dataclass per section; the help in
    each field's metadata), e.g. `TextRecipe`, `ClipRecipe`."""
    if stage not in _CLASSES:
        _CLASSES[stage] = _dataclass(stage.capitalize() + "Recipe", schema(stage))
    return _CLASSES[stage]


def typed(recipe: dict, stage: str):
    """A resolved recipe (`resolve_recipe`) as the stage's dataclass (`text.from`
    is the attribute `text.from_`)."""
    def build(cls, table, d):
        kw = {}
        for key, spec in table.items():
            v = d.get(key)
            if isinstance(spec, Section) and v is not None:
                sub = next(f.type for f in dataclasses.fields(cls) if f.name == _attr(key))
                sub = [a for a in getattr(sub, "__args__", (sub,)) if a is not type(None)][0]
                v = build(sub, spec.fields, v)
            kw[_attr(key)] = v
        return cls(**kw)
    return build(recipe_class(stage), schema(stage), recipe)


# ---------------------------------------------------------------- --help-recipe

def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def help_rows(stage: str) -> List[tuple]:
    """(dotted key, type, default, help) of every key of the stage, in recipe order."""
    rows = []
    for key, spec in walk(stage):
        if isinstance(spec, Section):
            rows.append((key + ":", "section" + (" | null" if spec.null else ""),
                         "null" if spec.default_null else "", spec.help))
        else:
            rows.append((key, spec.type_name(), _show(spec.default), spec.help))
    rows += [(k, "dict" if k == "resolved" else "str", "", h) for k, h in RUN_KEYS.items()]
    return rows


def help_text(stage: str, markdown: bool = False) -> str:
    """Every key of the stage's recipe, one per line (or a Markdown table, as in the README)."""
    rows = help_rows(stage)
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")     # noqa: E731
        return "\n".join(["| key | type | default | meaning |", "| --- | --- | --- | --- |"] +
                         [f"| `{k}` | {esc(t)} | {esc(d)} | {esc(h)} |" for k, t, d, h in rows])
    wk = max(len(r[0]) for r in rows)
    wt = min(max(len(r[1]) for r in rows), 24)
    lines = [f"recipe keys of train-{stage} (--set KEY=VALUE; a recipe YAML nests them by the dots):"]
    for k, t, d, h in rows:
        lines.append(f"  {k:<{wk}}  {t:<{wt}}  {('default ' + d) if d else '':<22}  {h}")
    return "\n".join(lines)


if __name__ == "__main__":          # python -m open_clip_cxr_train.recipe_check [--markdown]: the README's tables
    import sys
    md = "--markdown" in sys.argv
    for i, stage in enumerate(("text", "clip")):
        print(("\n" if i else "") + (f"**train-{stage}**\n" if md else "") + help_text(stage, markdown=md))
