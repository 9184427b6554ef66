"""Latent-attention pooling options (pre-norm, GEGLU, head width, output bias): every combination
builds, keeps the packed batch exact, and the defaults keep our original state-dict keys."""
import itertools

import pytest
import torch

from open_clip_cxr.text import CXRTextModel, config_from_spec, spec_for
from open_clip_cxr.text.archs import arch_of
from open_clip_cxr.text.pooling import LatentAttentionPooling, build_pooler

D, N, HEADS = 32, 8, 4
OLD_KEYS = {"latents", "to_q.weight", "to_kv.weight", "to_out.weight", "to_out.bias",
            "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
NORM_KEYS = {f"{n}.{p}" for n in ("norm_tokens", "norm_latents", "ff_norm") for p in ("weight", "bias")}
COMBOS = list(itertools.product([False, True], ["gelu", "geglu"], [None, 16], [True, False]))


def pooler(pre_norm=False, ff="gelu", head_dim=None, out_bias=True, seed=0):
    torch.manual_seed(seed)
    p = LatentAttentionPooling(D, N, HEADS, 2, pre_norm=pre_norm, ff=ff, head_dim=head_dim, out_bias=out_bias)
    with torch.no_grad():  # non-trivial norms and biases, so each one matters
        for name, t in p.named_parameters():
            if name.endswith("bias"):
                t.normal_(std=0.1)
            elif name.startswith(("norm_", "ff_norm")):
                t.uniform_(0.5, 1.5)
    return p.eval()


def test_default_keys_are_unchanged():
    assert set(LatentAttentionPooling(D, N, HEADS).state_dict()) == OLD_KEYS
    config = config_from_spec("cxr-text:cxr-llm-tiny")
    assert set(build_pooler(config).state_dict()) == OLD_KEYS


@pytest.mark.parametrize("pre_norm,ff,head_dim,out_bias", COMBOS)
def test_options_build_with_the_right_shapes(pre_norm, ff, head_dim, out_bias):
    state = pooler(pre_norm, ff, head_dim, out_bias).state_dict()
    keys = (OLD_KEYS | (NORM_KEYS if pre_norm else set())) - (set() if out_bias else {"to_out.bias"})
    assert set(state) == keys
    inner = HEADS * (head_dim or D // HEADS)
    assert state["to_q.weight"].shape == (inner, D) and state["to_kv.weight"].shape == (2 * inner, D)
    assert state["to_out.weight"].shape == (D, inner)
    assert state["mlp.0.weight"].shape == ((4 if ff == "geglu" else 2) * D, D)
    assert state["mlp.2.weight"].shape == (D, 2 * D)


@pytest.mark.parametrize("pre_norm,ff,head_dim,out_bias", COMBOS)
@torch.no_grad()
def test_packed_batch_equals_per_sample(pre_norm, ff, head_dim, out_bias):
    p = pooler(pre_norm, ff, head_dim, out_bias)
    hidden = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()
    batched = p(hidden, mask)
    one_by_one = torch.stack([p.attend(h[m]).mean(0) for h, m in zip(hidden, mask)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


@torch.no_grad()
def test_each_option_changes_the_output():
    hidden = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 5, dtype=torch.bool)
    base = pooler()(hidden, mask)
    for kwargs in ({"pre_norm": True}, {"ff": "geglu"}, {"head_dim": 16}, {"out_bias": False}):
        assert not torch.allclose(pooler(**kwargs)(hidden, mask), base, atol=1e-4), kwargs


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="latent_ff"):
        config_from_spec('cxr-text:cxr-llm-tiny{"latent_ff": "swiglu"}')
    with pytest.raises(ValueError, match="ff must be"):
        LatentAttentionPooling(D, N, HEADS, ff="relu")
    with pytest.raises(ValueError, match="head_dim"):
        LatentAttentionPooling(30, N, HEADS)  # 30 / 4 heads: only an explicit head_dim works
    assert LatentAttentionPooling(30, N, HEADS, head_dim=8).to_q.out_features == 32


@torch.no_grad()
def test_config_fields_reach_the_tower_and_the_spec(tmp_path):
    spec = ('cxr-text:cxr-llm-tiny{"lora": null, "latent_pre_norm": true, "latent_ff": "geglu", '
            '"latent_head_dim": 8, "latent_out_bias": false}')
    config = config_from_spec(spec)
    assert "latent_ff" in spec_for(config)
    assert arch_of(config_from_spec(spec_for(config))) == arch_of(config)
    tower = CXRTextModel(config).eval()
    p = tower.pooler
    assert p.pre_norm and p.ff == "geglu" and p.head_dim == 8 and p.to_out.bias is None
    tower.save_pretrained(tmp_path)
    from transformers import AutoModel
    again = AutoModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2, 0], [1, 50, 2, 0, 0, 0]])
    assert torch.allclose(again(input_ids=ids).pooler_output, tower(input_ids=ids).pooler_output, atol=1e-6)


def test_cxr_llm_uses_the_authors_mha_pooler():
    """The authors' released layout: nn.MultiheadAttention + Linear-GELU-Linear, no residuals
    (see open_clip_cxr/text/pooler_layouts.py for why), their instruction format and similarity."""
    config = config_from_spec("cxr-text:cxr-llm")
    assert (config.latent_pre_norm, config.latent_ff, config.latent_head_dim, config.latent_out_bias,
            config.latent_in_bias, config.latent_residual, config.latent_mlp_ratio) == \
        (False, "gelu", None, True, True, False, 1)
    assert (config.instruction_format, config.similarity) == ("llm2vec", "clip")
    assert "_comment" not in config.to_dict()   # the arch's comment is documentation, not a field
    # The small and tiny archs keep the original layout.
    for name in ("cxr-llm-small", "cxr-llm-tiny"):
        c = config_from_spec(f"cxr-text:{name}")
        assert (c.latent_pre_norm, c.latent_ff, c.latent_head_dim, c.latent_out_bias) == (False, "gelu", None, True)
        assert (c.latent_in_bias, c.latent_residual, c.instruction_format, c.similarity) == \
            (False, True, "separator", "cosine")
