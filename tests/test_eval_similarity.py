"""`open-clip-cxr eval --task retrieval` scores with the similarity the model was trained with
(recorded in its text config) unless `--similarity` says otherwise, and records which."""
import json

import open_clip
import pytest
import torch

import data_fixtures as fx
from open_clip_cxr_convert.export import export_folder
from conversion_fixtures import tiny_clip
from open_clip_cxr.cli import main as cli_main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    t = fx.make_table(root / "tbl", n=4)
    assert cli_main(["shards", "--source", "table", "--table", str(t["table"]), "--out", str(root / "shards"),
                     "--val-frac", "0", "--test-frac", "0", "--max-side", "64"]) == 0
    return "::".join(str(p) for p in sorted((root / "shards").glob("*.tar")))


def run_eval(tmp_path, model, shards, *extra):
    out = tmp_path / ("out" + "".join(extra).replace("-", ""))
    argv = ["eval", "--task", "retrieval", "--model", model, "--shards", shards, "--out", str(out), *extra]
    assert cli_main(argv) == 0
    return json.loads((out / "results.json").read_text())


def _metrics(results):
    return results["results"]


@torch.no_grad()
def test_default_is_the_models_similarity(tmp_path, shards):
    assert _metrics(run_eval(tmp_path, "cxr-llm-tiny", shards))["similarity"] == "cosine"
    model, tokenizer = tiny_clip()
    model.text.transformer.config.similarity = "clip"   # as a converted LLM2CLIP4CXR model records it
    folder = export_folder(model, open_clip.get_model_config("cxr-llm-tiny"), tokenizer, tmp_path / "clip")
    clip = _metrics(run_eval(tmp_path, f"local-dir:{folder}", shards))
    dot = _metrics(run_eval(tmp_path, f"local-dir:{folder}", shards, "--similarity", "dot"))
    assert clip["similarity"] == "clip" and dot["similarity"] == "dot"
    # logit_scale > 0 rescales every score alike: clip and dot rank identically.
    assert clip["image_to_text"] == dot["image_to_text"] and clip["text_to_image"] == dot["text_to_image"]
