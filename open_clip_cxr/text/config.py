"""`CXRTextConfig`: a transformers config for a decoder LLM used as a bidirectional text encoder.

It is registered with `AutoConfig`, so OpenCLIP's `HFTextEncoder` builds our tower through
its normal `AutoConfig` / `AutoModel` path. The decoder's own config is nested under `llm`,
which keeps the architecture embedded (nothing is fetched to build it).
"""
from typing import Optional

from transformers import AutoConfig, PretrainedConfig

LATENT_FF_KINDS = ("gelu", "geglu")
# The latent-attention pooler's options, defined once: `CXRTextConfig` field -> keyword of
# `pooling.LatentAttentionPooling`. The pooler's builder, the named-architecture fields
# (`archs.ARCH_FIELDS`) and the checkpoint converter (`pooler_layouts.OPTION_FIELDS`) read this
# table; a new option is one config field + one entry here + one pooler keyword.
LATENT_OPTIONS = {"num_latents": "num_latents", "latent_heads": "heads", "latent_mlp_ratio": "mlp_ratio",
                  "latent_pre_norm": "pre_norm", "latent_ff": "ff", "latent_head_dim": "head_dim",
                  "latent_out_bias": "out_bias", "latent_in_bias": "in_bias", "latent_residual": "residual"}
# "separator": the separator token is read by the decoder, pooling starts after it (ours);
# "llm2vec": the authors' format, the marker only says where the text starts: it is masked out of
#   attention and positions (as if removed before tokenising) and only the text's tokens are pooled.
INSTRUCTION_FORMATS = ("separator", "llm2vec")
# How the CLIP model that owns this tower was trained to score pairs: "cosine" (L2-normalised,
# OpenCLIP's loss), "clip" (logit_scale * I @ T^T without normalisation, the authors'), "dot".
SIMILARITIES = ("cosine", "clip", "dot")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class CXRTextConfig(PretrainedConfig):
    model_type = "cxr_llm_text"

    def __init__(
            self,
            llm: Optional[dict] = None,          # the decoder's config dict (must hold `model_type`, e.g. "llama")
            pooling: str = "latent_attention",   # a registered pooler (`pooling.POOLING_MODES`)
            num_latents: int = 512,              # latent attention: size of the learned latent array
            latent_heads: int = 8,               # latent attention: heads of the cross-attention
            latent_mlp_ratio: int = 4,           # latent attention: MLP width (after any gating) / hidden size
            latent_pre_norm: bool = False,       # latent attention: LayerNorms on tokens (attn, FF) and latents
            latent_ff: str = "gelu",             # latent attention: feed-forward, "gelu" or "geglu" (gated, NV-Embed)
            latent_head_dim: Optional[int] = None,  # latent attention: width per head; None = hidden / heads
            latent_out_bias: bool = True,        # latent attention: bias on the attention's output projection
            latent_in_bias: bool = False,        # latent attention: biases on the query and key/value projections
            latent_residual: bool = True,        # latent attention: residuals around attention and feed-forward
            output_norm: bool = True,            # LayerNorm on the pooled vector (OpenCLIP's Linear proj follows)
            lora: Optional[dict] = None,         # {"r", "alpha", "dropout", "target_modules"}; None = no LoRA
            train_pooling: bool = False,         # with LoRA on, also train the pooling weights
            instruction_separator_id: Optional[int] = None,  # tokens up to this id are read but not pooled
            instruction_format: str = "separator",  # one of INSTRUCTION_FORMATS (how the separator is used)
            similarity: str = "cosine",          # one of SIMILARITIES: how the CLIP model scores pairs
            base_weights: Optional[str] = None,  # where pretrained weights come from, see `base_weights.py`
            **kwargs,
    ):
        llm = dict(llm or {"model_type": "llama"})
        from .pooling import POOLING_MODES   # the pooler registry (pooling imports this module)
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {tuple(POOLING_MODES)}, got {pooling!r}")
        if latent_ff not in LATENT_FF_KINDS:
            raise ValueError(f"latent_ff must be one of {LATENT_FF_KINDS}, got {latent_ff!r}")
        if instruction_format not in INSTRUCTION_FORMATS:
            raise ValueError(f"instruction_format must be one of {INSTRUCTION_FORMATS}, got {instruction_format!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if lora is not None:
            lora = {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": list(DEFAULT_LORA_TARGETS), **lora}
        self.llm = llm
        self.pooling = pooling
        self.num_latents = num_latents
        self.latent_heads = latent_heads
        self.latent_mlp_ratio = latent_mlp_ratio
        self.latent_pre_norm = latent_pre_norm
        self.latent_ff = latent_ff
        self.latent_head_dim = latent_head_dim
        self.latent_out_bias = latent_out_bias
        self.latent_in_bias = latent_in_bias
        self.latent_residual = latent_residual
        self.output_norm = output_norm
        self.lora = lora
        self.train_pooling = train_pooling
        self.instruction_separator_id = instruction_separator_id
        self.instruction_format = instruction_format
        self.similarity = similarity
        self.base_weights = base_weights
        # Names OpenCLIP's `arch_dict` reads (width, context length, ...) mirror the decoder's.
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            kwargs.setdefault(key, llm.get(key))
        kwargs.setdefault("pad_token_id", llm.get("pad_token_id"))
        super().__init__(**kwargs)

    def llm_config(self) -> PretrainedConfig:
        """The decoder's transformers config, built locally from the embedded dict."""
        cfg = dict(self.llm)
        model_type = cfg.pop("model_type")
        cfg.setdefault("pad_token_id", self.pad_token_id)
        return AutoConfig.for_model(model_type, **cfg)
