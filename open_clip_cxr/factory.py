"""Thin conveniences over OpenCLIP's factory (not a second factory).

`create_model_and_transforms` differs from OpenCLIP's only in the transforms it returns: ours
(`vision.transforms`) read DICOM and 16-bit images, keep the aspect ratio and never flip.
"""
import contextlib

import open_clip
import torch

from .openclip_hooks import our_model_names, preprocess_cfgs
from .vision.transforms import transforms_from_preprocess_cfg


# Our models' image preprocessing, read from each model config's `preprocess_cfg`. OpenCLIP keeps
# such settings with pretrained tags, which our built-in names lack, so plain
# `open_clip.create_model*` without a tag gives OpenAI's defaults; ours (and every exported
# folder's `preprocess_cfg`) use these.
PREPROCESS_CFGS = preprocess_cfgs()


def apply_preprocess_defaults(model, model_name: str):
    """Set our preprocessing on a built-in model (OpenCLIP reads `model.visual.preprocess_cfg`)."""
    if model_name in PREPROCESS_CFGS:
        open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **PREPROCESS_CFGS[model_name]})
    return model


def list_models():
    """Our model names (all of them are also in `open_clip.list_models()`)."""
    return our_model_names()


def _check_name(model_name: str):
    """Refuse, in one line that says what to give instead, a name OpenCLIP does not know or a
    `local-dir:` folder that is not there (our models listed first, not OpenCLIP's hundreds)."""
    from pathlib import Path
    from .errors import UsageError
    schema, rest = open_clip.factory.parse_model_name(model_name)
    if schema is None and open_clip.get_model_config(model_name) is None:
        others = len(open_clip.list_models()) - len(our_model_names())
        raise UsageError(f"unknown model {model_name!r}; ours: {', '.join(our_model_names())} "
                         f"(OpenCLIP knows {others} more: open_clip.list_models()), or give "
                         "local-dir:FOLDER / hf-hub:ORG/NAME")
    if schema == "local-dir" and not (Path(rest) / "open_clip_config.json").is_file():
        what = "does not exist" if not Path(rest).exists() else "has no open_clip_config.json"
        raise UsageError(f"{model_name}: the folder {what}; give a folder written by `open-clip-cxr export` "
                         "(or train-text / train-clip)")


@contextlib.contextmanager
def build_dtype(precision: str):
    """Construct parameters directly in bf16/fp16 when that is the target precision.

    OpenCLIP builds in fp32 and casts afterwards, so a bf16 `cxr-llm` briefly needs its fp32
    size (~6 GB) plus the bf16 copy. Our timm-based models end up wholly in the low precision
    anyway, so building in it gives the same model with one copy's memory.
    """
    dtype = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
             "fp16": torch.float16, "pure_fp16": torch.float16}.get(precision)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def create_model(model_name: str, *args, precision: str = "fp32", **kwargs):
    _check_name(model_name)
    with build_dtype(precision):
        model = open_clip.create_model(model_name, *args, precision=precision, **kwargs)
    return apply_preprocess_defaults(model, model_name)


def create_model_and_transforms(model_name: str, *args, **kwargs):
    """`open_clip.create_model_and_transforms`, returning CXR-aware train / eval transforms."""
    _check_name(model_name)
    with build_dtype(kwargs.get("precision", "fp32")):
        model, _, _ = open_clip.create_model_and_transforms(model_name, *args, **kwargs)
    apply_preprocess_defaults(model, model_name)
    cfg = dict(model.visual.preprocess_cfg)
    return model, transforms_from_preprocess_cfg(cfg, train=True), transforms_from_preprocess_cfg(cfg, train=False)


def get_tokenizer(model_name: str, *args, **kwargs):
    """`open_clip.get_tokenizer`; for models in the authors' instruction format
    (`text_cfg.tokenizer_mode == "llm2vec"`) it is wrapped to tokenise and mark as they do."""
    _check_name(model_name)
    tokenizer = open_clip.get_tokenizer(model_name, *args, **kwargs)
    if getattr(tokenizer, "tokenizer_mode", None) == "llm2vec":
        from .text.instructions import LLM2VecTokenizer
        tokenizer = LLM2VecTokenizer(tokenizer, tokenizer.context_length)
    return tokenizer
