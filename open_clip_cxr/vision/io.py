"""Read chest X-ray images of any common kind into 8-bit grayscale PIL images.

Radiographs arrive as DICOM (often 12-16 bit, sometimes MONOCHROME1 = inverted),
16-bit PNG/TIFF exports, or ordinary 8-bit JPEG/PNG.  Everything downstream
(transforms, OpenCLIP's own preprocessing) expects an 8-bit image, so this module
is the single place where bit depth, photometric interpretation and windowing
are resolved.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageReadError", "load_image", "to_uint8", "is_dicom"]

_DICOM_EXTS = (".dcm", ".dicom", ".dic")
# Above this many pixels, percentiles are estimated on a strided subsample:
# exact percentiles of a 16-megapixel film cost ~0.3 s per image for no visible gain.
_PERCENTILE_SAMPLE = 1 << 20


class ImageReadError(ValueError):
    """An image could not be decoded; the message names the file (or key) and the reason.

    Takes a single message argument so it survives pickling and torch's
    DataLoader worker re-raise, which rebuild exceptions as ``cls(message)``.
    """

    def __init__(self, message: str, *, name: Optional[str] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.name = name
        self.reason = reason


def _fail(name: str, reason: str) -> ImageReadError:
    return ImageReadError(f"cannot read image {name!r}: {reason}", name=name, reason=reason)


def to_uint8(array: Any, low: float = 0.0, high: float = 100.0) -> np.ndarray:
    """Map a high-bit-depth (or float) array linearly to uint8.

    The ``low``/``high`` percentiles of the finite values go to 0/255 (0 and 100 =
    min-max).  Non-finite values become 0; a constant image becomes all zeros.
    uint8 input is returned unchanged (it is already display range).
    """
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    sample = a[finite] if not finite.all() else a.ravel()
    if sample.size == 0:
        return np.zeros(a.shape, np.uint8)
    if low <= 0.0 and high >= 100.0:
        lo, hi = float(sample.min()), float(sample.max())
    else:
        step = max(1, sample.size // _PERCENTILE_SAMPLE)
        lo, hi = (float(v) for v in np.percentile(sample[::step], [low, high]))
    if not hi > lo:
        return np.zeros(a.shape, np.uint8)
    out = (a - lo) * (255.0 / (hi - lo))
    out[~finite] = 0.0
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out).astype(np.uint8)


def _gray_to_uint8(a: np.ndarray) -> np.ndarray:
    """Single-channel array -> uint8, keeping values that already fit 0..255 untouched.

    Why: 8-bit content stored in a wider type (e.g. PIL mode "I") must not be
    contrast-stretched, while true 12/16-bit content must be rescaled.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        if a.size and a.min() >= 0 and a.max() <= 255:
            return a.astype(np.uint8)
        return to_uint8(a)
    a = a.astype(np.float32)
    finite = a[np.isfinite(a)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 255.0:
        # float images in [0, 1] (skimage / torch convention) or already in 0..255
        scale = 255.0 if finite.max() <= 1.0 else 1.0
        return np.rint(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) * scale).astype(np.uint8)
    return to_uint8(a)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (what PIL's RGB->L uses), in float32."""
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _array_to_gray(a: np.ndarray) -> Image.Image:
    """numpy HxW, HxWxC (C in 1, 3, 4) or CxHxW -> PIL "L"."""
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first (torch layout)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        integer = np.issubdtype(a.dtype, np.integer)
        lum = _luminance(a[..., :3])
        if a.shape[-1] == 4:
            # composite on black: transparent regions carry no anatomy
            full = float(np.iinfo(a.dtype).max) if integer else 1.0
            lum = lum * np.clip(a[..., 3].astype(np.float32) / full, 0.0, 1.0)
        # keep the integer/float convention so _gray_to_uint8 applies the same range rules
        a = np.rint(lum).astype(np.int64) if integer else lum
    if a.ndim != 2:
        raise ValueError(f"unsupported array shape {a.shape}")
    return Image.fromarray(_gray_to_uint8(a), mode="L")


def _pil_to_gray(im: Image.Image) -> Image.Image:
    """Any PIL mode -> "L" (16-bit and float modes are rescaled, alpha composited on black)."""
    if im.mode == "L":
        return im
    if im.mode in ("1",):
        return im.convert("L")
    if im.mode.startswith("I") or im.mode == "F":
        # PIL's own I;16 -> L conversion clips at 255 and destroys contrast
        return Image.fromarray(_gray_to_uint8(np.asarray(im)), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return im.convert("RGB").convert("L")


def is_dicom(data: bytes, name: Optional[str] = None) -> bool:
    """DICOM if the name has a DICOM extension or the Part-10 "DICM" magic sits at offset 128."""
    if name and str(name).lower().endswith(_DICOM_EXTS):
        return True
    return data[128:132] == b"DICM"


def _first(value: Any) -> Any:
    """DICOM window attributes may be multi-valued; the first pair is the default view."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom MultiValue included
        return value[0] if len(value) else None
    return value


def _dicom_to_gray(data: bytes) -> Image.Image:
    import pydicom

    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    # force=True: .dcm files without the 128-byte preamble are still common
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data")
    arr = ds.pixel_array
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # a radiograph series: the first frame is the image
    if samples > 1:
        return _array_to_gray(np.asarray(arr))

    arr = apply_modality_lut(arr, ds)  # rescale slope/intercept or modality LUT
    arr = np.asarray(arr, dtype=np.float32)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if "VOILUTSequence" in ds:
        gray = to_uint8(apply_voi_lut(arr, ds))
    elif center is not None and width is not None and float(width) > 1 and function == "LINEAR":
        # the window is the producer's intended display range: map it exactly to 0..255
        lo = float(center) - 0.5 - (float(width) - 1) / 2
        hi = lo + float(width) - 1
        gray = np.rint((np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    elif center is not None and width is not None:
        gray = to_uint8(apply_voi_lut(arr, ds))  # SIGMOID / LINEAR_EXACT handled by pydicom
    else:
        # no window: robust percentiles ignore burned-in labels and collimator edges
        gray = to_uint8(arr, 0.5, 99.5)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 stores bone dark; show it bright like every other film
    return Image.fromarray(gray, mode="L")


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ValueError("empty file")
    if is_dicom(data, name):
        return _dicom_to_gray(data)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decode now so truncation surfaces here, not in a worker later
        im = ImageOps.exif_transpose(im)
        return _pil_to_gray(im)


def _name_of(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(src, np.ndarray):
        return "<array>"
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or "<PIL image>"
    return str(getattr(src, "name", "") or "<file object>")


def load_image(src: Any, name: Optional[str] = None, mode: str = "L") -> Image.Image:
    """Load ``src`` (path, bytes, file object, numpy array or PIL image) as an 8-bit image.

    Returns mode "L" by default; ``mode="RGB"`` replicates the gray channel (chest
    films are grayscale, so colour annotations are reduced to luminance).
    ``name`` labels the source in error messages (e.g. a webdataset key).
    Raises ImageReadError for missing, corrupt, truncated or unsupported input.
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    label = name or _name_of(src)
    try:
        if isinstance(src, Image.Image):
            gray = _pil_to_gray(src)
        elif isinstance(src, np.ndarray):
            gray = _array_to_gray(src)
        else:
            if isinstance(src, (str, os.PathLike)):
                with open(src, "rb") as f:
                    data = f.read()
            elif isinstance(src, (bytes, bytearray, memoryview)):
                data = bytes(src)
            elif hasattr(src, "read"):
                data = src.read()
            else:
                raise TypeError(f"unsupported source type {type(src).__name__}")
            gray = _decode_bytes(data, label)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # decoders (PIL, pydicom, codecs) raise many unrelated types
        raise _fail(label, f"{type(e).__name__}: {e}") from e
    return gray.convert("RGB") if mode == "RGB" else gray
