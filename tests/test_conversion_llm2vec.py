"""Importing LLM2Vec-style text encoders (llm2vec4cxr layout) into our CXRTextModel."""
import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel

from conversion.llm2vec import convert_llm2vec, save_text_tower
from conversion.pooler_layouts import PoolerLayoutError, convert_pooler_state, detect_layout
from conversion_fixtures import BYTE_TOKENIZER, PROBE_IDS
from open_clip_cxr.cli import main as cli_main
from open_clip_cxr.text import CXRTextModel, config_from_spec

D, HEADS = 64, 4


def source_tower(seed=0):
    """The 'authors' encoder: tiny decoder + latent attention, no output norm, no LoRA."""
    torch.manual_seed(seed)
    config = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null, "output_norm": false}')
    tower = CXRTextModel(config)
    with torch.no_grad():
        tower.pooler.to_out.bias.normal_(std=0.05)
        tower.pooler.mlp[0].bias.normal_(std=0.05)
    return tower.eval()


def write_source(tmp_path, tower, pooler_state, prefix="model.", name="llm2vec4cxr"):
    """A folder laid out like lukeingawesome/llm2vec4cxr: config.json + model.safetensors + tokenizer."""
    src = tmp_path / name
    src.mkdir()
    state = {prefix + k: v.clone() for k, v in tower.llm.state_dict().items()}
    state["lm_head.weight"] = tower.llm.embed_tokens.weight.clone()  # dropped on import
    state.update({"latent_attn." + k: v.clone().contiguous() for k, v in pooler_state.items()})
    save_file(state, str(src / "model.safetensors"))
    cfg = dict(tower.config.llm, architectures=["LLM2Vec4CXRModel"], auto_map={"AutoModel": "x.y"}, torch_dtype="bfloat16")
    (src / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{BYTE_TOKENIZER}/{name}", src / name)
    return src


@torch.no_grad()
def pooled(model, ids=PROBE_IDS):
    return model(input_ids=ids).pooler_output


@pytest.mark.parametrize("prefix", ["model.", ""])
@torch.no_grad()
def test_own_layout_imports_exactly(tmp_path, prefix):
    tower = source_tower()
    src = write_source(tmp_path, tower, tower.pooler.state_dict(), prefix)
    model = convert_llm2vec(src)
    assert model.config.pooling == "latent_attention" and model.config.num_latents == 16
    assert not model.config.output_norm and model.config.lora is None
    assert torch.allclose(pooled(model), pooled(tower), atol=1e-6)
    # The saved folder loads through transformers' AutoModel and carries the tokenizer.
    out = save_text_tower(model, tmp_path / "out", tokenizer_src=src)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    again = AutoModel.from_pretrained(out).eval()
    assert isinstance(again, CXRTextModel)
    assert torch.allclose(pooled(again), pooled(tower), atol=1e-6)


class RefPrenormFreePooler(nn.Module):
    """NV-style pooler with split k/v, a LayerNorm on the latents and no token norms."""

    def __init__(self, d=D, n=16, heads=HEADS, ratio=2):
        super().__init__()
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(n, d))
        self.ctx_norm = nn.LayerNorm(d)
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.to_out = nn.Linear(d, d, bias=False)
        self.ff = nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))
        with torch.no_grad():
            self.ctx_norm.weight.uniform_(0.5, 1.5)
            self.ctx_norm.bias.normal_(std=0.1)

    def forward(self, x, mask):
        b, L, d = x.shape
        lat = self.ctx_norm(self.latents)
        q = self.to_q(x).view(b, L, self.heads, -1).transpose(1, 2)
        k = self.to_k(lat).view(-1, self.heads, d // self.heads).transpose(0, 1)
        v = self.to_v(lat).view(-1, self.heads, d // self.heads).transpose(0, 1)
        a = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        x = x + self.to_out(a.transpose(1, 2).reshape(b, L, d))
        x = x + self.ff(x)
        m = mask.unsqueeze(-1).float()
        return (x * m).sum(1) / m.sum(1)

    def checkpoint(self):
        return {"latents": self.latents, "cross_attn.norm_context.weight": self.ctx_norm.weight,
                "cross_attn.norm_context.bias": self.ctx_norm.bias, "cross_attn.fn.to_q.weight": self.to_q.weight,
                "cross_attn.fn.to_k.weight": self.to_k.weight, "cross_attn.fn.to_v.weight": self.to_v.weight,
                "cross_attn.fn.to_out.weight": self.to_out.weight, "cross_ff.fn.net.0.weight": self.ff[0].weight,
                "cross_ff.fn.net.0.bias": self.ff[0].bias, "cross_ff.fn.net.2.weight": self.ff[2].weight,
                "cross_ff.fn.net.2.bias": self.ff[2].bias}


@torch.no_grad()
def test_split_kv_and_latent_norm_fold_exactly(tmp_path):
    tower = source_tower()
    ref = RefPrenormFreePooler()
    src = write_source(tmp_path, tower, {k: v.detach() for k, v in ref.checkpoint().items()})
    model = convert_llm2vec(src, latent_heads=HEADS)
    out = tower(input_ids=PROBE_IDS)
    expected = ref(out.last_hidden_state, PROBE_IDS != 0)
    assert torch.allclose(pooled(model), expected, atol=1e-5)


def _geglu_prenorm(d=D, n=16, mult=4, head_dim=32, heads=HEADS, dropout_layers=False):
    """The NV-style module of later LLM2Vec forks (PreNorm + GEGLU), as its state dict."""
    inner = heads * head_dim
    last = "3" if dropout_layers else "2"
    return {"latents": torch.randn(n, d), "cross_attn.norm.weight": torch.ones(d), "cross_attn.norm.bias": torch.zeros(d),
            "cross_attn.norm_context.weight": torch.ones(d), "cross_attn.norm_context.bias": torch.zeros(d),
            "cross_attn.fn.to_q.weight": torch.randn(inner, d), "cross_attn.fn.to_k.weight": torch.randn(inner, d),
            "cross_attn.fn.to_v.weight": torch.randn(inner, d), "cross_attn.fn.to_out.weight": torch.randn(d, inner),
            "cross_ff.norm.weight": torch.ones(d), "cross_ff.norm.bias": torch.zeros(d),
            "cross_ff.fn.net.0.weight": torch.randn(2 * mult * d, d), "cross_ff.fn.net.0.bias": torch.zeros(2 * mult * d),
            f"cross_ff.fn.net.{last}.weight": torch.randn(d, mult * d), f"cross_ff.fn.net.{last}.bias": torch.zeros(d)}


def _nv_embed(d=D, n=16, mult=4):
    return {"latents": torch.randn(n, d), "cross_attend_blocks.0.norm.weight": torch.ones(d),
            "cross_attend_blocks.0.norm.bias": torch.zeros(d), "cross_attend_blocks.0.norm_context.weight": torch.ones(d),
            "cross_attend_blocks.0.norm_context.bias": torch.zeros(d),
            "cross_attend_blocks.0.fn.to_q.weight": torch.randn(8 * d, d),
            "cross_attend_blocks.0.fn.to_kv.weight": torch.randn(16 * d, d),
            "cross_attend_blocks.0.fn.to_out.weight": torch.randn(d, 8 * d),
            "cross_attend_blocks.1.norm.weight": torch.ones(d), "cross_attend_blocks.1.norm.bias": torch.zeros(d),
            "cross_attend_blocks.1.fn.net.0.weight": torch.randn(2 * mult * d, d),
            "cross_attend_blocks.1.fn.net.0.bias": torch.zeros(2 * mult * d),
            "cross_attend_blocks.1.fn.net.2.weight": torch.randn(d, mult * d),
            "cross_attend_blocks.1.fn.net.2.bias": torch.zeros(d)}


def _mha(d=D, n=16):
    mha = nn.MultiheadAttention(d, HEADS, batch_first=True)
    state = {"multihead_attn." + k: v for k, v in mha.state_dict().items()}
    return {"latents": torch.randn(n, d), **state, "mlp.0.weight": torch.randn(d, d), "mlp.0.bias": torch.zeros(d),
            "mlp.2.weight": torch.randn(d, d), "mlp.2.bias": torch.zeros(d)}


@pytest.mark.parametrize("layout,state,words", [
    ("prenorm", _geglu_prenorm(), ["LayerNorm on the tokens", "GEGLU", "attention width"]),
    ("prenorm", _geglu_prenorm(head_dim=D // HEADS, dropout_layers=True), ["LayerNorm on the tokens", "GEGLU"]),
    ("nv_embed", _nv_embed(), ["LayerNorm on the tokens", "GEGLU", "attention width"]),
    ("mha", _mha(), ["no residual"]),
])
def test_unrepresentable_poolers_are_refused_with_reasons(tmp_path, layout, state, words):
    assert detect_layout(state) == layout
    with pytest.raises(PoolerLayoutError) as err:
        convert_pooler_state(state, hidden_size=D)
    for word in words:
        assert word in str(err.value)
    assert "--pooler drop" in str(err.value)
    src = write_source(tmp_path, source_tower(), state)
    with pytest.raises(PoolerLayoutError):
        convert_llm2vec(src)


@torch.no_grad()
def test_pooler_drop_keeps_the_decoder(tmp_path):
    tower = source_tower()
    src = write_source(tmp_path, tower, _geglu_prenorm())
    model = convert_llm2vec(src, pooler="drop")
    assert model.config.pooling == "mean"
    assert torch.equal(model(input_ids=PROBE_IDS).last_hidden_state, tower(input_ids=PROBE_IDS).last_hidden_state)


@torch.no_grad()
def test_base_weights_read_the_llm2vec_layout(tmp_path):
    """`CXRTextModel.from_base` reads llm2vec4cxr folders through the POOLER_KEY_MAPPERS entry."""
    tower = source_tower()
    src = write_source(tmp_path, tower, tower.pooler.state_dict())
    config = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null, "output_norm": false}')
    config.base_weights = str(src)
    model = CXRTextModel.from_base(config).eval()
    assert model.load_report["pooler_loaded"]
    assert torch.allclose(pooled(model), pooled(tower), atol=1e-6)
    # A layout our pooler cannot hold is refused, not silently left random.
    config.base_weights = str(write_source(tmp_path, tower, _geglu_prenorm(), name="nv_style"))
    with pytest.raises(PoolerLayoutError, match="convert --from llm2vec"):
        CXRTextModel.from_base(config)


@torch.no_grad()
def test_convert_cli(tmp_path, capsys):
    tower = source_tower()
    src = write_source(tmp_path, tower, tower.pooler.state_dict())
    assert cli_main(["convert", "--from", "llm2vec", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "latent_attention pooling" in capsys.readouterr().out
    assert torch.allclose(pooled(AutoModel.from_pretrained(tmp_path / "out").eval()), pooled(tower), atol=1e-6)
    # ... and the output serves as a tower's `base_weights` (our own layout: llm.*, pooler.*).
    config = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null, "output_norm": false}')
    config.base_weights = str(tmp_path / "out")
    from_base = CXRTextModel.from_base(config).eval()
    assert from_base.load_report["pooler_loaded"] and not from_base.load_report["unexpected"]
    assert torch.allclose(pooled(from_base), pooled(tower), atol=1e-6)
