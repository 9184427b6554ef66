"""Named text-tower architectures and the `cxr-text:` spec OpenCLIP configs point at.

OpenCLIP's `text_cfg.hf_model_name` is handed to `AutoConfig.from_pretrained`, which can only
resolve a folder or a Hub id; neither works offline for an architecture that ships inside a
Python package. So our configs say `"hf_model_name": "cxr-text:<name>"` (optionally followed by
JSON overrides, e.g. `cxr-text:cxr-llm-small{"lora": null}`) and `openclip_hooks` resolves it
here. ':' cannot occur in a Hub id, so the spec never shadows a real model.
"""
import json
from pathlib import Path
from typing import Dict, Union

from .config import LATENT_OPTIONS, CXRTextConfig

SPEC_PREFIX = "cxr-text:"
ARCH_DIR = Path(__file__).parent / "archs"
# The fields that define a tower; everything else in a transformers config is derived.
ARCH_FIELDS = ("llm", "pooling", *LATENT_OPTIONS, "output_norm", "lora", "train_pooling",
               "instruction_separator_id", "instruction_format", "similarity", "base_weights")

_ARCHS: Dict[str, dict] = {}


def register_text_arch(name: str, arch: Union[dict, str, Path]) -> None:
    """Add a named architecture (a dict or a JSON file) so `cxr-text:<name>` resolves to it."""
    if not isinstance(arch, dict):
        arch = json.loads(Path(arch).read_text())
    _ARCHS[name] = {k: v for k, v in arch.items() if not k.startswith("_")}   # "_comment": documentation


def list_text_archs():
    return sorted(_ARCHS)


def is_spec(name) -> bool:
    return isinstance(name, str) and name.startswith(SPEC_PREFIX)


def parse_spec(spec: str) -> dict:
    """`cxr-text:name`, `cxr-text:name{overrides}` or `cxr-text:{full arch}` -> arch dict."""
    body = spec[len(SPEC_PREFIX):]
    name, brace, rest = body.partition("{")
    arch = {}
    if name:
        if name not in _ARCHS:
            raise KeyError(f"unknown text architecture {name!r} in {spec!r}; known: {list_text_archs()}")
        arch = json.loads(json.dumps(_ARCHS[name]))  # deep copy
    if brace:
        try:
            overrides = json.loads(brace + rest)
        except json.JSONDecodeError as e:
            raise ValueError(f"bad JSON overrides in text spec {spec!r}: {e}") from e
        for key, value in overrides.items():   # `llm` merges key by key: {"llm": {"num_hidden_layers": 3}}
            both_dicts = isinstance(value, dict) and isinstance(arch.get(key), dict)
            arch[key] = {**arch[key], **value} if both_dicts else value
    return arch


def config_from_spec(spec: str) -> CXRTextConfig:
    return CXRTextConfig(**parse_spec(spec))


def arch_of(config: CXRTextConfig) -> dict:
    return {k: getattr(config, k) for k in ARCH_FIELDS}


def spec_for(config: CXRTextConfig) -> str:
    """The shortest spec that rebuilds `config`: a registered name, or the name plus overrides."""
    arch = arch_of(config)
    best, best_diff = None, None
    for name, known in _ARCHS.items():
        known = arch_of(CXRTextConfig(**known))
        diff = {k: v for k, v in arch.items() if known.get(k) != v}
        if best_diff is None or len(diff) < len(best_diff):
            best, best_diff = name, diff
    if best is None or "llm" in best_diff:
        return SPEC_PREFIX + json.dumps(arch, separators=(",", ":"))
    return SPEC_PREFIX + best + (json.dumps(best_diff, separators=(",", ":")) if best_diff else "")


for _path in sorted(ARCH_DIR.glob("*.json")):
    register_text_arch(_path.stem, _path)
