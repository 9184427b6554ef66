"""Parity with the authors' own computation, for every pooler layout their public code produces.

A tiny checkpoint is written here in each of their layouts (a Llama decoder under `model.` plus
`latent_attn.*`), converted, and loaded through plain `open_clip.create_model`. Its
`encode_text` is compared at 1e-5 (fp32) with a reference written here from their code's math,
in plain torch and without any of our modules:

- their `LlamaBiModel`: the Llama forward with every non-pad token visible to every other,
  left padding, positions 0..L-1 over the padded row (transformers 4.44's `cache_position`);
- their tokenisation (`LLM2Vec.tokenize`, llm2clip4cxr's `collate_fn`): marker removed, the
  joined string tokenised, the last n tokens pooled (n = the text tokenised alone);
- "mha" (`llm2vec/llm2vec.py`): per sample, `nn.MultiheadAttention` with the pooled tokens as
  queries and the latents as keys and values, Linear-GELU-Linear, mean over the pooled tokens;
- "prenorm" (the `LatentAttentionPooling(d_model, num_heads, num_latents)` called by
  `modeling_llm2vec4cxr.py`, NV-style): PreNorm cross-attention, PreNorm GEGLU feed-forward,
  residuals, masked mean; with both public head widths (hidden / heads, and 64-style fixed);
- the CLIP checkpoint (llm2clip4cxr `retrieval.py`): LoRA deltas on q/k/v/o (alpha / r), the
  projection LayerNorm -> Linear with bias, and scores `logit_scale.exp() * I @ T^T`, no L2
  normalisation.
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import open_clip
import open_clip_cxr
from open_clip_cxr_convert.llm2vec import convert_llm2vec, save_text_tower
from conversion_fixtures import BYTE_TOKENIZER
from open_clip_cxr.text.instructions import LLM2VEC_MARKER, LLM2VecTokenizer, with_instruction

H, LAYERS, NH, NKV, HD, FF, VOCAB, LATENTS, POOL_HEADS = 64, 2, 4, 2, 16, 128, 260, 16, 8
LLM = {"model_type": "llama", "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": LAYERS,
       "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": VOCAB, "max_position_embeddings": 1024,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
       "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
INSTRUCTION = "Retrieve the image that best matches the following report.;"
REPORTS = ["Small left pleural effusion.", "No pneumothorax. Heart size normal.", "Cardiomegaly"]
TOL = 1e-5


def _randn(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def llama_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {"embed_tokens.weight": _randn(g, VOCAB, H, std=0.5), "norm.weight": 1 + _randn(g, H)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        s.update({p + "input_layernorm.weight": 1 + _randn(g, H),
                  p + "post_attention_layernorm.weight": 1 + _randn(g, H),
                  p + "self_attn.q_proj.weight": _randn(g, NH * HD, H),
                  p + "self_attn.k_proj.weight": _randn(g, NKV * HD, H),
                  p + "self_attn.v_proj.weight": _randn(g, NKV * HD, H),
                  p + "self_attn.o_proj.weight": _randn(g, H, NH * HD),
                  p + "mlp.gate_proj.weight": _randn(g, FF, H), p + "mlp.up_proj.weight": _randn(g, FF, H),
                  p + "mlp.down_proj.weight": _randn(g, H, FF)})
    return s


def mha_pooler(seed=1):
    """The state dict of their `llm2vec.LatentAttentionPooling` (nn.MultiheadAttention inside)."""
    g = torch.Generator().manual_seed(seed)
    return {"latents": _randn(g, LATENTS, H, std=1.0),
            "multihead_attn.in_proj_weight": _randn(g, 3 * H, H, std=0.2),
            "multihead_attn.in_proj_bias": _randn(g, 3 * H),
            "multihead_attn.out_proj.weight": _randn(g, H, H, std=0.2), "multihead_attn.out_proj.bias": _randn(g, H),
            "mlp.0.weight": _randn(g, H, H, std=0.2), "mlp.0.bias": _randn(g, H),
            "mlp.2.weight": _randn(g, H, H, std=0.2), "mlp.2.bias": _randn(g, H)}


def prenorm_pooler(head_dim, seed=2, mult=4):
    """The NV-style pooler (PreNorm + GEGLU, split k/v, bias-free attention) as its state dict."""
    g = torch.Generator().manual_seed(seed)
    inner = POOL_HEADS * head_dim
    return {"latents": _randn(g, LATENTS, H, std=1.0),
            "cross_attn.norm.weight": 1 + _randn(g, H), "cross_attn.norm.bias": _randn(g, H),
            "cross_attn.norm_context.weight": 1 + _randn(g, H), "cross_attn.norm_context.bias": _randn(g, H),
            "cross_attn.fn.to_q.weight": _randn(g, inner, H, std=0.2),
            "cross_attn.fn.to_k.weight": _randn(g, inner, H, std=0.2),
            "cross_attn.fn.to_v.weight": _randn(g, inner, H, std=0.2),
            "cross_attn.fn.to_out.weight": _randn(g, H, inner, std=0.2),
            "cross_ff.norm.weight": 1 + _randn(g, H), "cross_ff.norm.bias": _randn(g, H),
            "cross_ff.fn.net.0.weight": _randn(g, 2 * mult * H, H, std=0.2),
            "cross_ff.fn.net.0.bias": _randn(g, 2 * mult * H),
            "cross_ff.fn.net.3.weight": _randn(g, H, mult * H, std=0.2), "cross_ff.fn.net.3.bias": _randn(g, H)}


# -- the reference: their math, in plain torch ------------------------------------------------------

def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta=10000.0):
    """Llama's rotary embedding (rotate-half form) at integer positions `pos` (L,)."""
    inv = 1.0 / theta ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    ang = torch.cat([pos[:, None].float() * inv] * 2, dim=-1)
    x1, x2 = x[..., :HD // 2], x[..., HD // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()


def ref_decoder(w, ids, attention_mask):
    """Their bidirectional Llama: (B, L) left-padded ids -> (B, L, H) last hidden states."""
    b, L = ids.shape
    x = w["embed_tokens.weight"][ids]
    pos = torch.arange(L)
    bias = torch.zeros(b, 1, 1, L).masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(b, L, NH, HD).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(b, L, NKV, HD).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, L, NKV, HD).transpose(1, 2)
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(NH // NKV, dim=1), v.repeat_interleave(NH // NKV, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD) + bias, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, L, NH * HD) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gated = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + gated @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["norm.weight"])


def ref_tokenize(texts, max_length=128):
    """`LLM2Vec.tokenize` on the byte tokenizer: (ids, attention_mask, embed_mask), left padded.
    A text without the marker embeds all its tokens (their `encode_text`)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(BYTE_TOKENIZER)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    parts = [t.split(LLM2VEC_MARKER) for t in texts]
    enc = tok(["".join(p) for p in parts], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    embed = enc["attention_mask"].clone()
    for i, p in enumerate(parts):
        if len(p) > 1:
            n = len(tok(p[1], add_special_tokens=False)["input_ids"])
            embed[i] = 0
            embed[i, -n:] = 1
    return enc["input_ids"], enc["attention_mask"], embed


def ref_mha_pool(state, hidden, embed_mask):
    mha = nn.MultiheadAttention(H, POOL_HEADS, batch_first=True)
    mha.load_state_dict({k[len("multihead_attn."):]: v for k, v in state.items() if k.startswith("multihead_attn.")})
    mlp = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, H))
    mlp.load_state_dict({k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")})
    lat = state["latents"][None]
    out = []
    for i, n in enumerate(embed_mask.sum(1).tolist()):   # their per-sample loop over the last n tokens
        tokens = hidden[i, -n:][None]
        out.append(mlp(mha(tokens, lat, lat)[0]).mean(1)[0])
    return torch.stack(out)


def ref_prenorm_pool(state, hidden, embed_mask, head_dim):
    s = {k: v for k, v in state.items()}
    ln = lambda x, p: F.layer_norm(x, (H,), s[p + ".weight"], s[p + ".bias"])  # noqa: E731
    b, L, _ = hidden.shape
    x, lat = ln(hidden, "cross_attn.norm"), ln(state["latents"], "cross_attn.norm_context")
    q = (x @ s["cross_attn.fn.to_q.weight"].T).view(b, L, POOL_HEADS, head_dim).transpose(1, 2)
    k = (lat @ s["cross_attn.fn.to_k.weight"].T).view(-1, POOL_HEADS, head_dim).transpose(0, 1)
    v = (lat @ s["cross_attn.fn.to_v.weight"].T).view(-1, POOL_HEADS, head_dim).transpose(0, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    y = hidden + (att @ v).transpose(1, 2).reshape(b, L, -1) @ s["cross_attn.fn.to_out.weight"].T
    z = ln(y, "cross_ff.norm") @ s["cross_ff.fn.net.0.weight"].T + s["cross_ff.fn.net.0.bias"]
    val, gate = z.chunk(2, dim=-1)
    y = y + (val * F.gelu(gate)) @ s["cross_ff.fn.net.3.weight"].T + s["cross_ff.fn.net.3.bias"]
    m = embed_mask[..., None].float()
    return (y * m).sum(1) / m.sum(1)


# -- the converted model, through plain OpenCLIP ------------------------------------------------------

def write_authors_folder(tmp_path, decoder, pooler, name):
    """A folder laid out like lukeingawesome/llm2vec4cxr (LLM2Vec4CXRModel: `model.` + `latent_attn.`)."""
    src = tmp_path / name
    src.mkdir()
    state = {"model." + k: v.contiguous() for k, v in decoder.items()}
    state.update({"latent_attn." + k: v.contiguous() for k, v in pooler.items()})
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(dict(LLM, architectures=["LLM2Vec4CXRModel"])))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{BYTE_TOKENIZER}/{f}", src / f)
    return src


def openclip_model(tmp_path, tower_dir, name):
    """Register an OpenCLIP config whose text tower is the converted folder; build it plainly."""
    cfg = {"embed_dim": H,
           "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
           "text_cfg": {"hf_model_name": str(tower_dir), "hf_tokenizer_name": str(tower_dir),
                        "tokenizer_mode": "llm2vec", "hf_proj_type": None, "hf_pooler_type": "cls_pooler",
                        "context_length": 129}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    model = open_clip.create_model(name, pretrained_image=False).eval()
    return model, open_clip_cxr.get_tokenizer(name)


def texts(tokenizer):
    return with_instruction(REPORTS, INSTRUCTION, tokenizer) + REPORTS[:2]


@pytest.mark.parametrize("layout,head_dim", [("mha", None), ("prenorm", H // POOL_HEADS), ("prenorm", 4)])
@torch.no_grad()
def test_text_tower_matches_the_authors_math(tmp_path, layout, head_dim):
    decoder = llama_state()
    pooler = mha_pooler() if layout == "mha" else prenorm_pooler(head_dim)
    src = write_authors_folder(tmp_path, decoder, pooler, f"src-{layout}")
    tower = convert_llm2vec(src, latent_heads=POOL_HEADS)
    assert tower.config.instruction_format == "llm2vec" and tower.config.instruction_separator_id == 3
    out = save_text_tower(tower, tmp_path / f"tower-{layout}", tokenizer_src=src)
    name = f"parity-{layout}-{head_dim}"
    model, tokenizer = openclip_model(tmp_path, out, name)
    batch = texts(tokenizer)
    assert all(LLM2VEC_MARKER in t for t in batch[:3])
    ours = model.encode_text(tokenizer(batch))

    ids, attn, embed = ref_tokenize(batch)
    hidden = ref_decoder(decoder, ids, attn)
    ref = ref_mha_pool(pooler, hidden, embed) if layout == "mha" else ref_prenorm_pool(pooler, hidden, embed, head_dim)
    diff = float((ours - ref).abs().max())
    print(f"PARITY {layout} head_dim={head_dim}: max|diff| = {diff:.2e}")
    assert diff < TOL, diff
    # The instruction changes the embedding (it is read), and pooling skips it (it is not pooled).
    assert float((ours[0] - ours[3]).abs().max()) > 1e-3


def test_tokenizer_matches_their_ids_on_a_bpe_tokenizer():
    """On a BPE tokenizer (SmolLM2's) joining instruction and text changes the tokens at the
    boundary; ours tokenises the joined string as theirs does, the mark in front of the last n."""
    from open_clip.tokenizer import HFTokenizer
    from open_clip_cxr.openclip_hooks import PACKAGE_DIR
    base = HFTokenizer(str(PACKAGE_DIR / "text" / "tokenizers" / "smollm2"), context_length=64)
    tok = LLM2VecTokenizer(base, 64)
    hf = tok.tokenizer
    instr, text = "Retrieve the image that best matches the following report.; ", "There is a small effusion."
    row = tok([instr + LLM2VEC_MARKER + text])[0]
    joined = hf(instr + text)["input_ids"]
    n = len(hf(text, add_special_tokens=False)["input_ids"])
    assert hf(instr)["input_ids"] + hf(text, add_special_tokens=False)["input_ids"] != joined   # boundary differs
    cut = row.tolist().index(tok.marker_id)
    real = [t for t in row.tolist() if t != tok.pad_id]
    assert real[:cut] + real[cut + 1:] == joined and len(real) - cut - 1 == n


# -- the CLIP checkpoint (LLM2CLIP4CXR) ------------------------------------------------------------

EMBED, R, ALPHA = 24, 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def clip_checkpoint(seed=3):
    """(their CLIP state dict, the source vision model, the pieces the reference needs)."""
    import timm
    from test_conversion_llm2clip import EVA_NAMES, cxr_test_eva02_micro  # noqa: F401  (registers the EVA)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trunk = timm.create_model("cxr_test_eva02_micro", num_classes=0).eval()
    head = nn.Linear(trunk.num_features, EMBED)
    decoder, pooler = llama_state(seed), mha_pooler(seed + 1)
    lora = {}
    for key, w in decoder.items():
        if key.rsplit(".", 2)[-2] in LORA_TARGETS:
            lora[key] = (_randn(g, R, w.shape[1]), _randn(g, w.shape[0], R, std=0.05))
    proj = {"0.weight": 1 + _randn(g, H), "0.bias": _randn(g, H), "1.weight": _randn(g, EMBED, H, std=0.2),
            "1.bias": _randn(g, EMBED)}
    state = {"logit_scale": torch.tensor(math.log(1 / 0.07))}
    for key, value in trunk.state_dict().items():
        for ours, theirs in EVA_NAMES:
            key = key.replace(ours, theirs)
        state["visual." + key] = value.clone()
    state.update({"visual.head." + k: v.detach().clone() for k, v in head.state_dict().items()})
    for key, w in decoder.items():
        for alias in ("text.core.model.base_model.model.", "text.model.model.base_model.model."):
            if key in lora:
                a, b = lora[key]
                stem = key[:-len(".weight")]
                state[alias + stem + ".base_layer.weight"] = w.clone()
                state[alias + stem + ".lora_A.llm2clip.weight"] = a.clone()
                state[alias + stem + ".lora_B.llm2clip.weight"] = b.clone()
            else:
                state[alias + key] = w.clone()
    for alias in ("text.core.latent_attn.", "text.model.latent_attn."):
        state.update({alias + k: v.clone() for k, v in pooler.items()})
    state.update({"text.projection." + k: v for k, v in proj.items()})
    merged = {k: w + (ALPHA / R) * lora[k][1] @ lora[k][0] if k in lora else w for k, w in decoder.items()}
    return state, (trunk, head), {"decoder": merged, "pooler": pooler, "proj": proj,
                                  "logit_scale": state["logit_scale"]}


def clip_cfg():
    spec = ("cxr-text:cxr-llm-tiny" + json.dumps({
        "num_latents": LATENTS, "latent_heads": POOL_HEADS, "latent_mlp_ratio": 1, "latent_in_bias": True,
        "latent_residual": False, "instruction_format": "llm2vec", "similarity": "clip",
        "lora": {"r": R, "alpha": ALPHA}}))
    return {"embed_dim": EMBED,
            "vision_cfg": {"timm_model_name": "cxr_test_eva02_micro", "timm_model_pretrained": False,
                           "timm_pool": "token", "timm_proj": "linear", "image_size": 28},
            "text_cfg": {"hf_model_name": spec, "hf_tokenizer_name": BYTE_TOKENIZER, "tokenizer_mode": "llm2vec",
                         "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler", "context_length": 129}}


@torch.no_grad()
def test_clip_checkpoint_matches_and_ranks_as_the_authors(tmp_path):
    from open_clip_cxr_convert.llm2clip import convert_llm2clip
    from open_clip.tokenizer import HFTokenizer
    from open_clip_cxr.eval.encode import similarity_of
    from open_clip_cxr.eval.retrieval import search
    state, (trunk, head), ref_parts = clip_checkpoint()
    path = tmp_path / "llm2clip4cxr.bin"
    torch.save(state, path)
    model, cfg, _ = convert_llm2clip(path, model_cfg=clip_cfg(), lora_alpha=ALPHA)
    tokenizer = LLM2VecTokenizer(HFTokenizer(BYTE_TOKENIZER, context_length=129), 129)
    batch = with_instruction(REPORTS, INSTRUCTION, tokenizer)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    ids, attn, embed = ref_tokenize(batch)
    pooled = ref_mha_pool(ref_parts["pooler"], ref_decoder(ref_parts["decoder"], ids, attn), embed)
    p = ref_parts["proj"]
    ref_text = F.layer_norm(pooled, (H,), p["0.weight"], p["0.bias"]) @ p["1.weight"].T + p["1.bias"]
    ref_image = head(trunk(images))
    ref_scores = ref_parts["logit_scale"].exp() * ref_image @ ref_text.T    # retrieval.py --similarity clip

    assert similarity_of(model) == "clip"
    text = model.encode_text(tokenizer(batch))
    assert float((text - ref_text).abs().max()) < TOL
    assert float((model.encode_image(images) - ref_image).abs().max()) < TOL
    diffs = {"unmerged": float((text - ref_text).abs().max())}
    model.text.transformer.merge_lora()
    text = model.encode_text(tokenizer(batch))
    diffs["merged"] = float((text - ref_text).abs().max())
    print(f"PARITY llm2clip text features max|diff| {diffs}")
    assert diffs["merged"] < TOL
    # Scores and rankings as their retrieval, through eval's own path with the model's default
    # similarity: a plain dot product of the rows it returns is logit_scale * I @ T^T.
    from open_clip_cxr.eval.encode import embed_shards
    source = [(f"img{i}", f"s{i}", images[i], batch[i], {"study_id": f"s{i}"}) for i in range(3)]
    emb = embed_shards(model, None, tokenizer, None, source=source, progress=False, similarity=similarity_of(model))
    scores = emb.image_emb @ emb.text_emb.T
    assert torch.allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert torch.equal(search(emb.image_emb, emb.text_emb, k=3).indices, ref_scores.topk(3, dim=1).indices)
    # Cosine scores differ (the norms of their features vary): the default matters.
    cosine = embed_shards(model, None, tokenizer, None, source=source, progress=False, similarity="cosine")
    assert not torch.allclose(cosine.image_emb @ cosine.text_emb.T * ref_parts["logit_scale"].exp(), ref_scores,
                              rtol=1e-3)
