"""Write an OpenCLIP Hub folder that `open_clip.create_model_and_transforms('local-dir:DIR')`
(or `hf-hub:ORG/NAME` once pushed) loads after `import open_clip_cxr`:

    DIR/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    DIR/open_clip_model.safetensors  the whole CLIP state dict (LoRA merged unless asked not to)
    DIR/tokenizer.json ...           our tokenizer (never OpenCLIP's CLIP fallback)
    DIR/README.md                    the model card, when one is given
"""
import copy
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from open_clip_cxr.text.archs import spec_for
from open_clip_cxr.text.model import CXRTextModel

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def text_tower(model) -> Optional[CXRTextModel]:
    transformer = getattr(getattr(model, "text", None), "transformer", None)
    return transformer if isinstance(transformer, CXRTextModel) else None


def export_model_cfg(model, model_cfg: dict, tokenizer_source: str) -> dict:
    """`model_cfg` with the text spec rewritten to match the tower as it is now."""
    cfg = copy.deepcopy(model_cfg)
    tower = text_tower(model)
    if tower is not None:
        cfg["text_cfg"]["hf_model_name"] = spec_for(tower.config)
    cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_source
    cfg["text_cfg"].pop("hf_model_pretrained", None)
    cfg["vision_cfg"].pop("timm_model_pretrained", None)
    return cfg


def save_state_dict(model, path: Path) -> None:
    """Safetensors refuses shared storage; store each tensor once, contiguous, on the CPU."""
    seen, state = {}, {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        state[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen[ptr] = key
    save_file(state, str(path), metadata={"format": "pt"})


def export_folder(model, model_cfg: dict, tokenizer, out_dir, *, preprocess_cfg: Optional[dict] = None,
                  merge_lora: bool = True, repo_id: Optional[str] = None, card: Optional[str] = None) -> Path:
    """Write `out_dir` (created; files replaced). `merge_lora=True` folds LoRA into the base
    weights of `model` in place, which is what a release wants; keep it False for fine-tuners."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower = text_tower(model)
    if merge_lora and tower is not None:
        tower.merge_lora()
    # A Hub repo names itself as the tokenizer source; a local folder is read by path
    # (OpenCLIP's `local-dir:` always reads the tokenizer from the folder itself).
    cfg = export_model_cfg(model, model_cfg, repo_id or str(out.resolve()))
    preprocess = dict(preprocess_cfg or getattr(model.visual, "preprocess_cfg", {}) or {})
    (out / CONFIG_NAME).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    save_state_dict(model, out / WEIGHTS_NAME)
    hf_tok = getattr(tokenizer, "tokenizer", None)
    if hf_tok is None or not hasattr(hf_tok, "save_pretrained"):
        raise TypeError("export needs OpenCLIP's HFTokenizer (ours); got " + type(tokenizer).__name__)
    hf_tok.save_pretrained(out)
    if card is not None:
        (out / "README.md").write_text(card)
    return out
