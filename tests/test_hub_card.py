"""Model cards: front matter the Hub can parse, required sections, numbers, and no report text."""
import json

import pytest
import yaml  # a dependency of huggingface_hub

import open_clip
import open_clip_cxr  # noqa: F401  (registers the cxr-llm configs)
from open_clip_cxr_hub.card import (ReportTextError, check_no_report_text, is_short_identifier, load_recipe, render_card,
                            retrieval_results)

RESULTS = {"retrieval": {
    "mimic-cxr": {"image_to_text": {"R@1": 0.1234, "R@5": 0.3456, "R@10": 0.4567},
                  "text_to_image": {"R@1": 0.1111, "R@5": 0.2222, "R@10": 0.3333},
                  "n_images": 1000, "n_reports": 950, "ties": "pessimistic", "split": "test"},
    "CheXpert Plus": {"image_to_text": {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75},
                      "text_to_image": {"R@1": 0.2, "R@5": 0.4, "R@10": 0.6}}}}
RECIPE = {"datasets": ["mimic-cxr", "chexpert-plus"], "license": "apache-2.0",
          "stage2": {"lr": 1e-4, "batch_size": 256, "epochs": 10, "precision": "bf16", "lora": {"r": 16, "alpha": 32}}}
REPORT = "Small left pleural effusion with adjacent atelectasis. Mild cardiomegaly."
SECTIONS = ["## What it is", "## How to use it", "## Intended use", "## Training data and recipe", "## Evaluation",
            "## Limitations and biases", "## Citation"]


def card(**kw):
    args = dict(repo_id="org/cxr-llm-tiny", model_cfg=open_clip.get_model_config("cxr-llm-tiny"),
                eval_results=RESULTS, recipe=RECIPE)
    args.update(kw)
    return render_card(**args)


def front_matter(text):
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_front_matter_parses_with_hub_fields():
    meta, _ = front_matter(card())
    assert meta["library_name"] == "open_clip"
    assert meta["tags"] == ["clip", "medical", "chest-xray", "radiology", "open_clip_cxr"]
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["mimic-cxr", "chexpert-plus"]
    (index,) = meta["model-index"]
    assert index["name"] == "org/cxr-llm-tiny"
    metrics = {(r["dataset"]["name"], m["name"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert metrics[("mimic-cxr", "Image→report R@1")] == pytest.approx(12.34)
    assert metrics[("mimic-cxr", "Report→image R@10")] == pytest.approx(33.33)
    assert metrics[("CheXpert Plus", "Report→image R@5")] == pytest.approx(40.0)
    assert len(metrics) == 12


def test_sections_usage_and_numbers():
    text = card()
    _, body = front_matter(text)
    positions = [body.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert 'create_model_and_transforms("hf-hub:org/cxr-llm-tiny")' in body and "import open_clip, open_clip_cxr" in body
    assert "not a medical device" in body.lower() and "clinical decisions" in body
    assert "arXiv:2509.15234" in body and "10.5281/zenodo.5143773" in body  # the paper and OpenCLIP
    for number in ("12.34", "34.56", "45.67", "11.11", "22.22", "33.33", "75.00", "1000", "950"):
        assert number in body
    assert "`stage2.lr` | 0.0001" in body and "`stage2.lora.r` | 16" in body
    assert "{{" not in text and "}}" not in text


def test_card_without_results_or_recipe():
    meta, body = front_matter(card(eval_results=None, recipe=None))
    assert "model-index" not in meta and meta["license"] == "apache-2.0"
    assert "Not evaluated yet." in body


def test_base_model_and_license_from_the_text_tower():
    meta, _ = front_matter(card(model_cfg=open_clip.get_model_config("cxr-llm"), recipe={}))
    assert meta["base_model"] == ["lukeingawesome/llm2vec4cxr", "timm/eva02_large_patch14_clip_336.merged2b"]
    assert meta["license"] == "llama3.2"


@pytest.mark.parametrize("bad", [
    {"retrieval": {REPORT: RESULTS["retrieval"]["mimic-cxr"]}},                     # a report as dataset name
    {"x": dict(RESULTS["retrieval"]["mimic-cxr"], split="The lungs are clear.")},   # as a label
])
def test_guard_refuses_report_text_in_results(bad):
    with pytest.raises(ReportTextError, match="report text"):
        card(eval_results=bad)


@pytest.mark.parametrize("recipe", [
    {"notes": REPORT},
    {"stage2": {"example_caption": "No acute cardiopulmonary process."}},
    {"datasets": ["mimic-cxr", "heart size is normal and the lungs are clear"]},
    {REPORT: 1},
])
def test_guard_refuses_report_text_in_recipe(recipe):
    with pytest.raises(ReportTextError):
        card(recipe=recipe)


def test_unwritten_fields_are_not_copied():
    """Text the card does not use (e.g. examples in an eval dump) never reaches it."""
    results = json.loads(json.dumps(RESULTS))
    results["retrieval"]["mimic-cxr"]["examples"] = [REPORT]
    assert REPORT not in card(eval_results=results)


def test_identifier_rule():
    for ok in ("mimic-cxr", "CheXpert Plus test", "v1.2", "1e-4", "bf16", "org/name", "hf:lukeingawesome/llm2vec4cxr"):
        assert is_short_identifier(ok), ok
    for bad in (REPORT, "No acute process.", "four words are too many", "x" * 65, "line\nbreak", ""):
        assert not is_short_identifier(bad), bad
    check_no_report_text({"a": [1, 2.5, None, True, "ok"]})


def test_retrieval_results_shapes(tmp_path):
    single = RESULTS["retrieval"]["mimic-cxr"]
    assert [n for n, _ in retrieval_results(single)] == [""]   # unnamed: render_card names it (never "eval")
    assert [n for n, _ in retrieval_results(dict(single, dataset="openi"))] == ["openi"]
    assert [n for n, _ in retrieval_results({"mimic": {"test": single}})] == ["mimic/test"]
    (tmp_path / "r.yaml").write_text("datasets: [a]\nlr: 0.001\n")
    assert load_recipe(tmp_path / "r.yaml") == {"datasets": ["a"], "lr": 0.001}


def test_load_recipe_reads_base_as_training_does(tmp_path):
    """`base:` is read first and merged under the recipe (training/recipe_io.load_recipe), not ignored."""
    (tmp_path / "base.yaml").write_text("datasets: [a]\noptim: {lr: 1e-4, eps: 1e-6}\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\noptim: {lr: 2e-4}\n")
    assert load_recipe(tmp_path / "r.yaml") == {"datasets": ["a"], "optim": {"lr": 2e-4, "eps": 1e-6}}
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_card_says_how_the_tokenizer_reads_a_text():
    """Our configs drop administrative lines and fold capitals before tokenising; the card says so,
    and says nothing for the authors' config, which does neither."""
    _, body = front_matter(card())
    row = next(line for line in body.splitlines() if line.startswith("| Text read as |"))
    assert "`drop_admin_lines`" in row and "mostly-capital texts in sentence case" in row
    _, body = front_matter(card(model_cfg=open_clip.get_model_config("cxr-llm")))
    assert "| Text read as |" not in body
