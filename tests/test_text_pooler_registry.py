"""Poolers register by name, and the latent-attention options are listed once (config.LATENT_OPTIONS)."""
import inspect

import pytest
import torch

from open_clip_cxr.text import CXRTextConfig, CXRTextModel, config_from_spec
from open_clip_cxr.text.archs import ARCH_FIELDS
from open_clip_cxr.text.config import LATENT_OPTIONS
from open_clip_cxr.text.pooler_layouts import OPTION_FIELDS
from open_clip_cxr.text.pooling import POOLERS, POOLING_MODES, LatentAttentionPooling, register_pooler


def test_every_latent_option_is_listed_once_and_reaches_the_pooler():
    config_fields = [p for p in inspect.signature(CXRTextConfig.__init__).parameters
                     if p.startswith("latent_") or p == "num_latents"]
    assert sorted(config_fields) == sorted(LATENT_OPTIONS)
    pooler_kwargs = set(inspect.signature(LatentAttentionPooling.__init__).parameters) - {"self", "hidden_size"}
    assert set(LATENT_OPTIONS.values()) == pooler_kwargs
    assert set(LATENT_OPTIONS) <= set(ARCH_FIELDS) and OPTION_FIELDS == tuple(LATENT_OPTIONS)
    # a non-default option reaches the built pooler
    cfg = config_from_spec("cxr-text:cxr-llm-tiny")
    cfg.latent_residual, cfg.latent_in_bias = False, True
    pooler = CXRTextModel(cfg).pooler
    assert pooler.residual is False and "to_q.bias" in pooler.state_dict()


class MaxPooling(torch.nn.Module):
    def forward(self, hidden, mask):
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)


def test_a_registered_pooler_builds_a_tower():
    assert {"mean", "last_token", "latent_attention"} <= set(POOLING_MODES)
    with pytest.raises(ValueError, match="pooling must be one of"):
        CXRTextConfig(pooling="max")
    register_pooler("max")(lambda config: MaxPooling())
    try:
        assert "max" in POOLING_MODES
        cfg = config_from_spec("cxr-text:cxr-llm-tiny")
        cfg.pooling = "max"
        model = CXRTextModel(cfg).eval()
        assert isinstance(model.pooler, MaxPooling)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
        out = model(input_ids=ids, attention_mask=(ids != 0).long())
        assert torch.isfinite(out.pooler_output if hasattr(out, "pooler_output") else out[1]).all()
    finally:
        POOLERS.pop("max", None)
