"""Importing LLM2Vec-style text encoders (llm2vec4cxr layout) into our CXRTextModel."""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel

from open_clip_cxr_convert.llm2vec import convert_llm2vec, save_text_tower
from open_clip_cxr.text.pooler_layouts import (PoolerLayoutError, convert_pooler, convert_pooler_state, detect_layout,
                                       pooler_options)
from conversion_fixtures import BYTE_TOKENIZER, PROBE_IDS
from open_clip_cxr.cli import main as cli_main
from open_clip_cxr.text import CXRTextModel, config_from_spec
from open_clip_cxr.text.pooling import build_pooler

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


def _mha(d=D, n=16, bias_kv=False):
    mha = nn.MultiheadAttention(d, HEADS, batch_first=True, add_bias_kv=bias_kv)
    state = {"multihead_attn." + k: v for k, v in mha.state_dict().items()}
    return {"latents": torch.randn(n, d), **state, "mlp.0.weight": torch.randn(d, d), "mlp.0.bias": torch.zeros(d),
            "mlp.2.weight": torch.randn(d, d), "mlp.2.bias": torch.zeros(d)}


class RefNVPooler(nn.Module):
    """NV-Embed-style latent attention written out independently of our pooler: PreNorm
    cross-attention (tokens query the LayerNormed latents, explicit softmax), PreNorm GEGLU
    feed-forward, residuals around both, masked mean."""

    def __init__(self, d=D, n=16, heads=HEADS, head_dim=None, mult=2, out_bias=False):
        super().__init__()
        self.heads = heads
        inner = heads * (head_dim or d // heads)
        self.latents = nn.Parameter(torch.randn(n, d))
        self.attn_norm, self.ctx_norm, self.ff_norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, d, bias=out_bias)
        self.ff_in, self.ff_out = nn.Linear(d, 2 * mult * d), nn.Linear(mult * d, d)
        with torch.no_grad():  # non-trivial norms and biases, so a dropped one shows
            for norm in (self.attn_norm, self.ctx_norm, self.ff_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(std=0.1)
            for p in (self.ff_in.bias, self.ff_out.bias) + ((self.to_out.bias,) if out_bias else ()):
                p.normal_(std=0.1)

    def forward(self, x, mask):
        b, L, _ = x.shape
        h = self.heads
        lat = self.ctx_norm(self.latents)
        q = self.to_q(self.attn_norm(x)).reshape(b, L, h, -1).permute(0, 2, 1, 3)  # B H L dh
        k = self.to_k(lat).reshape(lat.shape[0], h, -1).permute(1, 0, 2)          # H N dh
        v = self.to_v(lat).reshape(lat.shape[0], h, -1).permute(1, 0, 2)
        weights = (torch.einsum("bhld,hnd->bhln", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
        attended = torch.einsum("bhln,hnd->bhld", weights, v).permute(0, 2, 1, 3).reshape(b, L, -1)
        x = x + self.to_out(attended)
        value, gate = self.ff_in(self.ff_norm(x)).chunk(2, dim=-1)
        x = x + self.ff_out(value * F.gelu(gate))
        m = mask.unsqueeze(-1).float()
        return (x * m).sum(1) / m.sum(1)

    def checkpoint(self, layout="prenorm", dropout_layers=False):
        """Its tensors under the "prenorm" (split k/v) or "nv_embed" (fused k/v) names."""
        if layout == "prenorm":
            attn, ff, last = "cross_attn.", "cross_ff.", "3" if dropout_layers else "2"
            kv = {attn + "fn.to_k.weight": self.to_k.weight, attn + "fn.to_v.weight": self.to_v.weight}
        else:
            attn, ff, last = "cross_attend_blocks.0.", "cross_attend_blocks.1.", "2"
            kv = {attn + "fn.to_kv.weight": torch.cat([self.to_k.weight, self.to_v.weight])}
        out = {"latents": self.latents, attn + "fn.to_q.weight": self.to_q.weight, **kv,
               attn + "fn.to_out.weight": self.to_out.weight,
               ff + "fn.net.0.weight": self.ff_in.weight, ff + "fn.net.0.bias": self.ff_in.bias,
               f"{ff}fn.net.{last}.weight": self.ff_out.weight, f"{ff}fn.net.{last}.bias": self.ff_out.bias}
        if self.to_out.bias is not None:
            out[attn + "fn.to_out.bias"] = self.to_out.bias
        for prefix, norm in ((attn + "norm.", self.attn_norm), (attn + "norm_context.", self.ctx_norm),
                             (ff + "norm.", self.ff_norm)):
            out.update({prefix + "weight": norm.weight, prefix + "bias": norm.bias})
        return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("layout,head_dim,out_bias,dropout_layers", [
    ("prenorm", None, False, False),   # the later fork: inner width = hidden
    ("prenorm", 32, False, True),      # the earlier fork: fixed head_dim (inner 128 != hidden 64), Dropout layers
    ("nv_embed", D, True, False),      # NV-Embed: head_dim = hidden (inner = heads x hidden), fused to_kv
])
@torch.no_grad()
def test_nv_style_pooler_converts_exactly(tmp_path, layout, head_dim, out_bias, dropout_layers):
    tower = source_tower()
    torch.manual_seed(1)
    ref = RefNVPooler(head_dim=head_dim, out_bias=out_bias).eval()
    state = ref.checkpoint(layout, dropout_layers)
    assert detect_layout(state) == layout
    src = write_source(tmp_path, tower, state)
    model = convert_llm2vec(src, latent_heads=HEADS)
    cfg = model.config
    assert (cfg.latent_pre_norm, cfg.latent_ff, cfg.latent_mlp_ratio) == (True, "geglu", 2)
    assert cfg.latent_out_bias == out_bias
    assert cfg.latent_head_dim == (None if head_dim in (None, D // HEADS) else head_dim)
    expected = ref(tower(input_ids=PROBE_IDS).last_hidden_state, PROBE_IDS != 0)
    assert torch.allclose(pooled(model), expected, atol=1e-5)
    # The options travel in the saved config: the folder reloads to the same embeddings.
    again = AutoModel.from_pretrained(save_text_tower(model, tmp_path / "out")).eval()
    assert again.config.latent_ff == "geglu" and torch.allclose(pooled(again), expected, atol=1e-5)


@pytest.mark.parametrize("layout,state,options", [
    ("prenorm", _geglu_prenorm(), {"latent_head_dim": 32, "latent_mlp_ratio": 4}),
    ("prenorm", _geglu_prenorm(head_dim=D // HEADS, dropout_layers=True), {"latent_head_dim": None}),
    ("nv_embed", _nv_embed(), {"latent_head_dim": 8 * D // HEADS, "latent_mlp_ratio": 4}),
])
def test_nv_layouts_infer_their_options(layout, state, options):
    assert detect_layout(state) == layout
    ours, found = convert_pooler(state, hidden_size=D, heads=HEADS)
    assert found["latent_pre_norm"] and found["latent_ff"] == "geglu" and not found["latent_out_bias"]
    assert {k: found[k] for k in options} == options
    config = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null}')
    for k, v in found.items():
        setattr(config, k, v)
    build_pooler(config).load_state_dict(ours)  # strict: every key and shape fits


def _drop(state, *prefixes):
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("state,words", [
    (_mha(bias_kv=True), ["no counterpart", "multihead_attn.bias_k"]),
    (_drop(_geglu_prenorm(), "cross_ff.norm."), ["before the attention but none before the feed-forward"]),
    (_drop(_nv_embed(), "cross_attend_blocks.0.norm."), ["before the feed-forward but none before the attention"]),
    (_drop(_geglu_prenorm(), "cross_attn.norm_context."), ["none on the latents"]),
    (_geglu_prenorm(head_dim=5, heads=3), ["width of 15, not divisible by 8 heads"]),
])
def test_unrepresentable_poolers_are_refused_with_reasons(tmp_path, state, words):
    with pytest.raises(PoolerLayoutError) as err:
        convert_pooler_state(state, hidden_size=D)
    for word in words:
        assert word in str(err.value)
    assert "--pooler drop" in str(err.value)
    src = write_source(tmp_path, source_tower(), state)
    with pytest.raises(PoolerLayoutError):
        convert_llm2vec(src)


def test_state_for_a_target_tower():
    """`options=` fits the state to a given tower: a missing output bias becomes zeros (exact),
    other differences are named."""
    ref = RefPrenormFreePooler()
    state = {k: v.detach() for k, v in ref.checkpoint().items()}
    tiny = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null}')
    ours = convert_pooler_state(state, hidden_size=D, options=pooler_options(tiny))
    assert torch.equal(ours["to_out.bias"], torch.zeros(D))
    build_pooler(tiny).load_state_dict(ours)
    with pytest.raises(PoolerLayoutError, match="latent_pre_norm: checkpoint True, tower False"):
        convert_pooler_state(_geglu_prenorm(head_dim=D // HEADS), hidden_size=D, options=pooler_options(tiny))


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
    # Another layout is converted as a whole when it fits the config; if not, it is refused
    # naming the fields (not silently left random: with LoRA on, the pooler stays frozen).
    config.base_weights = str(write_source(tmp_path, tower, _geglu_prenorm(), name="nv_style"))
    with pytest.raises(PoolerLayoutError, match="latent_pre_norm: checkpoint True, tower False"):
        CXRTextModel.from_base(config)


@torch.no_grad()
def test_base_weights_convert_the_authors_mha_layout(tmp_path):
    """`cxr-llm` loads `hf:lukeingawesome/llm2vec4cxr` through base_weights: an "mha" pooler folder
    is converted as a whole into a tower configured like cxr-llm's pooler."""
    tower = source_tower()
    state = _mha(n=16)
    src = write_source(tmp_path, tower, state)
    spec = ('cxr-text:cxr-llm-tiny{"lora": null, "output_norm": false, "latent_mlp_ratio": 1, '
            '"latent_in_bias": true, "latent_residual": false}')
    config = config_from_spec(spec)
    config.base_weights = str(src)
    model = CXRTextModel.from_base(config).eval()
    assert model.load_report["pooler_loaded"] and not model.load_report["unexpected"]
    assert torch.equal(model.pooler.to_q.bias, state["multihead_attn.in_proj_bias"][:D])
    assert torch.allclose(pooled(model), pooled(convert_llm2vec(src, latent_heads=HEADS)), atol=1e-6)


@torch.no_grad()
def test_base_weights_read_our_nv_style_options(tmp_path):
    """Our own key names under `latent_attn.`, with the NV-style options, load key by key."""
    spec = ('cxr-text:cxr-llm-tiny{"lora": null, "output_norm": false, "latent_pre_norm": true, '
            '"latent_ff": "geglu", "latent_head_dim": 8, "latent_out_bias": false}')
    torch.manual_seed(0)
    tower = CXRTextModel(config_from_spec(spec)).eval()
    for name in ("norm_tokens", "norm_latents", "ff_norm"):
        getattr(tower.pooler, name).weight.uniform_(0.5, 1.5)
    config = config_from_spec(spec)
    config.base_weights = str(write_source(tmp_path, tower, tower.pooler.state_dict()))
    model = CXRTextModel.from_base(config).eval()
    assert model.load_report["pooler_loaded"] and not model.load_report["unexpected"]
    assert torch.allclose(pooled(model), pooled(tower), atol=1e-6)


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
