"""`CXRTextModel`: a decoder LLM read bidirectionally, pooled to one vector per report.

Registered with transformers' `AutoModel`, so OpenCLIP's `HFTextEncoder` wraps it like any HF
text tower: it calls `model(input_ids=..., attention_mask=ids != pad)` and, with the
`cls_pooler`, takes our `pooler_output`; OpenCLIP's own Linear projection follows.
"""
import torch
import torch.nn as nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .bidirectional import make_bidirectional, padding_mask_4d
from .config import CXRTextConfig
from .lora import apply_lora
from .pooling import LatentAttentionPooling, build_pooler


class CXRTextModel(PreTrainedModel):
    config_class = CXRTextConfig
    base_model_prefix = "cxr_text"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: CXRTextConfig, add_pooling_layer: bool = True, with_lora: bool = True, **kwargs):
        # `add_pooling_layer` is what OpenCLIP passes to every HF model; our pooler always exists.
        super().__init__(config)
        self.llm = make_bidirectional(AutoModel.from_config(config.llm_config()))
        self.pooler = build_pooler(config)
        self.norm = nn.LayerNorm(config.hidden_size) if config.output_norm else nn.Identity()
        self.post_init()
        if with_lora:
            self.enable_lora()

    # -- weights -----------------------------------------------------------------------------
    @classmethod
    def from_base(cls, config: CXRTextConfig, **kwargs) -> "CXRTextModel":
        """Build the tower and load `config.base_weights` into it (before LoRA wraps the decoder)."""
        model = cls(config, with_lora=False)
        if config.base_weights:
            from .base_weights import load_into
            model.load_report = load_into(model, config.base_weights)
        return model.enable_lora()

    def _init_weights(self, module):
        # Only our own modules: the decoder initialised itself in `from_config`.
        if isinstance(module, LatentAttentionPooling):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_weights(self):
        for m in (self.pooler, self.norm):
            for sub in m.modules():
                self._init_weights(sub)

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel
        return isinstance(self.llm, PeftModel)

    def base_llm(self) -> nn.Module:
        """The decoder without the peft wrapper (its base layers still hold LoRA, if unmerged)."""
        return self.llm.get_base_model() if self.has_lora else self.llm

    def enable_lora(self):
        """Wrap the decoder with LoRA per `config.lora` and freeze what the config says to."""
        if self.config.lora is None or self.has_lora:
            return self
        self.llm = apply_lora(self.llm, self.config.lora)
        if not self.config.train_pooling:
            self.pooler.requires_grad_(False)
        return self

    def merge_lora(self):
        """Fold LoRA into the base weights and drop the adapters (for export)."""
        if self.has_lora:
            self.llm = self.llm.merge_and_unload()
            self.config.lora = None
        return self

    # -- forward -----------------------------------------------------------------------------
    def pool_mask(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tokens that count towards the embedding: non-pad, after any instruction separator."""
        sep = self.config.instruction_separator_id
        if sep is None:
            return mask
        is_sep = input_ids == sep
        after_sep = (is_sep.long().cumsum(1) - is_sep.long()) > 0   # strictly after the first separator
        has_sep = is_sep.any(1, keepdim=True)
        pooled = mask & torch.where(has_sep, after_sep, torch.ones_like(mask))
        # An instruction with an empty text still pools something: fall back to all tokens.
        return torch.where(pooled.any(1, keepdim=True), pooled, mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None, **kwargs):
        full_len = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        mask = attention_mask.bool().clone()
        sep = self.config.instruction_separator_id
        if self.config.instruction_format == "llm2vec" and sep is not None:
            # The authors' marker is not part of the text the decoder reads (they remove it before
            # tokenising): mask it out of attention and positions; `pool_mask` still sees where it was.
            mask &= input_ids != sep
        # An empty text (all padding) still gets a valid embedding: read its first slot.
        mask[:, 0] |= ~mask.any(1)
        # Drop columns that are padding in every row (right or left): exact, and much cheaper
        # because OpenCLIP tokenizers pad to the full context length.
        # (A marker in a dropped column leads the whole text: pooling all tokens is then the same.)
        used = mask.any(0).nonzero().squeeze(1)
        start, stop = int(used[0]), int(used[-1]) + 1
        input_ids, mask = input_ids[:, start:stop], mask[:, start:stop]

        # Positions count real tokens only, so left and right padding give the same RoPE phases.
        position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)
        llm = self.base_llm()
        embeds = llm.get_input_embeddings()(input_ids)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=padding_mask_4d(llm.config, embeds, mask),
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        pooled = self.norm(self.pooler(hidden, self.pool_mask(input_ids, mask)))
        if stop - start != full_len:  # give token states back at the caller's length
            hidden = nn.functional.pad(hidden, (0, 0, start, full_len - stop))
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
