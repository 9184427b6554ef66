"""Export -> `local-dir:` round trips, LoRA merge / adapter files, checkpoint mismatch messages."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import open_clip
from open_clip_cxr_convert.checkpoints import CheckpointMismatchError, load_clip_checkpoint
from open_clip_cxr_convert.export import (ExportMismatchError, embeddings, export_folder, save_state_dict, text_tower,
                               verify_export)
from open_clip_cxr_convert.lora import (create_model_from_adapter, export_adapter, load_adapter, merge_lora,
                             read_adapter_config)
from conversion_fixtures import encode, randomize, tiny_clip
from open_clip_cxr.cli import main as cli_main


@pytest.mark.parametrize("merge", [True, False])
@torch.no_grad()
def test_export_round_trip(tmp_path, merge):
    model, tokenizer = tiny_clip()
    reference = embeddings(model, tokenizer)
    out = export_folder(model, open_clip.get_model_config("cxr-llm-tiny"), tokenizer, tmp_path / "out", merge_lora=merge)
    diffs = verify_export(out, reference, atol=1e-5)
    assert max(diffs.values()) <= 1e-5
    config = json.loads((out / "open_clip_config.json").read_text())
    assert ('"lora":null' in config["model_cfg"]["text_cfg"]["hf_model_name"]) == merge
    assert config["preprocess_cfg"]["resize_mode"] == "longest"  # our CXR preprocessing travels with it
    again, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert text_tower(again).has_lora == (not merge)
    weights = load_file(str(out / "open_clip_model.safetensors"))
    assert any(".lora_" in k for k in weights) == (not merge)


@torch.no_grad()
def test_verify_export_fails_loudly(tmp_path):
    model, tokenizer = tiny_clip()
    reference = embeddings(model, tokenizer)
    out = export_folder(model, open_clip.get_model_config("cxr-llm-tiny"), tokenizer, tmp_path / "out")
    weights = load_file(str(out / "open_clip_model.safetensors"))
    weights["text.proj.weight"] = weights["text.proj.weight"] * 1.01
    save_file(weights, str(out / "open_clip_model.safetensors"))
    with pytest.raises(ExportMismatchError, match="text"):
        verify_export(out, reference)


@torch.no_grad()
def test_lora_merge_keeps_outputs():
    model, tokenizer = tiny_clip()
    before = encode(model, tokenizer)
    assert text_tower(model).has_lora
    merge_lora(model)
    assert not text_tower(model).has_lora
    for a, b in zip(before, encode(model, tokenizer)):
        assert torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_adapter_round_trip(tmp_path):
    trained, tokenizer = tiny_clip(seed=0)
    randomize(trained, ("text.proj.weight",), seed=3, std=0.2)
    adapter = export_adapter(trained, tmp_path / "adapter", base_model="cxr-llm-tiny")
    meta = read_adapter_config(adapter)
    assert meta["base_model"] == "cxr-llm-tiny" and meta["lora"]["r"] == 4
    tensors = {**load_file(str(adapter / "adapter_model.safetensors")), **load_file(str(adapter / "heads.safetensors"))}
    assert all(".lora_" in k or k.startswith(("text.proj.", "text.transformer.norm.", "logit_")) for k in tensors)
    assert sum(t.numel() for t in tensors.values()) < 0.2 * sum(p.numel() for p in trained.parameters())
    # Same base weights, fresh adapters: loading the adapter restores the trained model.
    fresh, _ = tiny_clip(seed=0)
    randomize(fresh, ("lora_B", "text.proj.weight"), seed=9)
    assert not torch.allclose(encode(fresh, tokenizer)[0], encode(trained, tokenizer)[0])
    load_adapter(fresh, adapter)
    for a, b in zip(encode(fresh, tokenizer), encode(trained, tokenizer)):
        assert torch.equal(a, b)
    torch.manual_seed(0)  # the same random base as tiny_clip(seed=0)
    built, _, _ = create_model_from_adapter(adapter)
    assert torch.equal(encode(built, tokenizer)[0], encode(trained, tokenizer)[0])
    # An adapter with other LoRA settings is refused before anything is loaded.
    meta["lora"]["r"] = 8
    (adapter / "open_clip_cxr_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="r=8"):
        load_adapter(fresh, adapter)


@torch.no_grad()
def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    model, _ = tiny_clip()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("text.proj.weight")
    state["text.extra_head.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_clip_checkpoint(tiny_clip()[0], tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "missing keys" in message and "text.proj.weight" in message
    assert "unexpected keys" in message and "text.extra_head.weight" in message
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text.proj.weight"] = torch.zeros(5, 5)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches: text.proj.weight"):
        load_clip_checkpoint(tiny_clip()[0], tmp_path / "shape.safetensors")


@torch.no_grad()
def test_merged_checkpoint_loads_into_a_lora_model(tmp_path):
    model, tokenizer = tiny_clip(seed=1)
    expected = encode(model, tokenizer)
    merge_lora(model)
    save_state_dict(model, tmp_path / "merged.safetensors")
    target, _ = tiny_clip(seed=5)  # built with LoRA
    load_clip_checkpoint(target, tmp_path / "merged.safetensors")
    assert not text_tower(target).has_lora
    for a, b in zip(encode(target, tokenizer), expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_export_cli(tmp_path, capsys):
    model, _ = tiny_clip(seed=2)
    save_state_dict(model, tmp_path / "ckpt.safetensors")
    results = {"mimic-cxr": {"image_to_text": {"R@1": 0.1234, "R@5": 0.3456, "R@10": 0.4567},
                             "text_to_image": {"R@1": 0.1111, "R@5": 0.2222, "R@10": 0.3333},
                             "n_images": 100, "n_reports": 90, "ties": "pessimistic"}}
    (tmp_path / "eval.json").write_text(json.dumps(results))
    (tmp_path / "recipe.yaml").write_text("datasets: [mimic-cxr]\nstage2:\n  lr: 0.0001\n  epochs: 3\n")
    out = tmp_path / "release"
    assert cli_main(["export", "--model", "cxr-llm-tiny", "--pretrained", str(tmp_path / "ckpt.safetensors"),
                     "--out", str(out), "--eval-json", str(tmp_path / "eval.json"),
                     "--recipe", str(tmp_path / "recipe.yaml"), "--repo-id", "org/cxr-tiny"]) == 0
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "merged" in printed
    card = (out / "README.md").read_text()
    assert "12.34" in card and "33.33" in card and "hf-hub:org/cxr-tiny" in card
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "org/cxr-tiny"
