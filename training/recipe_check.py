"""Check a training recipe before any work: unknown keys, wrong types, values out of range.

    check_recipe(recipe, "text")     # train-text; "clip" for train-clip
    # -> RecipeError (a user error: one line, exit 2), e.g.
    #    recipe key `train.epochz` is unknown: did you mean `train.epochs`?

Both stages call it first, before the accelerator, the run folder or any model exists, so a
refused run leaves nothing behind and the corrected rerun is not mistaken for "another recipe".

Where the schema comes from (no second copy of the defaults to drift):
- the valid keys and their types are read from the stage's shipped recipes
  (`training/recipes/<stage>-*.yaml`) and, for the CLIP stage, `clip_stage.DEFAULT_RECIPE`;
- `EXTRA_KEYS` adds the keys a stage reads in code that no shipped recipe spells out;
- `RANGES` and `CHOICES` hold the limits, matched by the key's pattern (`*.batch_size`);
- `HELP` gives a one-line meaning for the keys most often mistyped (printed with the error).
A value of `null` in every source leaves the key's type open. A key added to a stage must be
added to a shipped recipe or to `EXTRA_KEYS`, or recipes naming it are refused.
"""
from __future__ import annotations

import difflib
import fnmatch
import glob
import os
from typing import Any, Dict, List, Optional, Tuple

from open_clip_cxr.errors import UsageError

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


class RecipeError(UsageError):
    """A recipe key is unknown, or its value has the wrong type or lies out of range."""


_INT, _FLOAT, _STR, _BOOL, _LIST, _DICT = "int", "float", "str", "bool", "list", "dict"

# keys read in code that no shipped recipe names, with an example value (its type is the key's type)
_COMMON_EXTRA = {
    "base": "x.yaml", "seed": 0, "output_dir": "runs/x", "model": "x",
    # accepted at the top level too (training/common.py)
    "mixed_precision": "no", "log_with": "tensorboard", "cpu": False, "num_threads": 1,
    "gradient_accumulation_steps": 1,
    "train.cpu": False, "train.num_threads": 1, "train.mixed_precision": "no", "train.grad_accum_steps": 1,
    "train.gradient_accumulation_steps": 1, "train.log_every": 1, "train.checkpoint_every": 1,
    "train.stop_after": 1, "train.log_with": "tensorboard", "train.frozen_low_precision": True,
    "resolved": {},   # what `auto` precision/threads became, written into a run's saved recipe.yaml
}
_LORA = {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj"]}
EXTRA_KEYS: Dict[str, Dict[str, Any]] = {
    "text": {
        **_COMMON_EXTRA, "text_arch": "x", "max_length": 128, "train.max_tokens": 1,
        "data.source": "openi", "data.split": "train", "data.shards": "x", "data.path": "x", "data.limit": 1,
        **{f"data.{k}": "x" for k in ("report_col", "findings_col", "impression_col", "study_col",
                                      "patient_col", "split_col")},
        **{f"{s}.{k}": v for s in ("mntp", "supcon") for k, v in {
            "steps": 1, "batch_size": 1, "lr": 1e-4, "warmup_steps": 1, "min_lr_ratio": 0.1,
            "weight_decay": 0.0, "grad_clip": 1.0}.items()},
        **{f"{s}.lora.{k}": v for s in ("mntp", "supcon") for k, v in _LORA.items()},
        "mntp.mask_prob": 0.2, "mntp.mask_token": "_",
        "supcon.n_negatives": 2, "supcon.p_sections": 0.3, "supcon.temperature": 0.05, "supcon.symmetric": True,
        "supcon.instruction_prob": 0.0, "supcon.cache": True, "supcon.cache_reports": 1, "supcon.head_lr": 1e-3,
        "supcon.head_steps": 1, "supcon.max_variants": 1, "supcon.lora.layers": 2,
        "supcon.variants": "rules", "supcon.paraphraser": "x", "supcon.p_phrases": 0.0,
        "supcon.variant_styles": ["x"], "supcon.negative_seeds": 1,
        "eval.enabled": True, "eval.split": "validate", "eval.limit": 1, "eval.seed": 0, "eval.bf16": True,
    },
    "clip": {**_COMMON_EXTRA},
}
NULLABLE_SECTIONS = ("mntp.lora", "supcon.lora", "data.text_choice",
                     "mntp", "supcon", "eval", "data")
FREE_DICTS = ("data.text_choice", "train.compile", "resolved")   # dicts read as a whole (names -> shares; compile options)
# kinds a key takes besides the ones its examples show
EXTRA_KINDS = {"train.compile": {_DICT}, "train.log_with": {_LIST, _BOOL}, "log_with": {_LIST, _BOOL},
               "train.resume": {_BOOL},
               # shard lists: the demo and Python callers pass several patterns as a list
               "data.train": {_LIST}, "data.val": {_LIST}, "data.shards": {_LIST}}

# (low, low inclusive, high, high inclusive); None: unbounded. Patterns match the dotted key.
RANGES: List[Tuple[str, Tuple[Optional[float], bool, Optional[float], bool]]] = [
    ("*batch_size", (1, True, None, False)),
    ("*mask_prob", (0, False, 1, False)),
    ("*dropout", (0, True, 1, False)),
    ("*_prob", (0, True, 1, True)),
    ("*p_sections", (0, True, 1, True)),
    ("*min_lr_ratio", (0, True, 1, True)),
    ("*lr", (0, False, None, False)),
    ("*temperature", (0, False, None, False)),
    ("*weight_decay", (0, True, None, False)),
    ("*.eps", (0, False, None, False)),      # not "*eps": that would catch "*.steps"
    ("*grad_clip", (0, False, None, False)),
    ("*.steps", (0, True, None, False)),
    ("*head_steps", (0, True, None, False)),
    ("*warmup_steps", (0, True, None, False)),
    ("train.epochs", (1, True, None, False)),
    ("train.max_steps", (1, True, None, False)),
    ("*grad_accum_steps", (1, True, None, False)),
    ("*gradient_accumulation_steps", (1, True, None, False)),
    ("train.log_every", (1, True, None, False)),
    ("train.checkpoint_every", (0, True, None, False)),
    ("train.keep_last", (1, True, None, False)),
    ("train.max_tokens", (1, True, None, False)),
    ("train.stop_after", (0, True, None, False)),
    ("*num_threads", (1, True, None, False)),
    ("max_length", (1, True, None, False)),
    ("*lora.r", (1, True, None, False)),
    ("*lora.alpha", (0, False, None, False)),
    ("*lora.layers", (1, True, None, False)),
    ("data.num_workers", (0, True, None, False)),
    ("data.shuffle_buffer", (0, True, None, False)),
    ("data.epoch_samples", (1, True, None, False)),
    ("*limit", (1, True, None, False)),
    ("*cache_reports", (1, True, None, False)),
    ("*n_negatives", (0, True, None, False)),
    ("*max_variants", (1, True, None, False)),
]
_PRECISION = ("no", "fp32", "none", "false", "bf16", "bfloat16", "fp16", "float16", "auto")
CHOICES: Dict[str, Tuple[Any, ...]] = {
    "*mixed_precision": _PRECISION + (False,),
    "vision.mode": ("full", "lora", "locked"),
    "loss.name": ("clip", "siglip"),
    "data.resume": ("reseed", "skip"),
    "data.source": ("openi", "table"),
    "supcon.variants": ("rules", "llm", "both"),
}
AUTO_OK = ("*num_threads", "*mixed_precision")   # `auto` is a first-class value there

HELP = {
    "train.epochs": "passes over the training data",
    "train.max_steps": "stop after this many optimiser steps (null: epochs decide)",
    "train.mixed_precision": "no | bf16 | fp16 | auto",
    "train.num_threads": "torch CPU threads (null or auto: torch's default)",
    "train.log_with": "tensorboard, or null for no tracker",
    "data.batch_size": "samples per process per micro-batch",
    "data.train": "training shards: DIR/train-{000000..000009}.tar (several joined with ::)",
    "data.val": "validation shards, read at every epoch end (null: none)",
    "mntp.mask_prob": "share of tokens masked for MNTP, between 0 and 1",
    "mntp.batch_size": "reports per process per MNTP micro-batch",
    "supcon.batch_size": "anchors per process per contrastive micro-batch",
    "supcon.temperature": "contrastive softmax temperature, > 0",
}


# ---------------------------------------------------------------- the schema

def _kind(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, bool):
        return _BOOL
    if isinstance(v, int):
        return _INT
    if isinstance(v, float):
        return _FLOAT
    if isinstance(v, str):
        return _STR
    if isinstance(v, (list, tuple)):
        return _LIST
    return _DICT


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_DICTS:
            yield key, _DICT
            yield from _walk(v, key + ".")
        else:
            yield key, _kind(v)


def _shipped(stage: str) -> List[dict]:
    from training.common import load_recipe
    return [load_recipe(p) for p in sorted(glob.glob(os.path.join(RECIPES_DIR, f"{stage}-*.yaml")))]


_SCHEMAS: Dict[str, Dict[str, set]] = {}


def schema(stage: str) -> Dict[str, set]:
    """dotted key -> the set of kinds seen for it ('dict' for a section; None: seen as null)."""
    if stage not in _SCHEMAS:
        if stage not in EXTRA_KEYS:
            raise ValueError(f"stage {stage!r}: 'text' or 'clip'")
        sources = _shipped(stage) + [_nest(EXTRA_KEYS[stage])]
        if stage == "clip":
            from training.clip_stage import DEFAULT_RECIPE
            sources.append(DEFAULT_RECIPE)
        out: Dict[str, set] = {}
        for src in sources:
            for key, kind in _walk(src):
                out.setdefault(key, set()).add(kind)
                parts = key.split(".")
                for i in range(1, len(parts)):   # a section implied by a dotted extra key
                    out.setdefault(".".join(parts[:i]), set()).add(_DICT)
        for key, kinds in EXTRA_KINDS.items():
            if key in out:
                out[key] |= kinds
        _SCHEMAS[stage] = out
    return _SCHEMAS[stage]


def _nest(flat: Dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


# ---------------------------------------------------------------- the check

def _fail(key: str, problem: str) -> None:
    tip = HELP.get(key)
    raise RecipeError(f"recipe key `{key}`: {problem}" + (f" ({key}: {tip})" if tip else ""))


def _match(key: str, patterns) -> Optional[str]:
    return next((p for p in patterns if fnmatch.fnmatchcase(key, p)), None)


def _check_value(key: str, value: Any, kinds: set) -> None:
    if value is None or (isinstance(value, str) and value == "auto" and _match(key, AUTO_OK)):
        return
    choice = _match(key, CHOICES)
    if choice:
        ok = CHOICES[choice]
        if value not in ok or (isinstance(value, bool) and False not in ok):
            _fail(key, f"{value!r} is not one of {', '.join(str(c) for c in ok if c is not False)}")
        return
    typed = kinds - {None}
    if not typed:
        return                                   # null everywhere: open
    kind = _kind(value)
    if kind == _INT and _FLOAT in typed:
        kind = _FLOAT                            # 1 where 1.0 is meant
    if kind == _DICT and key in FREE_DICTS:
        return
    if kind not in typed:
        want = " or ".join(sorted({_FLOAT: "a number", _INT: "a whole number", _BOOL: "true/false",
                                   _STR: "a string", _LIST: "a list", _DICT: "a section (key: value lines)"}[k]
                                  for k in typed))
        _fail(key, f"expected {want}, got {value!r}")
    rng = _match(key, [p for p, _ in RANGES])
    if rng and kind in (_INT, _FLOAT):
        lo, lo_in, hi, hi_in = dict(RANGES)[rng]
        if (lo is not None and (value < lo or (value == lo and not lo_in))) or \
                (hi is not None and (value > hi or (value == hi and not hi_in))):
            lo_s = "" if lo is None else f"{lo} {'<=' if lo_in else '<'} "
            hi_s = "" if hi is None else f" {'<=' if hi_in else '<'} {hi}"
            _fail(key, f"{value!r} is out of range (needs {lo_s}{key.rsplit('.', 1)[-1]}{hi_s})")


def _unknown(key: str, known: Dict[str, set]) -> None:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(leaf, [s.rsplit(".", 1)[-1] for s in siblings], n=1, cutoff=0.7)
    if near:
        near = [f"{parent}.{near[0]}" if parent else near[0]]
    else:   # the right name in another section (`train.batch_size` for `data.batch_size`)
        near = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    if near:
        raise RecipeError(f"recipe key `{key}` is unknown: did you mean `{near[0]}`?")
    names = ", ".join(sorted(s.rsplit(".", 1)[-1] for s in siblings))
    raise RecipeError(f"recipe key `{key}` is unknown" + (f"; valid keys here: {names}" if names else ""))


def check_recipe(recipe: dict, stage: str) -> dict:
    """Raise `RecipeError` at the first unknown key or bad value of `recipe` (a nested dict,
    after `base:` and `--set`); returns `recipe` unchanged."""
    known = schema(stage)

    def visit(d: dict, prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key not in known:
                _unknown(key, known)
            kinds = known[key]
            if isinstance(v, dict) and _DICT in kinds and key not in FREE_DICTS:
                visit(v, key + ".")
            elif v is None and _DICT in kinds:
                if key not in NULLABLE_SECTIONS:
                    _fail(key, "is empty; give its keys or leave it out")
            elif _DICT in kinds and kinds - {None} == {_DICT} and key not in FREE_DICTS:
                _fail(key, f"expected a section (key: value lines), got {v!r}")
            else:
                _check_value(key, v, kinds)

    if not isinstance(recipe, dict):
        raise RecipeError(f"a recipe is a YAML mapping of keys to values, got {type(recipe).__name__}")
    visit(recipe, "")
    return recipe


def check_before_work(recipe: dict, stage: str) -> dict:
    """What a stage calls first: the recipe's keys and values, then its data (`preflight`)."""
    from training.preflight import check_training_data
    check_recipe(recipe, stage)
    check_training_data(recipe, stage)
    return recipe
