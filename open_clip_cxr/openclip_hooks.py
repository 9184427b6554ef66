"""Everything that teaches OpenCLIP our models. Imported once by `open_clip_cxr/__init__.py`.

OpenCLIP extension points used as they are:
- model configs: our JSON files are added with `open_clip.add_model_config`;
- transformers registration: `AutoConfig.register` / `AutoModel.register` make
  `HFTextEncoder` build `CXRTextModel` through its normal path;
- `open_clip.hf_configs.arch_dict`: tells `HFTextEncoder` our config's field names and pooler;
- timm's `register_model` (in `vision/`) provides vision towers with offline weights.

The one patch: `HFTextEncoder` resolves `text_cfg.hf_model_name` with
`AutoConfig.from_pretrained` / `AutoModel.from_pretrained`, which only know folders and Hub ids.
Our architectures ship inside this package and must build offline, so we wrap those two names in
`open_clip.hf_model` with thin proxies that resolve `cxr-text:` specs (see `text/archs.py`) and
hand every other name to transformers untouched. Nothing of OpenCLIP's factory is copied.
Every load through these proxies, and every tokenizer OpenCLIP builds (`HFTokenizer`), passes
`trust_remote_code=False`: a folder's `auto_map` custom code is refused, never prompted for or run.
"""
from pathlib import Path

import open_clip
import open_clip.hf_model as oc_hf_model
from open_clip.hf_configs import arch_dict
from transformers import AutoConfig, AutoModel

from .cache import cache_dir
from .text.archs import config_from_spec, is_spec
from .text.config import CXRTextConfig
from .text.model import CXRTextModel

PACKAGE_DIR = Path(__file__).parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"


class _ResolvingAutoConfig:
    """`AutoConfig` that also understands `cxr-text:` specs."""

    @staticmethod
    def from_pretrained(name, *args, **kwargs):
        if is_spec(name):
            return config_from_spec(name)
        return AutoConfig.from_pretrained(name, *args, **{**kwargs, "trust_remote_code": False})

    def __getattr__(self, item):
        return getattr(AutoConfig, item)


class _ResolvingAutoModel:
    """`AutoModel` whose `from_pretrained` loads a `cxr-text:` tower's base weights."""

    @staticmethod
    def from_pretrained(name, *args, **kwargs):
        if is_spec(name):
            return CXRTextModel.from_base(config_from_spec(name))
        return AutoModel.from_pretrained(name, *args, **{**kwargs, "trust_remote_code": False})

    @staticmethod
    def from_config(config, *args, **kwargs):
        return AutoModel.from_config(config, *args, **{**kwargs, "trust_remote_code": False})


class _NoRemoteCodeHFTokenizer(open_clip.tokenizer.HFTokenizer):
    """OpenCLIP's `HFTokenizer` with `trust_remote_code=False` forced (a config's
    `tokenizer_kwargs` cannot turn it on)."""

    def __init__(self, tokenizer_name, *args, **kwargs):
        super().__init__(tokenizer_name, *args, **{**kwargs, "trust_remote_code": False})


def _register_transformers():
    try:
        AutoConfig.register(CXRTextConfig.model_type, CXRTextConfig)
        AutoModel.register(CXRTextConfig, CXRTextModel)
    except ValueError:  # already registered (module reloaded)
        pass
    arch_dict[CXRTextConfig.model_type] = {
        "config_names": {
            "context_length": "max_position_embeddings",
            "vocab_size": "vocab_size",
            "width": "hidden_size",
            "heads": "num_attention_heads",
            "layers": "num_hidden_layers",
            "layer_attr": "layers",
            "token_embeddings_attr": "embed_tokens",
        },
        "pooler": "cls_pooler",  # returns our `pooler_output`
    }
    oc_hf_model.AutoConfig = _ResolvingAutoConfig()
    oc_hf_model.AutoModel = _ResolvingAutoModel
    open_clip.factory.HFTokenizer = _NoRemoteCodeHFTokenizer  # the name `get_tokenizer` calls


def _register_model_configs():
    """Add our JSON configs, with `{package}` expanded to this install's folder.

    `hf_tokenizer_name` must be a real folder for OpenCLIP's `HFTokenizer`, and a package's
    location is only known at run time, so the expanded copies are written to the cache and
    that folder is what OpenCLIP scans (it survives any later `add_model_config` rescan).
    """
    out = cache_dir("model_configs")
    for src in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        if src.stem not in our_model_names():
            continue
        text = src.read_text().replace("{package}", PACKAGE_DIR.as_posix())
        dst = out / src.name
        if not dst.exists() or dst.read_text() != text:
            tmp = dst.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(dst)
    if out not in [Path(p) for p in open_clip.factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(out)


def our_model_names():
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json") if p.stem.startswith("cxr-"))


def register():
    from . import vision  # noqa: F401  (registers timm vision towers)
    _register_transformers()
    _register_model_configs()
