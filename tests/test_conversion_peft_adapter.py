"""LoRA adapters in PEFT's own format: `PeftModel.from_pretrained` loads the decoder's adapter
unchanged; our loader restores the whole CLIP model; the older `adapter.json` layout still loads."""
import json

import torch
from peft import PeftModel
from safetensors.torch import save_file

from open_clip_cxr_convert.lora import adapter_state_dict, export_adapter, load_adapter
from conversion_fixtures import encode, randomize, tiny_clip

IDS = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 2, 0, 0]])


@torch.no_grad()
def test_peft_loads_the_exported_adapter(tmp_path):
    trained, tokenizer = tiny_clip(seed=0)
    randomize(trained, ("text.proj.weight",), seed=3, std=0.2)
    folder = export_adapter(trained, tmp_path / "adapter", base_model="cxr-llm-tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == "cxr-llm-tiny"
    assert (folder / "adapter_model.safetensors").is_file()

    fresh, _ = tiny_clip(seed=0)   # same base weights, untrained (zero) LoRA
    base = fresh.text.transformer.llm.unload()   # the plain bidirectional decoder, LoRA layers removed
    before = base(input_ids=IDS).last_hidden_state.clone()
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    want = trained.text.transformer.llm(input_ids=IDS).last_hidden_state
    assert not torch.allclose(before, want, atol=1e-4)   # the adapter matters
    assert torch.allclose(peft_model(input_ids=IDS).last_hidden_state, want, atol=1e-6)


@torch.no_grad()
def test_both_layouts_restore_the_clip_model(tmp_path):
    trained, tokenizer = tiny_clip(seed=0)
    randomize(trained, ("text.proj.weight",), seed=3, std=0.2)
    new = export_adapter(trained, tmp_path / "new", base_model="cxr-llm-tiny")
    old = tmp_path / "old"   # the layout before PEFT's format: one safetensors under the CLIP model's keys
    old.mkdir()
    save_file(adapter_state_dict(trained), str(old / "adapter.safetensors"))
    meta = {"format": "open_clip_cxr-adapter", "version": 1, "base_model": "cxr-llm-tiny",
            "lora": trained.text.transformer.config.lora, "weights": "adapter.safetensors"}
    (old / "adapter.json").write_text(json.dumps(meta))
    want = encode(trained, tokenizer)
    for folder in (new, old):
        fresh, _ = tiny_clip(seed=0)
        randomize(fresh, ("lora_B", "text.proj.weight"), seed=9)
        assert not torch.allclose(encode(fresh, tokenizer)[0], want[0])
        load_adapter(fresh, folder)
        for a, b in zip(encode(fresh, tokenizer), want):
            assert torch.equal(a, b)
