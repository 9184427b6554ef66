"""Vision side of open_clip_cxr: CXR image reading, preprocessing and timm towers.

Importing this package registers `cxr_efficientnet_lite0` with timm.
"""
from .io import ImageReadError, load_image, to_uint8
from .transforms import cxr_transform, transforms_from_preprocess_cfg
from . import timm_models  # noqa: F401  (side effect: timm registration)

__all__ = ["ImageReadError", "load_image", "to_uint8", "cxr_transform", "transforms_from_preprocess_cfg",
           "timm_models"]
