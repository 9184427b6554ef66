"""`import open_clip_cxr` teaches OpenCLIP our models; OpenCLIP's own calls then work unchanged."""
import json

import open_clip
import pytest
import torch
from PIL import Image

import open_clip_cxr
from open_clip_cxr.text import CXRTextModel

OURS = ["cxr-llm", "cxr-llm-small", "cxr-llm-small-l2", "cxr-llm-small-l4", "cxr-llm-tiny"]


def test_models_registered_with_openclip():
    for name in OURS:
        assert name in open_clip.list_models()
        cfg = open_clip.get_model_config(name)
        assert cfg["text_cfg"]["hf_model_name"].startswith("cxr-text:")
    assert open_clip_cxr.list_models() == OURS


def test_user_snippet_runs_through_openclip():
    model, _, preprocess = open_clip.create_model_and_transforms("cxr-llm-tiny")
    tokenizer = open_clip.get_tokenizer("cxr-llm-tiny")
    assert isinstance(model.text.transformer, CXRTextModel)
    image = Image.new("L", (300, 240), 90)
    with torch.no_grad():
        img = model.encode_image(preprocess(image)[None], normalize=True)
        txt = model.encode_text(tokenizer(["No acute cardiopulmonary process."]), normalize=True)
    assert img.shape == txt.shape == (1, 32)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match="cxr-llm-tiny"):
        open_clip_cxr.create_model("cxr-llm-nope")
    with pytest.raises(RuntimeError, match="cxr-llm-tiny"):  # OpenCLIP's own message lists them too
        open_clip.create_model("cxr-llm-nope")


def test_convenience_transforms_use_cxr_preprocessing():
    model, train_tf, eval_tf = open_clip_cxr.create_model_and_transforms("cxr-llm-tiny")
    assert model.visual.preprocess_cfg["resize_mode"] == "longest"
    wide = Image.new("L", (400, 100), 255)  # a wide white image: padding must appear above/below
    x = eval_tf(wide)
    assert x.shape == (3, 64, 64)
    assert x[:, 0, 32].max() < x[:, 32, 32].min()  # top row is padding (black), centre is image


def test_pretrained_path_round_trip(tmp_path, tiny):
    model, _, tokenizer = tiny
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    loaded = open_clip.create_model("cxr-llm-tiny", pretrained=str(ckpt)).eval()
    ids = tokenizer(["Right lower lobe opacity.", "Normal chest."])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), loaded.encode_text(ids), atol=1e-6)


def test_mismatched_checkpoint_names_keys(tmp_path, tiny):
    model, _, _ = tiny
    state = dict(model.state_dict())
    state.pop("text.proj.weight")
    state["text.extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "bad.pt"
    torch.save(state, ckpt)
    with pytest.raises(RuntimeError) as err:
        open_clip.create_model("cxr-llm-tiny", pretrained=str(ckpt))
    assert "text.proj.weight" in str(err.value) and "text.extra.weight" in str(err.value)


def test_openclip_config_folder_round_trip(tmp_path, tiny):
    from open_clip_cxr_convert.export import export_folder
    model, _, tokenizer = tiny
    ids = tokenizer(["Small left pleural effusion.", ""])
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_t, ref_i = model.encode_text(ids), model.encode_image(image)
    import copy
    out = export_folder(copy.deepcopy(model), open_clip.get_model_config("cxr-llm-tiny"), tokenizer, tmp_path / "export")
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["resize_mode"] == "longest"
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok2 = open_clip.get_tokenizer(f"local-dir:{out}")
    assert torch.equal(tok2(["Small left pleural effusion.", ""]), ids)
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_text(ids), ref_t, atol=1e-5)
        assert torch.allclose(loaded.encode_image(image), ref_i, atol=1e-5)


def test_bf16_runs_on_cpu():
    model = open_clip.create_model("cxr-llm-tiny", precision="bf16").eval()
    tokenizer = open_clip.get_tokenizer("cxr-llm-tiny")
    with torch.no_grad():
        txt = model.encode_text(tokenizer(["Mild cardiomegaly."]))
        img = model.encode_image(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert txt.dtype == img.dtype == torch.bfloat16
    assert torch.isfinite(txt.float()).all() and torch.isfinite(img.float()).all()


def test_cxr_llm_builds_on_meta_with_paper_sizes():
    """The paper's model, built without materialising weights: text ~1.2B, vision ~0.3B."""
    with torch.device("meta"):
        model = open_clip.create_model("cxr-llm", pretrained_text=False, pretrained_image=False, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    text, vision = count(model.text), count(model.visual)
    assert 1.15e9 < text < 1.35e9, text
    assert 0.28e9 < vision < 0.33e9, vision
    tower = model.text.transformer
    assert tower.config.hidden_size == 2048 and tower.pooler.latents.shape == (512, 2048)
    assert tower.pooler.heads == 8 and model.text.proj.out_features == 768
    lora = tower.config.lora
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (16, 32, 0.1)
    assert sorted(lora["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    trainable = sum(p.numel() for n, p in tower.named_parameters() if p.requires_grad)
    # LoRA r=16 on q,k,v,o of 16 layers: r*(in+out) per matrix (q,o: 2048->2048; k,v: 2048->512)
    assert trainable == 16 * 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2) + 2 * 2048  # + the LayerNorm
