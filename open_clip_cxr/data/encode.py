"""Work done per sample in the writer's worker processes: read, downscale, re-encode.

Kept free of torch so that worker processes start fast and stay small.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional, Tuple

from PIL import Image, ImageOps

from open_clip_cxr.data.sources import (BAD_REPORT, MISSING_FILE, NOT_A_FILE, UNREADABLE_IMAGE, Sample, dumps,
                                       sample_meta)

_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")

IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class EncodeOptions:
    """How images and metadata are written; part of the manifest fingerprint."""
    max_side: int = 512
    image_format: str = "png"
    jpeg_quality: int = 95
    png_level: int = 3          # zlib level: 3 is ~3x faster than PIL's default 6 for ~10% larger files
    variants: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {self.image_format!r}")
        if self.max_side < 16:
            raise ValueError("max_side must be at least 16 pixels")
        if not 0 <= self.png_level <= 9:
            raise ValueError("png_level must be 0..9")


class Encoded(NamedTuple):
    """A worker's answer: the tar members of one sample, or why it was skipped."""
    key: str
    members: Optional[List[Tuple[str, bytes]]]   # [(extension, bytes)] in write order
    reason: Optional[str] = None
    detail: str = ""


def downscale(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longest side is `max_side`; never enlarge (that would only add bytes)."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: box-reduce first, then Lanczos; much faster on 3000 px radiographs, same look
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(img: Image.Image, opts: EncodeOptions) -> bytes:
    buf = io.BytesIO()
    if opts.image_format == "png":
        img.save(buf, format="PNG", compress_level=opts.png_level)
    else:
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return buf.getvalue()


def read_image(path: str, max_side: int, name: str) -> Tuple[Image.Image, List[int]]:
    """The image as 8-bit gray, and its original (width, height).

    JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale when that still leaves the longest
    side >= max_side: several times faster than a full decode and a big resize.
    """
    from open_clip_cxr.vision.io import load_image
    with open(path, "rb") as f:
        data = f.read()
    if data[:3] == b"\xff\xd8\xff":
        try:
            with Image.open(io.BytesIO(data)) as im:
                size = list(im.size)
                im.draft("L", (max_side, max_side))
                im.load()
                im = ImageOps.exif_transpose(im)
                return load_image(im, name=name, mode="L"), size
        except (OSError, ValueError, SyntaxError):
            pass  # let load_image decode it fully and name the problem
    img = load_image(data, name=name, mode="L")
    return img, list(img.size)


def variant_seed(key: str, seed: int) -> int:
    """A per-sample seed independent of processing order, so reruns write the same variants."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "big")


def encode_sample(sample: Sample, opts: EncodeOptions) -> Encoded:
    """Read one image and build its tar members; any failure becomes a counted skip."""
    from open_clip_cxr.vision.io import ImageReadError
    key = sample.key
    if os.path.isdir(sample.image_path):
        return Encoded(key, None, NOT_A_FILE, f"{sample.image_path} is a directory")
    if not os.path.isfile(sample.image_path):
        return Encoded(key, None, MISSING_FILE, sample.image_path)
    try:
        img, orig_size = read_image(sample.image_path, opts.max_side, name=key)
        data = encode_image(downscale(img, opts.max_side), opts)
    except (ImageReadError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises all of these on damaged files
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x7f...>"): say the file instead
        msg = _OBJECT_REPR.sub(os.path.basename(sample.image_path), str(exc))
        return Encoded(key, None, UNREADABLE_IMAGE, f"{sample.image_path}: {type(exc).__name__}: {msg}"[:300])
    meta = sample_meta(sample)
    meta["orig_size"] = orig_size
    if opts.variants:
        from open_clip_cxr.reports.variants import make_variants
        try:
            variants = make_variants(sample.report, seed=variant_seed(key, opts.seed))
        except ValueError as exc:  # a report the rewriter cannot handle is bad input, not a crash
            return Encoded(key, None, BAD_REPORT, f"variants: {exc}"[:300])
        meta["variants"] = [{k: asdict(v)[k] for k in ("text", "style", "equivalent", "error_type")}
                            for v in variants]
    if getattr(sample, "llm_variants", None):   # checked LLM rewrites (reports/paraphrase.attach_llm_variants)
        meta["variants"] = meta.get("variants", []) + sample.llm_variants
    ext = "png" if opts.image_format == "png" else "jpg"
    return Encoded(key, [(ext, data), ("txt", sample.report.text.encode("utf-8")), ("json", dumps(meta))])
