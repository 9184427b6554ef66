"""Pretrained weights for the text tower, named by `CXRTextConfig.base_weights`:

- `gguf:<package>/<file>`: a GGUF file inside an installed Python package (SmolLM2 for
  `cxr-llm-small`), dequantised once into a safetensors cache, then read from there;
- `hf:<repo_id>[@revision]`: a Hub repo in transformers layout (the authors'
  `lukeingawesome/llm2vec4cxr`), fetched by huggingface_hub (works offline from its cache);
- a local folder holding `*.safetensors` in either layout.

Weights are copied tensor by tensor from memory-mapped safetensors, so loading never holds a
second copy of the model.
"""
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..asset_packages import package_dir
from ..cache import cache_dir, process_tmp

# Functions mapping a source key (after prefix stripping) to our pooler's key, or None.
# `conversion/` adds the authors' `latent_attn.*` layout here.
POOLER_KEY_MAPPERS: List[Callable[[str], str]] = []
_DROP_PREFIXES = ("lm_head.",)
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")
_STRIP_PREFIXES = ("model.", "llm.", "transformer.")


def resolve(source: str) -> Path:
    """Folder with safetensors weights for `source` (converting or fetching if needed)."""
    if source.startswith("gguf:"):
        return _gguf_to_cache(source[len("gguf:"):])
    if source.startswith("hf:"):
        repo, _, revision = source[len("hf:"):].partition("@")
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(repo, revision=revision or None,
                                          allow_patterns=["*.safetensors", "*.json"]))
        except Exception as e:  # offline without a cache, private repo, ...
            raise RuntimeError(
                f"could not fetch text-tower weights {repo!r} from the Hugging Face Hub ({e}). "
                f"Download them once with network access, or build the model without pretrained "
                f"text weights (`pretrained_text=False`).") from e
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text-tower weights folder not found: {path}")
    return path


def _gguf_to_cache(spec: str) -> Path:
    package, _, filename = spec.partition("/")
    pkg_dir = package_dir(package, filename)
    out = cache_dir("llm", f"{package}-{Path(filename).stem}")
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoModel
    logging.info(f"dequantising {pkg_dir / filename} into {out} (once)")
    model = AutoModel.from_pretrained(pkg_dir, gguf_file=filename, dtype=torch.float32, trust_remote_code=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = process_tmp(out / "model.safetensors")
    save_file(state, str(tmp), metadata={"source": f"{package}/{filename}"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg_tmp = process_tmp(out / "config.json")
    cfg_tmp.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(cfg_tmp, out / "config.json")
    os.replace(tmp, out / "model.safetensors")  # whole or absent: a killed run leaves no half cache
    return out


def iter_keys(folder: Path) -> Iterator[str]:
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            yield from sf.keys()


def iter_tensors(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder} (only safetensors weights are read)")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                yield key, sf.get_tensor(key)


def _pooler_mappers() -> List[Callable[[str], str]]:
    """Registered mappers plus the authors' `latent_attn.*` layout (`pooler_layouts`)."""
    from .pooler_layouts import pooler_key
    return [*POOLER_KEY_MAPPERS, pooler_key]


def _whole_pooler_converter(keys):
    """When the folder's pooler (`latent_attn.*`) is in a layout other than ours (e.g. the authors'
    "mha"), it is converted as a whole: -> (key -> pooler sub-key or None, (sub-keys -> tensors,
    config) -> our pooler's state dict fitted to the config). None otherwise."""
    from .pooler_layouts import convert_pooler_state, detect_layout, pooler_options, split_prefix
    subs = [s[1] for s in map(split_prefix, keys) if s]
    if not subs or detect_layout(subs) == "cxr":
        return None

    def pick(key):
        split = split_prefix(key)
        return split[1] if split else None

    def convert(sub, config):
        return convert_pooler_state(sub, hidden_size=config.hidden_size, options=pooler_options(config))
    return pick, convert


def route_key(key: str, ours: bool = False, mappers=()):
    """Source key -> ("llm" | "pooler" | "norm", our key) or None to skip.

    `ours`: the folder was saved from a `CXRTextModel` (keys `llm.*`, `pooler.*`, `norm.*`), where a
    top-level `norm.*` is the output LayerNorm, not the decoder's final norm.
    """
    if key.startswith(_DROP_PREFIXES):
        return None
    if ours and key.startswith("norm."):
        return "norm", key[len("norm."):]
    for mapper in mappers:
        mapped = mapper(key)
        if mapped is not None:
            return "pooler", mapped
    if key.startswith("pooler."):
        return "pooler", key[len("pooler."):]
    for prefix in _STRIP_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return "llm", key


@torch.no_grad()
def load_into(model, source: str) -> Dict[str, list]:
    """Copy `source` weights into `model.llm` (before LoRA) and, when present, `model.pooler`."""
    folder = resolve(source)
    targets = {"llm": dict(model.base_llm().named_parameters()), "pooler": dict(model.pooler.named_parameters()),
               "norm": dict(model.norm.named_parameters())}
    targets["llm"].update(dict(model.base_llm().named_buffers()))
    ours = any(k.startswith("llm.") for k in iter_keys(folder))
    mappers = _pooler_mappers()
    n_layers = len(model.base_llm().layers)
    loaded, unexpected, skipped_layers = set(), [], set()
    whole = None if ours else _whole_pooler_converter(iter_keys(folder))
    pooler_src = {}   # a pooler in another layout (e.g. the authors' "mha"): converted as a whole below
    for key, tensor in iter_tensors(folder):
        sub = whole and whole[0](key)
        if sub:
            pooler_src[sub] = tensor
            continue
        routed = route_key(key, ours=ours, mappers=mappers)
        if routed is None:
            continue
        part, name = routed
        layer = _LAYER_KEY.match(name) if part == "llm" else None
        if layer and int(layer.group(1)) >= n_layers:
            # a config that keeps the lowest layers only (e.g. `cxr-llm-small-l4`): by design
            skipped_layers.add(int(layer.group(1)))
            continue
        param = targets[part].get(name)
        if param is None:
            unexpected.append(key)
            continue
        if param.shape != tensor.shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} in {folder} but the model has {tuple(param.shape)}")
        param.copy_(tensor.to(param.dtype))
        loaded.add((part, name))
    if pooler_src:
        state = whole[1](pooler_src, model.config)
        model.pooler.load_state_dict(state)   # strict: the converter fitted it to this config
        loaded.update(("pooler", k) for k in state)
    missing = [n for n, p in model.base_llm().named_parameters() if ("llm", n) not in loaded]
    if missing:
        raise ValueError(f"text weights from {source} miss {len(missing)} decoder tensors, e.g. {missing[:5]}")
    pooler_loaded = any(part == "pooler" for part, _ in loaded)
    if skipped_layers:
        logging.getLogger(__name__).info("text weights from %s: kept the lowest %d decoder layers, skipped %d above",
                                         source, n_layers, len(skipped_layers))
    return {"unexpected": unexpected, "pooler_loaded": pooler_loaded, "folder": str(folder),
            "skipped_layers": sorted(skipped_layers)}

