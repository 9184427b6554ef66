"""The bidirectional LLM text tower: config, model, pooling, LoRA, named architectures."""
from .archs import SPEC_PREFIX, config_from_spec, list_text_archs, register_text_arch, spec_for
from .config import CXRTextConfig
from .instructions import with_instruction
from .lora import count_parameters
from .model import CXRTextModel
from .pooling import POOLING_MODES, register_pooler

__all__ = ["SPEC_PREFIX", "config_from_spec", "list_text_archs", "register_text_arch", "spec_for", "POOLING_MODES", "register_pooler",
           "CXRTextConfig", "with_instruction", "count_parameters", "CXRTextModel"]
