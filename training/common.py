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

# ---------------------------------------------------------------- recipes
# recipe I/O lives in `training/recipe_io.py` (free of torch); re-exported for existing callers
from .recipe_io import (RESUMABLE_KEYS, _deep_merge, _Loader, _opt, _resumable, flatten,  # noqa: E402,F401
                        get_by_path, load_recipe, parse_value, recipe_differences, save_recipe, set_by_path)


# ---------------------------------------------------------------- old names, now in their own modules

_MOVED = {
    "open_clip_cxr_train.accel": ("setup_accelerator", "_resolve_precision", "reset_accelerator_state", "init_tracking",
                       "unwrap", "move_to", "check_precision_env"),
    "open_clip_cxr_train.schedule": ("cosine_with_warmup",),
    "open_clip_cxr_train.checkpoints": ("TrainState", "CKPT_PREFIX", "_DONE", "list_checkpoints", "save_checkpoint",
                             "resume_from_checkpoint", "UnsafeCheckpointError", "load_custom_state_safely",
                             "_safe_custom_state", "keep_trainable_only", "data_seed"),
    "open_clip_cxr_train.throughput": ("flops_per_sample_transformer", "measure_forward_flops", "CPU_PEAK_DEFAULT",
                            "precision_name", "_dtype_name", "peak_flops", "peak_header", "Throughput"),
    "open_clip_cxr_train.logs": ("log_line", "progress_bar", "MetricsWriter"),
}
_WHERE = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str):
    """`common.X` for a name that moved out (imported on first use: no import cycle)."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
