"""Turn a decoder LLM's causal self-attention into bidirectional attention (LLM2Vec-style).

Two things make a transformers decoder causal: each attention module's `is_causal` flag (read
by SDPA / flash kernels) and the causal mask its model builds. We clear the flag and hand the
model a ready 4D padding-only mask, which transformers passes through untouched. No code of the
decoder is copied, so any current Llama-like model works.
"""
import torch


def make_bidirectional(llm: torch.nn.Module) -> torch.nn.Module:
    """Clear every `is_causal` flag under `llm` (attention modules and the config)."""
    for module in llm.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    if hasattr(llm, "config"):
        llm.config.is_causal = False
    return llm


def padding_mask_4d(llm_config, inputs_embeds: torch.Tensor, mask: torch.Tensor):
    """A (B, 1, L, L)-style mask in which every position sees every non-pad token."""
    try:  # transformers >= 5: the mask in the format the configured attention kernel wants
        from transformers.masking_utils import create_bidirectional_mask
        return create_bidirectional_mask(
            config=llm_config, inputs_embeds=inputs_embeds, attention_mask=mask,
            allow_is_bidirectional_skip=False)
    except (ImportError, TypeError):  # transformers 4.x: an additive float mask works for eager and SDPA
        dtype = inputs_embeds.dtype
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        additive = additive.masked_fill(~mask.bool(), torch.finfo(dtype).min)
        return additive[:, None, None, :]
