"""Recipe I/O shared by the text stage and the CLIP stage.

    recipe = load_recipe("training/recipes/clip-cxr-llm-small-cpu.yaml", ["optim.lr=1e-4"])

The rest of the training infrastructure lives in one module per job (see the README's
"How a training step flows"): `accel` (accelerator, precision, trackers), `schedule`,
`checkpoints` (state, save/resume, run lock), `throughput` (FLOPs, peak, MFU), `logs` (log
lines, progress bar, metrics.jsonl) and `loop` (the one step loop). Their names are still
importable from here (`common.TrainState`, ...) for older callers; new code imports them from
their modules.
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Any, Dict, Iterable, List, Optional

import yaml

# ---------------------------------------------------------------- recipes

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


def load_recipe(path: Optional[str], overrides: Iterable[str] = ()) -> dict:
    """Read a YAML recipe and apply `a.b.c=value` overrides (values typed by `parse_value`).

    A recipe may name `base: other.yaml` (relative to itself); its keys are read first and
    deep-merged under this one's.
    """
    recipe: dict = {}
    if path:
        with open(path) as f:
            recipe = yaml.load(f, Loader=_Loader) or {}
        base = recipe.pop("base", None)
        if base:
            base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
            recipe = _deep_merge(load_recipe(base_path), recipe)
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        set_by_path(recipe, key.strip(), parse_value(value))
    return recipe


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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


def save_recipe(recipe: dict, path: str, defaults: Optional[dict] = None) -> None:
    """Write a run's recipe. A run folder resumes from its checkpoints, so a recipe that differs
    from the one already there (other than in `RESUMABLE_KEYS`) is refused rather than mixed in.
    `defaults` fill the saved recipe's gaps first: a run written before a key existed resumes
    under that key's default, instead of being refused after an upgrade."""
    if os.path.exists(path):
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        diff = recipe_differences(_deep_merge(defaults, saved) if defaults else saved, recipe)
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


# ---------------------------------------------------------------- accelerator

def _opt(recipe: dict, *keys: str, default=None):
    for k in keys:
        v = get_by_path(recipe, k)
        if v is not None:
            return v
    return default


# ---------------------------------------------------------------- old names, now in their own modules

_MOVED = {
    "training.accel": ("setup_accelerator", "_resolve_precision", "reset_accelerator_state", "init_tracking",
                       "unwrap", "move_to", "check_precision_env"),
    "training.schedule": ("cosine_with_warmup",),
    "training.checkpoints": ("TrainState", "CKPT_PREFIX", "_DONE", "list_checkpoints", "save_checkpoint",
                             "resume_from_checkpoint", "UnsafeCheckpointError", "load_custom_state_safely",
                             "_safe_custom_state", "keep_trainable_only", "data_seed"),
    "training.throughput": ("flops_per_sample_transformer", "measure_forward_flops", "CPU_PEAK_DEFAULT",
                            "precision_name", "_dtype_name", "peak_flops", "peak_header", "Throughput"),
    "training.logs": ("log_line", "progress_bar", "MetricsWriter"),
}
_WHERE = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str):
    """`common.X` for a name that moved out (imported on first use: no import cycle)."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
