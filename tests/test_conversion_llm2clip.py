"""Importing LLM2CLIP4CXR CLIP checkpoints (EVA-CLIP vision + LLM2Vec text with a `llm2clip`
LoRA adapter + LayerNorm->Linear projection) as OpenCLIP models.

The source checkpoints are synthetic: a tiny EVA02 (timm) + `cxr-llm-tiny` model whose state is
written out in the authors' key layout, so a correct conversion reproduces its embeddings.
"""
import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import register_model

from open_clip_cxr_convert.checkpoints import build_clip, read_state_dict
from open_clip_cxr_convert.llm2clip import ConversionError, convert_llm2clip
from conversion_fixtures import BYTE_TOKENIZER, randomize
from open_clip_cxr.cli import main as cli_main


@register_model
def cxr_test_eva02_micro(pretrained=False, **kwargs):
    """EVA02-CLIP-style ViT (SwiGLU, sub-LN, RoPE, separate q/k/v) small enough for a unit test."""
    args = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3, qkv_fused=False,
                swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2),
                global_pool=kwargs.pop("global_pool", "token"))
    return timm.models.eva._create_eva("eva02_tiny_patch14_224", pretrained=False, **dict(args, **kwargs))


CFG = {"embed_dim": 24,
       "vision_cfg": {"timm_model_name": "cxr_test_eva02_micro", "timm_model_pretrained": False, "timm_pool": "token",
                      "timm_proj": "linear", "image_size": 28},
       "text_cfg": {"hf_model_name": "cxr-text:cxr-llm-tiny", "hf_tokenizer_name": BYTE_TOKENIZER,
                    "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler", "context_length": 32}}
# timm name -> EVA-CLIP name (the inverse of timm's EVA checkpoint filter)
EVA_NAMES = [("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
             ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
             ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3.")]
TEXTS = ["small left pleural effusion", "no pneumothorax", "cardiomegaly"]


def authors_model(seed=0):
    """The source model; its text projection bias (which OpenCLIP's HF tower lacks) is kept aside."""
    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(CFG))
    cfg["vision_cfg"]["timm_proj_bias"] = True
    model = build_clip(cfg)
    randomize(model, ("lora_B", "proj.bias", "norm.bias"), seed)
    model.text_proj_bias = torch.randn(CFG["embed_dim"], generator=torch.Generator().manual_seed(seed)) * 0.1
    return model.eval()


def authors_state(model, with_base=True, with_pooler=True):
    """`model`'s tensors under the LLM2CLIP4CXR names (text.core and its alias text.model)."""
    out = {"visual.rope.freqs_cos": torch.randn(4, 8), "visual.blocks.0.attn.rope.freqs_sin": torch.randn(4, 8),
           "text.projection.1.bias": model.text_proj_bias}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key.startswith("visual.trunk."):
            name = key[len("visual.trunk."):]
            for ours, theirs in EVA_NAMES:
                name = name.replace(ours, theirs)
            out["visual." + name] = value
        elif key.startswith("visual.head.proj."):
            out["visual.head." + key[len("visual.head.proj."):]] = value
        elif key.startswith("text.transformer.llm."):
            sub = key[len("text.transformer.llm."):].replace(".default.", ".llm2clip.")
            if ".lora_" not in sub and not with_base:
                continue
            extra = {}
            if ".lora_A." in sub:  # peft's unused `default` adapter the authors' code also creates
                extra[sub.replace(".llm2clip.", ".default.")] = torch.randn_like(value)
            if ".lora_B." in sub:
                extra[sub.replace(".llm2clip.", ".default.")] = torch.zeros_like(value)
            for alias in ("text.core.model.", "text.model.model."):
                out[alias + sub] = value.clone()
                out.update({alias + k: v.clone() for k, v in extra.items()})
        elif key.startswith("text.transformer.pooler."):
            if with_pooler:
                for alias in ("text.core.", "text.model."):
                    out[alias + "latent_attn." + key[len("text.transformer.pooler."):]] = value.clone()
        elif key.startswith("text.transformer.norm."):
            out["text.projection.0." + key[len("text.transformer.norm."):]] = value
        elif key.startswith("text.proj."):
            out["text.projection.1." + key[len("text.proj."):]] = value
        else:
            out[key] = value
    return out


@torch.no_grad()
def encode(model, texts=TEXTS):
    """Text and image embeddings; for a source model, its text embeddings include the projection bias."""
    from open_clip.tokenizer import HFTokenizer
    tokens = HFTokenizer(BYTE_TOKENIZER, context_length=32)(texts)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return model.encode_text(tokens) + getattr(model, "text_proj_bias", 0), model.encode_image(images)


def assert_same(a, b, atol=1e-5):
    for x, y in zip(encode(a), encode(b)):
        assert torch.allclose(x, y, atol=atol), float((x - y).abs().max())


@torch.no_grad()
def test_deepspeed_module_bin_converts_exactly(tmp_path):
    source = authors_model()
    path = tmp_path / "mp_rank_00_model_states.bin"
    torch.save({"module": authors_state(source)}, path)  # plain tensors: weights_only loading reads it
    model, cfg, _ = convert_llm2clip(path, model_cfg=CFG)
    assert cfg["vision_cfg"]["timm_proj_bias"]
    assert model.text.transformer.has_lora and model.text.transformer.config.lora["r"] == 4
    assert_same(model, source)
    model.text.transformer.merge_lora()
    assert_same(model, source)


@torch.no_grad()
def test_text_base_supplies_decoder_and_pooler(tmp_path):
    """The authors load the decoder and pooler from llm2vec4cxr and only LoRA from the checkpoint."""
    source = authors_model(seed=1)
    save_file({k: v.contiguous() for k, v in authors_state(source, with_base=False, with_pooler=False).items()},
              str(tmp_path / "clip.safetensors"))
    tower = source.text.transformer
    base = tmp_path / "llm2vec4cxr"
    base.mkdir()
    state = {"model." + k.replace("base_layer.", ""): v.clone() for k, v in tower.base_llm().state_dict().items()
             if "lora_" not in k}
    state.update({"latent_attn." + k: v.clone() for k, v in tower.pooler.state_dict().items()})
    save_file(state, str(base / "model.safetensors"))
    with pytest.raises(ConversionError, match="text_base"):
        convert_llm2clip(tmp_path / "clip.safetensors", model_cfg=CFG)
    model, _, _ = convert_llm2clip(tmp_path / "clip.safetensors", model_cfg=CFG, text_base=base)
    assert_same(model, source)


def test_adapter_choice_and_bad_layouts(tmp_path):
    source = authors_model()
    state = authors_state(source)
    renamed = {k.replace(".llm2clip.", ".trained."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    model, _, _ = convert_llm2clip(tmp_path / "renamed.pt", model_cfg=CFG)  # the only non-zero adapter is used
    assert_same(model, source)
    torch.save(dict(state, **{"text.extra.weight": torch.zeros(2)}), tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match="text.extra.weight"):
        convert_llm2clip(tmp_path / "extra.pt", model_cfg=CFG)


def test_only_safe_loading(tmp_path):
    torch.save({"module": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(RuntimeError, match="weights_only"):
        read_state_dict(tmp_path / "pickled.pt")
    zero = tmp_path / "ds_ckpt"
    (zero / "global_step10").mkdir(parents=True)
    (zero / "latest").write_text("global_step10")
    (zero / "global_step10" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="zero_to_fp32"):
            read_state_dict(zero)


@torch.no_grad()
def test_convert_cli_writes_a_checked_openclip_folder(tmp_path, capsys):
    import open_clip
    source = authors_model(seed=2)
    torch.save(authors_state(source), tmp_path / "llm2clip.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    out = tmp_path / "converted"
    assert cli_main(["convert", "--from", "llm2clip", "--src", str(tmp_path / "llm2clip.pt"), "--out", str(out),
                     "--model", str(tmp_path / "cfg.json"), "--tokenizer", BYTE_TOKENIZER, "--merge-lora"]) == 0
    assert "reload max abs diff" in capsys.readouterr().out
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert not model.text.transformer.has_lora  # merged on request
    assert_same(model.eval(), source)


@torch.no_grad()
def test_convert_keeps_our_text_options_out_of_the_hf_tokenizer_files(tmp_path):
    """A config with our tokenizer options (`drop_admin_lines`, `fold_capitals`) converts through our
    tokenizer: the options live in open_clip_config.json only, and the folder's tokenizer applies them."""
    import open_clip
    torch.save(authors_state(authors_model(seed=3)), tmp_path / "llm2clip.pt")
    cfg = {**CFG, "text_cfg": {**CFG["text_cfg"],
                               "tokenizer_kwargs": {"fold_capitals": "sentence", "drop_admin_lines": True}}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "converted"
    assert cli_main(["convert", "--from", "llm2clip", "--src", str(tmp_path / "llm2clip.pt"), "--out", str(out),
                     "--model", str(tmp_path / "cfg.json"), "--tokenizer", BYTE_TOKENIZER]) == 0
    hf_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "drop_admin_lines" not in hf_cfg and "fold_capitals" not in hf_cfg
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    assert tok.drop_admin_lines and tok.fold_capitals == "sentence"
    assert torch.equal(tok(["EXAM: CHEST\nNo effusion."]), tok(["No effusion."]))
