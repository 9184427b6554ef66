"""Plain OpenCLIP (no `open_clip_cxr.` wrapper) with our pretrained tags: the tags are listed,
carry our CXR preprocessing through OpenCLIP's own pretrained-config mechanism, load a full
checkpoint (no "initialized partially" warning) and resolve offline where the weights ship."""
import json
import logging
from pathlib import Path

import pytest
import torch

import open_clip
import open_clip_cxr  # noqa: F401  (registers models and tags)
from open_clip_cxr.openclip_hooks import TAGS


def test_tags_are_listed_with_their_sources():
    listed = set(open_clip.list_pretrained())
    assert {("cxr-llm", "llm2vec4cxr"), ("cxr-llm-small", "smollm2"), ("cxr-llm-tiny", "random")} <= listed
    assert open_clip.pretrained.get_pretrained_cfg("cxr-llm", "llm2vec4cxr")["hf_hub"] == "lukeingawesome/llm2vec4cxr"
    small = open_clip.pretrained.get_pretrained_cfg("cxr-llm-small", "smollm2")
    assert small["hf_hub"] == ""
    assert (small["mean"], small["resize_mode"], small["fill_color"]) == ([0.5] * 3, "longest", 0)
    # The authors' model keeps their evaluation transform (EVA-CLIP: resize the short side, centre crop).
    assert open_clip.pretrained.get_pretrained_cfg("cxr-llm", "llm2vec4cxr")["resize_mode"] == "shortest"
    assert set(TAGS) <= set(open_clip.list_models())


def test_plain_openclip_with_a_tag_gives_cxr_preprocessing_without_partial_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        model, _, preprocess = open_clip.create_model_and_transforms("cxr-llm-tiny", pretrained="random")
        again = open_clip.create_model("cxr-llm-tiny", pretrained="random")   # from the cached file
    assert "initialized partially" not in caplog.text and "initialized randomly" not in caplog.text.lower()
    cfg = model.visual.preprocess_cfg
    assert (cfg["mean"], cfg["std"], cfg["resize_mode"], cfg["fill_color"]) == ([0.5] * 3, [0.5] * 3, "longest", 0)
    assert "CenterCropOrPad" in repr(preprocess) and "longest" in repr(preprocess)
    assert (tmp_path / "pretrained" / "cxr-llm-tiny" / "random" / "open_clip_model.safetensors").is_file()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Without the tag OpenCLIP falls back to its own defaults (it has no per-model default hook).
    _, _, plain = open_clip.create_model_and_transforms("cxr-llm-tiny")
    assert "longest" not in repr(plain)


@pytest.mark.slow
def test_small_tag_resolves_offline_to_the_packaged_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(tmp_path))
    model = open_clip.create_model("cxr-llm-small", pretrained="smollm2")
    base = open_clip.create_model("cxr-llm-small", pretrained_image=True)   # the SmolLM2 GGUF, EfficientNet-Lite0
    a, b = model.state_dict(), base.state_dict()
    key = "text.transformer.llm.base_model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(a[key], b[key])
    assert torch.equal(a["visual.trunk.conv_stem.weight"], b["visual.trunk.conv_stem.weight"])


def test_two_jobs_filling_one_cache_at_once_both_succeed(tmp_path, monkeypatch):
    """A second job that writes the same config between the first job's write and rename (two
    seeds started together) must not make the first job's rename fail."""
    from open_clip_cxr import openclip_hooks
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(tmp_path))
    real_write, interleaved = Path.write_text, []

    def write_then_let_another_job_run(self, *args, **kwargs):
        out = real_write(self, *args, **kwargs)
        if self.name.endswith(".tmp") and not interleaved:
            interleaved.append(self)
            openclip_hooks._register_model_configs()   # the other job, start to finish
        return out

    monkeypatch.setattr(Path, "write_text", write_then_let_another_job_run)
    openclip_hooks._register_model_configs()
    assert interleaved, "no temporary file was written"
    written = sorted(p.name for p in (tmp_path / "model_configs").iterdir())
    assert written and not [n for n in written if n.endswith(".tmp")]
    assert all(json.loads((tmp_path / "model_configs" / n).read_text()) for n in written)
