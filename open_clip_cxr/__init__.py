"""open_clip_cxr: `import open_clip_cxr` and OpenCLIP builds CXR-LLM models.

    import open_clip, open_clip_cxr
    model, _, preprocess = open_clip.create_model_and_transforms("cxr-llm-small")
    tokenizer = open_clip.get_tokenizer("cxr-llm-small")
"""
import os
import sys

__version__ = "0.1.0"
__all__ = ["create_model", "create_model_and_transforms", "get_tokenizer", "list_models", "our_model_names",
           "CXRTextConfig", "CXRTextModel", "with_instruction", "ImageReadError", "cxr_transform", "load_image"]


def _started_as_cli() -> bool:
    """True in the `open-clip-cxr` command (console script or `python -m open_clip_cxr.cli`): it
    registers after parsing its arguments, so that `--help` and argument errors import no torch."""
    argv = list(getattr(sys, "orig_argv", None) or [])
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "open_clip_cxr.cli":
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0] or "") == "open-clip-cxr"


def ensure_registered() -> None:
    """Teach OpenCLIP our models (done on import, except in the CLI before it parses)."""
    if globals().get("_registered"):
        return
    from .openclip_hooks import register
    register()
    from .factory import create_model, create_model_and_transforms, get_tokenizer, list_models
    from .openclip_hooks import our_model_names
    from .text import CXRTextConfig, CXRTextModel, with_instruction
    from .vision import ImageReadError, cxr_transform, load_image
    globals().update(create_model=create_model, create_model_and_transforms=create_model_and_transforms,
                     get_tokenizer=get_tokenizer, list_models=list_models, our_model_names=our_model_names,
                     CXRTextConfig=CXRTextConfig, CXRTextModel=CXRTextModel, with_instruction=with_instruction,
                     ImageReadError=ImageReadError, cxr_transform=cxr_transform, load_image=load_image,
                     _registered=True)


def __getattr__(name):
    if name in __all__:
        ensure_registered()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _started_as_cli():
    ensure_registered()
