"""Reading checkpoints safely and loading them into OpenCLIP models with clear errors.

Only safetensors and `torch.load(..., weights_only=True)` are used, so a checkpoint can never run
code. A DeepSpeed ZeRO folder is consolidated with DeepSpeed's own `zero_to_fp32` when it is
installed.
"""
import copy
import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import torch

PathLike = Union[str, Path]
_WRAPPER_KEYS = ("state_dict", "module", "model", "model_state_dict")
_CONSOLIDATED_NAMES = ("open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin",
                       "consolidated.pt", "consolidated.pth", "model.pt", "model.pth")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model it is loaded into."""


def _torch_load(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickles holding more than tensors (e.g. DeepSpeed model states)
        raise RuntimeError(
            f"{path} could not be read with torch.load(weights_only=True): {e}. Only plain tensor "
            f"checkpoints are read (no pickled objects). For a DeepSpeed checkpoint pass its folder "
            f"(consolidated with zero_to_fp32), or re-save the weights as safetensors.") from e


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The tensor dict inside common wrappers ({'state_dict': ...}, {'module': ...}, DDP 'module.')."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise TypeError(f"expected a dict of tensors, got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_zero_dir(path: Path) -> bool:
    return (path / "latest").is_file() or any(path.glob("*/*_model_states.pt")) or any(path.glob("*_model_states.pt"))


def _zero_to_fp32(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ImportError(
            f"{path} is a DeepSpeed ZeRO checkpoint folder; consolidating it needs deepspeed "
            f"(`pip install deepspeed`), or run `python -m deepspeed.utils.zero_to_fp32 {path} "
            f"{path / 'pytorch_model.bin'}` where it is installed and pass that file") from e
    return get_fp32_state_dict_from_zero_checkpoint(str(path))


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.safetensors, .bin/.pt/.pth), a folder of safetensors, a
    folder holding one consolidated file, or a DeepSpeed ZeRO folder."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return unwrap_state_dict(_torch_load(path))
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for name in _CONSOLIDATED_NAMES:
        if (path / name).is_file():
            return read_state_dict(path / name)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    if _is_zero_dir(path):
        return unwrap_state_dict(_zero_to_fp32(path))
    raise FileNotFoundError(f"no checkpoint file in {path} (looked for {', '.join(_CONSOLIDATED_NAMES)}, "
                            f"*.safetensors, a DeepSpeed ZeRO folder)")


def _sample(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def has_lora_keys(keys: Iterable[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


def _merge_tower_lora(model) -> bool:
    from .export import text_tower
    tower = text_tower(model)
    if tower is None or not tower.has_lora:
        return False
    tower.merge_lora()
    return True


@torch.no_grad()
def load_clip_state(model, state: Dict[str, torch.Tensor], source: str = "checkpoint", strict: bool = True):
    """Load `state` into an OpenCLIP model, explaining any mismatch.

    A merged checkpoint (no LoRA tensors) loads into a model built with LoRA by merging the
    model's (still untrained) adapters first, so `--model cxr-llm --pretrained merged.safetensors`
    works. Returns (missing, unexpected) when `strict` is False.
    """
    target = model.state_dict()
    if not has_lora_keys(state) and has_lora_keys(target) and not set(state) & {
            k for k in target if ".base_layer." in k}:
        _merge_tower_lora(model)
        target = model.state_dict()
    if has_lora_keys(state) and not has_lora_keys(target):
        raise CheckpointMismatchError(
            f"{source} holds unmerged LoRA tensors but the model was built without LoRA: build it "
            f"from a config with `lora` set (e.g. the built-in name), or export the checkpoint merged")
    if "logit_scale" in state and "logit_scale" in target and state["logit_scale"].shape != target["logit_scale"].shape:
        state = dict(state, logit_scale=state["logit_scale"].reshape(target["logit_scale"].shape))
    missing = set(target) - set(state)
    unexpected = set(state) - set(target)
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in set(state) & set(target) if state[k].shape != target[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (in the model, not the checkpoint): {_sample(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (in the checkpoint, not the model): {_sample(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_sample(shapes, 4)}")
        hint = ""
        if any(".base_layer." in k for k in missing) or any(".base_layer." in k for k in unexpected):
            hint = " (one side has LoRA unmerged and the other merged)"
        raise CheckpointMismatchError(f"{source} does not match the model{hint}: " + "; ".join(parts) +
                                      ". Check --model / the config the checkpoint was trained with.")
    model.load_state_dict(state, strict=False)
    return sorted(missing), sorted(unexpected)


def load_clip_checkpoint(model, path: PathLike, strict: bool = True):
    """`load_clip_state` for a checkpoint path (any format `read_state_dict` reads)."""
    return load_clip_state(model, read_state_dict(path), source=str(path), strict=strict)


def build_clip(model_cfg: dict, preprocess_cfg: Optional[dict] = None, precision: str = "fp32"):
    """An OpenCLIP `CustomTextCLIP` from a config dict, without fetching any base weights
    (the caller loads a full checkpoint next)."""
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our text tower)
    from open_clip.model import CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    cfg["text_cfg"]["hf_model_pretrained"] = False
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    cfg.pop("custom_text", None)
    from dataclasses import asdict
    model = CustomTextCLIP(**cfg, cast_dtype=open_clip.get_cast_dtype(precision))
    # As OpenCLIP's factory does: defaults, then the model's own image size, then ours.
    pp = {**asdict(open_clip.transform.PreprocessCfg()), "size": model.visual.image_size, **(preprocess_cfg or {})}
    open_clip.set_model_preprocess_cfg(model, pp)
    return model


def read_folder_config(folder: PathLike) -> dict:
    """`open_clip_config.json` of an exported folder."""
    path = Path(folder) / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an OpenCLIP model folder")
    return json.loads(path.read_text())
