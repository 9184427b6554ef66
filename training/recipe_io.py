"""Recipe files in and out: YAML with `base:`, `--set` overrides, the run folder's saved copy.

    recipe = load_recipe("training/recipes/clip-cxr-llm-small-cpu.yaml", ["optim.grad_clip=0.5"])
    save_recipe(recipe, "runs/x/recipe.yaml")     # refuses a folder that holds a run of another recipe

These read and write plain nested dicts and know nothing of a stage; `training/recipe_check.py`
turns one into a stage's resolved recipe (typed, checked, every default filled). Free of torch,
so `--help-recipe` and the card writer (`hub_cards/card.py`) load it at once.
"""
from __future__ import annotations

import os

from typing import Any, Dict, List, Optional

import yaml

# the YAML side (base:, --set, `1e-4` as a float) is the library's, shared with the card writer
from open_clip_cxr.recipe_files import (_FLOAT, _deep_merge, _Loader, get_by_path, load_recipe,  # noqa: F401
                                        parse_value, read_yaml, set_by_path)

# keys that may change when a run resumes: speed, logging, evaluation and the run's length
# (a finished run resumed with more steps trains on), not what is being learned
# (precision and threads are speed: an old run saved with `bf16` resumes under `auto`)
RESUMABLE_KEYS = ("output_dir", "train.num_threads", "train.mixed_precision", "resolved.",
                  "train.log_every", "train.log_with", "train.checkpoint_every",
                  "train.max_tokens", "train.max_steps", "train.epochs", "train.stop_after", "train.compile",
                  "data.num_workers",
                  "eval.", "*.steps")

def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) or (r.startswith("*") and key.endswith(r[1:]))
               for r in RESUMABLE_KEYS)

def recipe_differences(saved: dict, recipe: dict) -> List[str]:
    """Keys (dotted) whose values differ between two recipes, `RESUMABLE_KEYS` left out."""
    a, b = flatten(saved), flatten(yaml.safe_load(yaml.safe_dump(recipe)))   # compare as saved
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _resumable(k))

def _stage_of(recipe: dict) -> Optional[str]:
    """The stage a resolved recipe belongs to (its sections say: every resolved text recipe
    has `mntp` and `supcon`, every clip recipe `vision` and `loss`), else None."""
    if isinstance(recipe.get("vision"), dict) and isinstance(recipe.get("loss"), dict):
        return "clip"
    if "mntp" in recipe and "supcon" in recipe:
        return "text"
    return None

def saved_differences(path: str, recipe: dict, defaults: Optional[dict] = None,
                      stage: Optional[str] = None) -> List[str]:
    """`recipe_differences` between the recipe saved at `path` (its gaps filled from `defaults`,
    or else from the stage's `recipe_schema.saved_defaults`) and `recipe`; [] when none is saved."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    if defaults is None:
        stage = stage or _stage_of(recipe)
        if stage:
            from open_clip_cxr_train.recipe_schema import saved_defaults
            defaults = saved_defaults(stage)
    return recipe_differences(_deep_merge(defaults, saved) if defaults else saved, recipe)

def save_recipe(recipe: dict, path: str, defaults: Optional[dict] = None, stage: Optional[str] = None) -> None:
    """Write a run's recipe. A run folder resumes from its checkpoints, so a recipe that differs
    from the one already there (other than in `RESUMABLE_KEYS`) is refused rather than mixed in.
    `defaults` fill the saved recipe's gaps first: a run written before a key existed resumes
    under that key's default, instead of being refused after an upgrade. Without `defaults`, a
    resolved stage recipe (`stage`, or told by its sections) fills them with what the stage did
    when the key was absent (`recipe_schema.saved_defaults`)."""
    diff = saved_differences(path, recipe, defaults, stage)
    if diff:
        raise ValueError(f"{os.path.dirname(os.path.abspath(path))} holds a run of another recipe "
                         f"(it differs in {', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}): "
                         f"rerun with the same recipe to resume, or give a new output folder")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False, default_flow_style=False)

def flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; non-scalars become strings (TensorBoard hparams want scalars)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out

def _opt(recipe: dict, *keys: str, default=None):
    """The first of `keys` (dotted) set to a value other than null, else `default`."""
    for k in keys:
        v = get_by_path(recipe, k)
        if v is not None:
            return v
    return default
