"""Import the authors' text encoder (`lukeingawesome/llm2vec4cxr`, transformers layout) as our
`CXRTextModel`.

Source layout (from the authors' modeling code; the weights themselves could not be inspected
offline): a Llama decoder, stored with a `model.` prefix (`LLM2Vec4CXRModel` wraps
`self.model = LlamaBiModel(...)`) or without one (older `LlamaBiModel` subclass), an optional
`lm_head.*` (dropped), and the pooler under `latent_attn.*` in one of the layouts described in
`open_clip_cxr/text/pooler_layouts.py`, whose options (pre-norm, GEGLU, head width, output bias) are read off the
tensors into the output config. Latent attention heads cannot be read off the weights: the
authors use 8.

Output: a folder `save_pretrained` writes for our tower (config.json + model.safetensors, plus
the source's tokenizer files), loadable with `transformers.AutoModel` after `import
open_clip_cxr`, and usable as a text tower's `base_weights`. Its config has `output_norm` off
and no LoRA, so its `pooler_output` is the authors' embedding.
"""
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .checkpoints import read_state_dict
from open_clip_cxr.text.pooler_layouts import convert_pooler, split_prefix

_DECODER_PREFIXES = ("model.", "llm.", "transformer.")
_DROP = ("lm_head.",)
_DROP_SUFFIXES = ("rotary_emb.inv_freq",)
# Fields of a saved transformers config that describe the checkpoint, not the architecture.
_NON_ARCH_FIELDS = ("architectures", "auto_map", "_name_or_path", "torch_dtype", "dtype", "transformers_version",
                    "_attn_implementation_autoset", "quantization_config")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def split_llm2vec_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """-> (decoder tensors with any prefix removed, pooler tensors under their sub-keys).

    Also reads our own tower's `save_pretrained` layout (`llm.*`, `pooler.*`, `norm.*`), whose
    output `norm.*` must not be taken for the decoder's final `norm.*`."""
    if any(k.startswith("llm.") for k in state):
        decoder = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
        pooler = {k[len("pooler."):]: v for k, v in state.items() if k.startswith("pooler.")}
        return decoder, pooler
    decoder, pooler = {}, {}
    for key, tensor in state.items():
        split = split_prefix(key)
        if split is not None:
            pooler[split[1]] = tensor
            continue
        if key.startswith(_DROP) or key.endswith(_DROP_SUFFIXES):
            continue
        for prefix in _DECODER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        decoder[key] = tensor
    return decoder, pooler


def llm_config_dict(src: Path) -> dict:
    """The decoder's config (Llama fields) from the source's config.json."""
    path = src / "config.json" if src.is_dir() else src.with_name("config.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the decoder's architecture is read from it")
    cfg = json.loads(path.read_text())
    for key in _NON_ARCH_FIELDS:
        cfg.pop(key, None)
    if "model_type" not in cfg:
        raise ValueError(f"{path} has no model_type")
    return cfg


def text_config(llm: dict, pooler_options: Optional[dict], instruction_separator_id: Optional[int] = None):
    """Our `CXRTextConfig` for the imported encoder: `pooler_options` (from `convert_pooler`, read
    off the pooler's tensors) for latent attention, None for mean pooling."""
    from open_clip_cxr.text.config import CXRTextConfig
    # The authors' instruction format (see open_clip_cxr/text/instructions.py): the separator id only
    # marks where the text starts and is never read by the decoder.
    kwargs = dict(llm=llm, output_norm=False, lora=None, instruction_separator_id=instruction_separator_id,
                  instruction_format="llm2vec", base_weights=None)
    if pooler_options:
        kwargs.update(pooling="latent_attention", **pooler_options)
    else:
        kwargs.update(pooling="mean")
    return CXRTextConfig(**kwargs)


def marker_id_from_tokenizer(src: Path) -> Optional[int]:
    """The id of a known separator token (`instructions.SEPARATORS`) in the source's tokenizer.json,
    used to mark where an instruction's text starts; None when there is none."""
    from open_clip_cxr.text.instructions import SEPARATORS
    path = (src if src.is_dir() else src.parent) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text())
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    ids.update(tok.get("model", {}).get("vocab", {}) if isinstance(tok.get("model", {}).get("vocab"), dict) else {})
    return next((ids[s] for s in SEPARATORS.values() if s in ids), None)


@torch.no_grad()
def convert_llm2vec(src, pooler: str = "convert", latent_heads: int = 8,
                    instruction_separator_id: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """Build our `CXRTextModel` holding the weights of an LLM2Vec-style checkpoint.

    `pooler`: "convert" maps the `latent_attn.*` pooler and sets the config's pooling options to
    match it (a clear `PoolerLayoutError` if it cannot be represented), "drop" keeps only the
    decoder and pools by mean. `latent_heads` cannot be read off the weights.
    """
    from open_clip_cxr.text.model import CXRTextModel
    if pooler not in ("convert", "drop"):
        raise ValueError(f"pooler must be 'convert' or 'drop', got {pooler!r}")
    src = Path(src).expanduser()
    decoder, pooler_src = split_llm2vec_state(read_state_dict(src))
    llm = llm_config_dict(src)
    ours, options = None, None
    if pooler == "convert":
        if not pooler_src:
            raise ValueError(f"{src} has no latent_attn.* pooler tensors; use pooler='drop' for mean pooling")
        ours, options = convert_pooler(pooler_src, hidden_size=llm.get("hidden_size"), heads=latent_heads)
    if instruction_separator_id is None:
        instruction_separator_id = marker_id_from_tokenizer(src)
    config = text_config(llm, options, instruction_separator_id)
    model = CXRTextModel(config, with_lora=False)
    result = model.llm.load_state_dict(decoder, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_DROP_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{src}: decoder tensors do not match its config.json: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if ours is not None:
        model.pooler.load_state_dict(ours)
    return model.to(dtype).eval()


def save_text_tower(model, out_dir, tokenizer_src=None) -> Path:
    """`save_pretrained` + the source's tokenizer files, so the folder is self-contained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer_src is not None:
        src = Path(tokenizer_src)
        src = src if src.is_dir() else src.parent
        copied = [n for n in TOKENIZER_FILES if (src / n).is_file() and shutil.copy2(src / n, out / n)]
        if not copied:
            logging.warning(f"no tokenizer files in {src}; the output folder holds weights only")
    return out
