"""LoRA on a CLIP model's text tower: merge it for release, or ship it alone for fine-tuners.

An adapter folder is a PEFT adapter of the text tower's decoder, in PEFT's own format
(`adapter_config.json` + `adapter_model.safetensors`, written by peft's `save_pretrained`, so
`peft.PeftModel.from_pretrained(decoder, folder)` loads it), plus what PEFT has no slot for:
`heads.safetensors` (the small trained parts outside the decoder, under the CLIP model's own
state-dict keys) and `open_clip_cxr_adapter.json`, which names the base model the adapter
applies to. A few MB instead of the whole model. The older layout (`adapter.json` +
`adapter.safetensors`, everything under the CLIP model's keys) is still read.
"""
import json
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter.safetensors"          # older layout
ADAPTER_CONFIG = "adapter.json"                  # older layout
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"   # PEFT's names
HEADS_WEIGHTS = "heads.safetensors"
META = "open_clip_cxr_adapter.json"
FORMAT = "open_clip_cxr-adapter"
# Small trained parts that travel with the LoRA tensors (OpenCLIP's text projection, our
# output norm, the temperature).
HEAD_PREFIXES = ("text.proj.", "text.transformer.norm.", "logit_scale", "logit_bias")


def _tower(model):
    from .export import text_tower
    tower = text_tower(model)
    if tower is None:
        raise TypeError("expected an OpenCLIP model whose text tower is open_clip_cxr's CXRTextModel")
    return tower


def merge_lora(model):
    """Fold the text tower's LoRA into its base weights, in place; returns `model`."""
    _tower(model).merge_lora()
    return model


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key or ".lora_embedding_" in key


def adapter_state_dict(model, include_trainable: bool = False) -> Dict[str, torch.Tensor]:
    """LoRA tensors + text heads (+ the pooler when the config trains it; + every parameter with
    `requires_grad` when `include_trainable`), keyed as in `model.state_dict()`."""
    tower = _tower(model)
    if not tower.has_lora:
        raise ValueError("the text tower has no LoRA adapters (merged already, or built without `lora`)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} if include_trainable else set()
    pooler = "text.transformer.pooler." if tower.config.train_pooling else None
    out = {}
    for key, tensor in model.state_dict().items():
        if (is_lora_key(key) or key.startswith(HEAD_PREFIXES) or key in trainable
                or (pooler and key.startswith(pooler))):
            out[key] = tensor.detach().cpu().contiguous()
    return out


def export_adapter(model, out_dir, base_model: str, include_trainable: bool = False,
                   extra: Optional[dict] = None) -> Path:
    """Write the adapter of `model` to `out_dir` (PEFT format + heads). `base_model` names what it
    applies to: an OpenCLIP name (`cxr-llm`), `hf-hub:ORG/NAME` or `local-dir:PATH`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, include_trainable=include_trainable)
    tower = _tower(model)
    llm = tower.llm
    for cfg in llm.peft_config.values():
        cfg.base_model_name_or_path = base_model
    llm.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    heads = {k: v for k, v in state.items() if not is_lora_key(k)}
    save_file(heads, str(out / HEADS_WEIGHTS), metadata={"format": "pt", "base_model": base_model})
    meta = {"format": FORMAT, "version": 2, "base_model": base_model, "lora": tower.config.lora,
            "num_tensors": len(state), "num_parameters": int(sum(t.numel() for t in state.values())),
            "peft": [PEFT_CONFIG, PEFT_WEIGHTS], "heads": HEADS_WEIGHTS, **(extra or {})}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir) -> dict:
    """Our metadata of an adapter folder, in either layout."""
    folder = Path(adapter_dir)
    path = folder / META if (folder / META).is_file() else folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder / META} not found: not an adapter folder written by export_adapter")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file (format={meta.get('format')!r})")
    return meta


def _adapter_state(model, folder: Path, meta: dict) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under the CLIP model's state-dict keys, from either layout."""
    if meta.get("version", 1) < 2:
        return load_file(str(folder / meta.get("weights", ADAPTER_WEIGHTS)))
    from peft.utils import load_peft_weights
    state = load_file(str(folder / meta.get("heads", HEADS_WEIGHTS)))
    prefix = next(k for k in model.state_dict() if is_lora_key(k)).split("base_model.model.", 1)[0]
    adapter = next(iter(_tower(model).llm.peft_config))
    for key, tensor in load_peft_weights(str(folder)).items():   # "base_model.model.<module>.lora_A.weight"
        stem, _, kind = key.rpartition(".")
        state[f"{prefix}{stem}.{adapter}.{kind}"] = tensor
    return state


@torch.no_grad()
def load_adapter(model, adapter_dir):
    """Load an adapter folder into `model` (built from its base model, LoRA not merged)."""
    meta = read_adapter_config(adapter_dir)
    tower = _tower(model)
    if not tower.has_lora:
        raise ValueError("the model has no LoRA adapters to load into: build it unmerged (its config's `lora` set)")
    want, have = meta.get("lora") or {}, tower.config.lora or {}
    for field in ("r", "alpha", "target_modules"):
        if field in want and want[field] != have.get(field):
            raise ValueError(f"adapter LoRA {field}={want[field]!r} but the model has {have.get(field)!r}; "
                             f"build the model with the adapter's LoRA settings")
    state = _adapter_state(model, Path(adapter_dir), meta)
    target = model.state_dict()
    unknown = sorted(k for k in state if k not in target)
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
           if k in target and v.shape != target[k].shape]
    if unknown or bad:
        raise ValueError(f"adapter {adapter_dir} does not fit this model (base_model "
                         f"{meta.get('base_model')!r}): unknown keys {unknown[:5]}, shape mismatches {bad[:5]}")
    model.load_state_dict(state, strict=False)
    return meta


def create_model_from_adapter(adapter_dir, **kwargs):
    """Build the adapter's base model with `open_clip_cxr.create_model_and_transforms`, load the
    adapter; returns (model, preprocess_train, preprocess_val)."""
    import open_clip_cxr
    meta = read_adapter_config(adapter_dir)
    model, train_tf, val_tf = open_clip_cxr.create_model_and_transforms(meta["base_model"], **kwargs)
    load_adapter(model, adapter_dir)
    return model, train_tf, val_tf
