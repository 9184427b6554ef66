"""Exported OpenCLIP folders as tower sources: their config, weights and provenance, and whether
a tower's normalisation layers still hold their initial values (see `training/towers.py`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

FOLDER_SCHEMAS = ("local-dir:", "hf-hub:")
CONFIG_NAME = "open_clip_config.json"


def is_folder(spec: Optional[str]) -> bool:
    return isinstance(spec, str) and spec.startswith(FOLDER_SCHEMAS)


# ---------------------------------------------------------------- folders

def folder_config(spec: str) -> dict:
    """The `open_clip_config.json` of a `local-dir:` or `hf-hub:` folder."""
    if spec.startswith("local-dir:"):
        path = Path(spec[len("local-dir:"):]) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no {CONFIG_NAME} there (is it an exported OpenCLIP folder?)")
        return json.loads(path.read_text())
    from open_clip.factory import _get_hf_config
    return _get_hf_config(spec[len("hf-hub:"):])


def folder_state_dict(spec: str) -> dict:
    """The weights of a `local-dir:` / `hf-hub:` folder (safetensors, or torch.load with weights_only)."""
    from open_clip.factory import _find_checkpoint_in_dir, download_pretrained_from_hf, load_state_dict
    if spec.startswith("local-dir:"):
        path = _find_checkpoint_in_dir(Path(spec[len("local-dir:"):]))
        if not path:
            raise FileNotFoundError(f"{spec}: no weights file (open_clip_model.safetensors) in the folder")
    else:
        path = download_pretrained_from_hf(spec[len("hf-hub:"):])
    return load_state_dict(str(path), weights_only=True)


def sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_provenance(spec: str) -> Optional[dict]:
    return folder_config(spec).get("provenance")


def write_provenance(folder, provenance: dict) -> None:
    """Add `provenance` to an exported folder's `open_clip_config.json` (OpenCLIP reads only
    `model_cfg` and `preprocess_cfg` from it)."""
    path = Path(folder) / CONFIG_NAME
    cfg = json.loads(path.read_text())
    cfg["provenance"] = provenance
    path.write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------- is a tower at its initialisation?

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def norms_at_init(module: nn.Module) -> Optional[bool]:
    """True when every normalisation layer of `module` still holds initial values (weights one
    constant, 1 or 0 as some nets start their last norm of a block; biases 0; BatchNorm running
    mean 0 and variance 1), False when any moved, None when it has none (nothing can be said)."""
    found = False
    for m in module.modules():
        if not isinstance(m, NORM_TYPES) and not type(m).__name__.endswith(("Norm", "Norm2d")):
            continue
        checks = ((getattr(m, "weight", None), (0.0, 1.0)), (getattr(m, "bias", None), (0.0,)),
                  (getattr(m, "running_mean", None), (0.0,)), (getattr(m, "running_var", None), (1.0,)))
        for t, allowed in checks:
            if not isinstance(t, torch.Tensor) or not t.numel() or t.device.type == "meta":
                continue
            found = True
            t = t.detach().float()
            if not (bool((t == t.flatten()[0]).all()) and float(t.flatten()[0]) in allowed):
                return False
    return True if found else None
