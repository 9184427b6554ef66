"""open_clip_cxr: `import open_clip_cxr` and OpenCLIP builds CXR-LLM models.

    import open_clip, open_clip_cxr
    model, _, preprocess = open_clip.create_model_and_transforms("cxr-llm-small")
    tokenizer = open_clip.get_tokenizer("cxr-llm-small")
"""
from .openclip_hooks import our_model_names, register as _register

_register()

from .factory import create_model, create_model_and_transforms, get_tokenizer, list_models  # noqa: E402
from .text import CXRTextConfig, CXRTextModel, with_instruction  # noqa: E402
from .vision import ImageReadError, cxr_transform, load_image  # noqa: E402

__version__ = "0.1.0"
__all__ = ["create_model", "create_model_and_transforms", "get_tokenizer", "list_models", "our_model_names",
           "CXRTextConfig", "CXRTextModel", "with_instruction", "ImageReadError", "cxr_transform", "load_image"]
