"""Chest X-ray preprocessing: any input `load_image` accepts -> normalised 3xHxW tensor.

Geometry and photometric augmentation run on the 8-bit grayscale image (one
channel is cheaper and films are gray); the channel is replicated to RGB only at
the end, because ImageNet/CLIP vision towers expect three channels.
All stages are small classes (no lambdas) so the pipeline pickles into
DataLoader workers.
"""
from __future__ import annotations

import math
import random
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .io import load_image

__all__ = ["cxr_transform", "transforms_from_preprocess_cfg", "LoadImage", "ResizePad", "ResizeCover",
           "RandomAspectCrop", "Squash", "GrayToRGB"]

Size = Union[int, Tuple[int, int]]
_R = Image.Resampling
_INTERP = {"bicubic": _R.BICUBIC, "bilinear": _R.BILINEAR, "nearest": _R.NEAREST, "lanczos": _R.LANCZOS}
# OpenCLIP PreprocessCfg defaults, used for keys a cfg dict leaves out
_OPENCLIP_DEFAULTS = dict(size=224, mean=(0.48145466, 0.4578275, 0.40821073),
                          std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic",
                          resize_mode="shortest", fill_color=0)
_RESIZE_MODES = {"longest": "pad", "shortest": "crop", "squash": "squash",
                 "pad": "pad", "crop": "crop"}


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _gray_fill(fill: Union[int, float, Sequence[float]]) -> int:
    """The pipeline is grayscale until the end, so an RGB fill becomes its mean level."""
    if isinstance(fill, (int, float)):
        return int(round(fill))
    values = list(fill)
    return int(round(sum(values) / len(values)))


class LoadImage:
    """Any `load_image` input -> PIL image in `mode`."""

    def __init__(self, mode: str = "L"):
        self.mode = mode

    def __call__(self, x: Any) -> Image.Image:
        return load_image(x, mode=self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class ResizePad:
    """Resize so the image fits inside (h, w) keeping aspect ratio, then centre-pad with `fill`."""

    def __init__(self, size: Size, fill: int = 0, interpolation: str = "bicubic"):
        self.size, self.fill, self.interpolation = _hw(size), fill, interpolation

    def __call__(self, im: Image.Image) -> Image.Image:
        th, tw = self.size
        scale = min(th / im.height, tw / im.width)
        nh, nw = max(1, min(th, round(im.height * scale))), max(1, min(tw, round(im.width * scale)))
        if (nh, nw) != (im.height, im.width):
            im = im.resize((nw, nh), _INTERP[self.interpolation])
        if (nh, nw) == (th, tw):
            return im
        fill = self.fill if im.mode == "L" else (self.fill,) * len(im.getbands())
        canvas = Image.new(im.mode, (tw, th), fill)
        canvas.paste(im, ((tw - nw) // 2, (th - nh) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill}, interpolation={self.interpolation!r})"


class ResizeCover:
    """Resize so the image covers (h, w) keeping aspect ratio, then centre-crop to (h, w)."""

    def __init__(self, size: Size, interpolation: str = "bicubic"):
        self.size, self.interpolation = _hw(size), interpolation

    def __call__(self, im: Image.Image) -> Image.Image:
        th, tw = self.size
        scale = max(th / im.height, tw / im.width)
        nh, nw = max(th, round(im.height * scale)), max(tw, round(im.width * scale))
        if (nh, nw) != (im.height, im.width):
            im = im.resize((nw, nh), _INTERP[self.interpolation])
        top, left = (nh - th) // 2, (nw - tw) // 2
        return im.crop((left, top, left + tw, top + th))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation!r})"


class Squash:
    """Resize to exactly (h, w), ignoring aspect ratio."""

    def __init__(self, size: Size, interpolation: str = "bicubic"):
        self.size, self.interpolation = _hw(size), interpolation

    def __call__(self, im: Image.Image) -> Image.Image:
        th, tw = self.size
        return im.resize((tw, th), _INTERP[self.interpolation])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation!r})"


class RandomAspectCrop:
    """Crop a random window covering `scale` of the area, with aspect within `ratio` of the image's own.

    Unlike torchvision's RandomResizedCrop this does not resize: the crop keeps
    roughly the film's proportions and the deterministic resize stage that follows
    decides how it meets the square input.
    """

    def __init__(self, scale: Tuple[float, float] = (0.8, 1.0), ratio: Tuple[float, float] = (0.9, 1.1)):
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        area = random.uniform(*self.scale)
        r = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        # crop aspect (cw/ch) = image aspect * r, crop area = area * w * h
        cw = min(w, max(1, round(w * math.sqrt(area * r))))
        ch = min(h, max(1, round(h * math.sqrt(area / r))))
        left, top = random.randint(0, w - cw), random.randint(0, h - ch)
        return im.crop((left, top, left + cw, top + ch))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, ratio={self.ratio})"


class GrayToRGB:
    """Replicate the gray channel: vision towers expect three channels."""

    def __call__(self, im: Image.Image) -> Image.Image:
        return im.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def cxr_transform(
        image_size: Size,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        resize_mode: str = "pad",
        fill: Union[int, Sequence[float]] = 0,
        hflip: bool = False,
        scale: Optional[Tuple[float, float]] = (0.8, 1.0),
        rotate: float = 5.0,
        brightness: float = 0.1,
        contrast: float = 0.1,
        interpolation: str = "bicubic",
) -> T.Compose:
    """Build the CXR preprocessing pipeline (a torchvision Compose).

    resize_mode: "pad" (fit longest side, pad to size with `fill`, 0..255 gray level),
    "crop" (fit shortest side, centre crop) or "squash".  With `train`, a mild random
    crop (`scale` of the area, aspect kept within 10%), a rotation of up to `rotate`
    degrees and brightness/contrast jitter are added.  Horizontal flips are off
    unless `hflip`, because laterality (heart on the patient's left) is meaningful.
    """
    mode = _RESIZE_MODES.get(resize_mode)
    if mode is None:
        raise ValueError(f"resize_mode must be one of {sorted(_RESIZE_MODES)}, got {resize_mode!r}")
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    gray_fill = _gray_fill(fill)
    stages: list = [LoadImage("L")]
    if train and scale is not None and tuple(scale) != (1.0, 1.0):
        stages.append(RandomAspectCrop(scale))
    if mode == "pad":
        stages.append(ResizePad(image_size, gray_fill, interpolation))
    elif mode == "crop":
        stages.append(ResizeCover(image_size, interpolation))
    else:
        stages.append(Squash(image_size, interpolation))
    if train:
        if rotate:
            stages.append(T.RandomRotation(rotate, interpolation=InterpolationMode.BILINEAR, fill=gray_fill))
        if brightness or contrast:
            stages.append(T.ColorJitter(brightness=brightness, contrast=contrast))
        if hflip:
            stages.append(T.RandomHorizontalFlip())
    stages += [GrayToRGB(), T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]
    return T.Compose(stages)


def transforms_from_preprocess_cfg(cfg: Any, train: bool, **overrides: Any) -> T.Compose:
    """Build `cxr_transform` from an OpenCLIP preprocess cfg (dict or PreprocessCfg).

    OpenCLIP's resize_mode "longest" maps to our "pad", "shortest" to "crop",
    "squash" to "squash"; missing keys take OpenCLIP's PreprocessCfg defaults.
    `overrides` are passed to `cxr_transform` (e.g. rotate=0, hflip=True).
    """
    if not isinstance(cfg, dict):
        cfg = {k: getattr(cfg, k) for k in _OPENCLIP_DEFAULTS if hasattr(cfg, k)}
    merged: Dict[str, Any] = {**_OPENCLIP_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    size = merged["size"]
    kwargs: Dict[str, Any] = dict(
        image_size=size if isinstance(size, int) else tuple(size),
        mean=tuple(merged["mean"]),
        std=tuple(merged["std"]),
        train=train,
        resize_mode=_RESIZE_MODES.get(merged["resize_mode"], merged["resize_mode"]),
        fill=merged["fill_color"],
        interpolation=merged["interpolation"],
    )
    kwargs.update(overrides)
    return cxr_transform(**kwargs)
