"""One model = one file: each model config carries its image preprocessing (`preprocess_cfg`),
which our factory and the pretrained tags apply and OpenCLIP's model classes never see."""
import json

import open_clip

import open_clip_cxr
from open_clip_cxr.openclip_hooks import MODEL_CONFIG_DIR, our_model_names, preprocess_cfgs


def test_every_model_config_carries_its_preprocessing():
    names = our_model_names()
    assert names and sorted(preprocess_cfgs()) == names
    assert not (MODEL_CONFIG_DIR / "preprocess.json").exists()
    for name in names:
        assert "preprocess_cfg" not in open_clip.get_model_config(name)   # stripped before OpenCLIP sees it
        assert set(json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())["preprocess_cfg"]) >= {"mean", "std",
                                                                                                       "resize_mode"}


def test_the_config_is_what_the_model_uses():
    want = preprocess_cfgs()["cxr-llm-tiny"]
    model, _, _ = open_clip_cxr.create_model_and_transforms("cxr-llm-tiny")
    got = model.visual.preprocess_cfg
    assert {k: (list(got[k]) if isinstance(got[k], tuple) else got[k]) for k in want} == want
    tag = next(iter(open_clip.list_pretrained_tags_by_model("cxr-llm-tiny")), None)
    if tag:
        cfg = open_clip.get_pretrained_cfg("cxr-llm-tiny", tag)
        assert cfg["resize_mode"] == want["resize_mode"] and list(cfg["mean"]) == want["mean"]
