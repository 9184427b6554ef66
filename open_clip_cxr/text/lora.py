"""LoRA on the text tower's decoder, through peft.

The decoder inside `CXRTextModel.llm` becomes a `peft.PeftModel` when the config asks for
LoRA. Helpers here count parameters, merge for export and save/load the adapter alone, so
fine-tuners can ship a few MB instead of the whole tower.
"""
from typing import Dict

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict


def apply_lora(llm: nn.Module, lora: dict) -> PeftModel:
    """Wrap `llm` with LoRA adapters; peft freezes every base weight."""
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]), bias="none")
    return get_peft_model(llm, config)


def count_parameters(module: nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def adapter_state_dict(llm: PeftModel) -> dict:
    """Only the LoRA weights (keys as peft saves them)."""
    return get_peft_model_state_dict(llm)


def load_adapter_state_dict(llm: PeftModel, state_dict: dict) -> None:
    result = set_peft_model_state_dict(llm, state_dict)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter does not match this model; unexpected keys: {unexpected[:5]}")
