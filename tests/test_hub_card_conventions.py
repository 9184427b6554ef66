"""The model card carries the Hub's conventional fields, an out-of-scope section, a usage snippet
that runs as written, and names the evaluation dataset (never eval's folder)."""
import re

import open_clip
import torch
import yaml

from open_clip_cxr_convert.export import export_folder
from conversion_fixtures import tiny_clip
from open_clip_cxr_hub.card import render_card

RESULTS = {"image_to_text": {"R@1": 0.1, "R@5": 0.3, "R@10": 0.5},
           "text_to_image": {"R@1": 0.2, "R@5": 0.4, "R@10": 0.6}, "n_images": 10, "n_reports": 10}


def meta_and_body(text):
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_front_matter_fields_and_sections():
    meta, body = meta_and_body(render_card(repo_id="org/m", model_cfg=open_clip.get_model_config("cxr-llm"),
                                           eval_results={"task": "retrieval", "metrics": RESULTS},
                                           datasets=["mimic-cxr"]))
    assert meta["language"] == ["en"] and meta["metrics"] == ["recall"] and meta["datasets"] == ["mimic-cxr"]
    # Every base: the authors' text encoder and the vision tower's timm weights.
    assert meta["base_model"] == ["lukeingawesome/llm2vec4cxr", "timm/eva02_large_patch14_clip_336.merged2b"]
    (index,) = meta["model-index"]
    assert {r["dataset"]["name"] for r in index["results"]} == {"mimic-cxr"}   # not "eval" / "metrics"
    assert "## Out of scope" in body and "Trained on `mimic-cxr` only" in body
    assert "no L2 normalisation" in body and "logit_scale.exp() * image_features @ text_features.T" in body
    small = meta_and_body(render_card(repo_id="org/s", model_cfg=open_clip.get_model_config("cxr-llm-small")))[0]
    assert small["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "timm/tf_efficientnet_lite0.in1k"]
    named = render_card(repo_id="org/m", eval_results={"metrics": RESULTS}, eval_dataset="openi-test")
    assert {r["dataset"]["name"] for r in meta_and_body(named)[0]["model-index"][0]["results"]} == {"openi-test"}


@torch.no_grad()
def test_usage_snippet_runs(tmp_path, capsys):
    model, tokenizer = tiny_clip()
    out = export_folder(model, open_clip.get_model_config("cxr-llm-tiny"), tokenizer, tmp_path / "out")
    card = render_card(repo_id="org/tiny", model_cfg=open_clip.get_model_config("cxr-llm-tiny"),
                       model_ref=f"local-dir:{out}")
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    exec(compile(code, "model_card_snippet", "exec"), {})
    assert "torch.Size([1, 2])" in capsys.readouterr().out
