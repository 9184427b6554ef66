"""Import the authors' LLM2CLIP4CXR CLIP checkpoint as an OpenCLIP `cxr-llm` model.

Source layout (from the authors' training and retrieval code, lukeingawesome/llm2clip4cxr):
an EVA-CLIP `CustomCLIP` whose text tower was replaced by `LLM2VecWithProj`:

- `visual.*`: EVA02-CLIP-L-14-336 in EVA-CLIP naming (`visual.blocks.N.attn.q_proj`, `q_bias`,
  `mlp.w1|w2|w3|ffn_ln`, `visual.head` with a bias, rope buffers), or already timm/OpenCLIP
  naming (`visual.trunk.*`). EVA-CLIP naming goes through timm's own EVA checkpoint filter;
- `text.core.*` and `text.model.*` (the same module registered twice): the LLM2Vec wrapper, i.e.
  `model.base_model.model.<Llama>` with peft LoRA (`lora_A.llm2clip`, usually an unused zero
  `default` adapter too) and `latent_attn.*`. Base decoder tensors may be absent (the authors
  load them from `lukeingawesome/llm2vec4cxr`): pass `text_base` then;
- `text.projection.0` (LayerNorm) and `text.projection.1` (Linear with bias) -> our
  `text.transformer.norm` and OpenCLIP's `text.proj`. OpenCLIP's HF text projection has no
  bias, so the bias b is folded into the LayerNorm's: with c = pinv(W) b, W (y + c) = W y + b
  exactly whenever W has full row rank (embed dim <= hidden size, as for any trained projection);
  the residual is checked;
- `logit_scale`.

The pooler comes from `text_base` when given (as the authors' retrieval code does), else from
the checkpoint; decoder base tensors from the checkpoint, else from `text_base`. LoRA alpha
cannot be read off the weights: the authors' default is 32.
"""
import copy
import json
import logging
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .checkpoints import build_clip, load_clip_state, read_state_dict
from .llm2vec import split_llm2vec_state
from open_clip_cxr.text.pooler_layouts import convert_pooler_state

_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<name>[^.]+)\.weight$")
_TEXT_PREFIXES = ("text.core.", "text.model.")


class ConversionError(ValueError):
    """The checkpoint does not have the layout this converter expects."""


def split_clip_state(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Group a LLM2CLIP state dict: visual / text core / projection / logit_scale / other."""
    parts = {"visual": {}, "core": {}, "projection": {}, "logit": {}, "other": {}}
    seen_core = {}
    for key, tensor in state.items():
        if key.startswith("visual."):
            parts["visual"][key[len("visual."):]] = tensor
        elif key.startswith("text.projection."):
            parts["projection"][key[len("text.projection."):]] = tensor
        elif key in ("logit_scale", "logit_bias"):
            parts["logit"][key] = tensor
        elif key.startswith(_TEXT_PREFIXES):
            prefix = next(p for p in _TEXT_PREFIXES if key.startswith(p))
            sub = key[len(prefix):]
            # `text.core` and `text.model` alias one module: keep one copy (they must agree).
            if sub in seen_core and not torch.equal(seen_core[sub], tensor):
                raise ConversionError(f"text.core.{sub} and text.model.{sub} differ")
            seen_core[sub] = tensor
        else:
            parts["other"][key] = tensor
    parts["core"] = seen_core
    return parts


def split_text_core(core: Dict[str, torch.Tensor]):
    """-> (decoder base tensors, {adapter: {module: (A, B)}}, pooler tensors).

    Decoder keys come out in plain Llama naming (`layers.0.self_attn.q_proj.weight`)."""
    base, loras, pooler = {}, {}, {}
    for key, tensor in core.items():
        if key.startswith("latent_attn."):
            pooler[key[len("latent_attn."):]] = tensor
            continue
        sub = key[len("model."):] if key.startswith("model.") else key
        sub = sub[len("base_model.model."):] if sub.startswith("base_model.model.") else sub
        m = _LORA_RE.match(sub)
        if m:
            slot = loras.setdefault(m["name"], {}).setdefault(m["module"], [None, None])
            slot[0 if m["ab"] == "A" else 1] = tensor
            continue
        base[sub.replace(".base_layer.", ".")] = tensor
    base = {k: v for k, v in base.items() if not k.startswith("lm_head.") and not k.endswith("rotary_emb.inv_freq")}
    return base, loras, pooler


def pick_adapter(loras: dict, name: str) -> Tuple[str, dict]:
    if not loras:
        raise ConversionError("no LoRA tensors under text.core / text.model; is this an LLM2CLIP4CXR checkpoint?")
    if name not in loras:
        live = [n for n, mods in loras.items() if any(b is not None and b.abs().max() > 0 for _, b in mods.values())]
        if len(live) != 1:
            raise ConversionError(f"LoRA adapter {name!r} not found; the checkpoint has {sorted(loras)}; pass "
                                  f"the trained one with --adapter-name")
        logging.warning(f"LoRA adapter {name!r} not found; using the only non-zero one, {live[0]!r}")
        name = live[0]
    for other, mods in loras.items():
        if other != name and any(b is not None and b.abs().max() > 0 for _, b in mods.values()):
            logging.warning(f"ignoring non-zero LoRA adapter {other!r} (inactive in the authors' model)")
    mods = loras[name]
    broken = [m for m, (a, b) in mods.items() if a is None or b is None]
    if broken:
        raise ConversionError(f"LoRA adapter {name!r} lacks A or B for {broken[:3]}")
    return name, mods


def _vision_state(visual: Dict[str, torch.Tensor], trunk) -> Dict[str, torch.Tensor]:
    """EVA-CLIP or timm-named vision tensors -> OpenCLIP `visual.*` keys."""
    if any(k.startswith("trunk.") for k in visual):  # already OpenCLIP TimmModel naming
        return {"visual." + k: v for k, v in visual.items()}
    from timm.models.eva import checkpoint_filter_fn
    head = {k: visual.pop(k) for k in list(visual) if k.startswith("head.")}
    filtered = checkpoint_filter_fn({"visual." + k: v for k, v in visual.items()}, trunk)
    out = {"visual.trunk." + k: v for k, v in filtered.items()}
    for k, v in head.items():
        out["visual.head.proj." + k[len("head."):]] = v
    return out


def fold_projection_bias(weight: torch.Tensor, bias: torch.Tensor, norm_bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm bias that makes a bias-free projection reproduce `weight @ y + bias`."""
    w, b = weight.double(), bias.double()
    c = torch.linalg.pinv(w) @ b
    residual = float((w @ c - b).abs().max())
    if residual > 1e-5 * (1.0 + float(b.abs().max())):
        raise ConversionError(f"the text projection's bias cannot be folded (residual {residual:.3g}): its weight "
                              f"{tuple(weight.shape)} lacks full row rank")
    return (norm_bias.double() + c).to(norm_bias.dtype)


def _text_spec_with_lora(spec: str, lora_mods: dict, alpha: Optional[float]):
    """Our text spec, with the LoRA rank / targets / alpha of the checkpoint's adapter."""
    from open_clip_cxr.text.archs import config_from_spec, spec_for
    config = config_from_spec(spec)
    a, _ = next(iter(lora_mods.values()))
    r = int(a.shape[0])
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora_mods})
    lora = dict(config.lora or {})
    if lora.get("r") != r and alpha is None:
        logging.warning(f"LoRA rank {r} differs from the config's {lora.get('r')}; alpha kept at {lora.get('alpha', 32)} "
                        f"(pass --lora-alpha to set it)")
    lora.update(r=r, target_modules=targets, alpha=alpha if alpha is not None else lora.get("alpha", 32))
    config.lora = lora
    # `base_weights` stays: it names the card's base model, and OpenCLIP never fetches it when a
    # full checkpoint is loaded.
    return config, spec_for(config)


def _pooler_from(ckpt_pooler: dict, base_pooler: dict, pooler_from: str, hidden: int) -> dict:
    if pooler_from == "auto":
        pooler_from = "text_base" if base_pooler else "checkpoint"
    chosen = base_pooler if pooler_from == "text_base" else ckpt_pooler
    if not chosen:
        hint = "" if base_pooler else " (pass the llm2vec4cxr weights as text_base / --text-base)"
        raise ConversionError(f"no latent_attn.* pooler tensors in the {pooler_from.replace('_', ' ')}{hint}")
    if base_pooler and ckpt_pooler and set(base_pooler) == set(ckpt_pooler):
        diff = max(float((base_pooler[k].float() - ckpt_pooler[k].float()).abs().max()) for k in base_pooler)
        if diff > 1e-3:
            logging.warning(f"pooler in the checkpoint differs from text_base's (max abs diff {diff:.3g}); "
                            f"using the {pooler_from.replace('_', ' ')}'s")
    return convert_pooler_state(chosen, hidden_size=hidden)


def _decoder_state(model, base: dict, base_decoder: dict, lora_mods: dict, have_text_base: bool) -> dict:
    """Our `text.transformer.llm.*` tensors: LoRA from the adapter, base weights from the
    checkpoint when it has them, else from text_base."""
    out, missing = {}, []
    for key in model.state_dict():
        if not key.startswith("text.transformer.llm."):
            continue
        sub = key[len("text.transformer.llm."):]
        sub = sub[len("base_model.model."):] if sub.startswith("base_model.model.") else sub
        m = _LORA_RE.match(sub)
        if m:
            pair = lora_mods.get(m["module"])
            tensor = None if pair is None else pair[0 if m["ab"] == "A" else 1]
        else:
            plain = sub.replace(".base_layer.", ".")
            tensor = base.get(plain, base_decoder.get(plain))
        if tensor is None:
            missing.append(sub)
        else:
            out[key] = tensor
    if missing:
        hint = "" if have_text_base else " (pass the llm2vec4cxr weights as text_base / --text-base)"
        raise ConversionError(f"text decoder tensors found neither in the checkpoint nor in text_base{hint}: "
                              f"{missing[:5]} ... ({len(missing)} in all)")
    return out


@torch.no_grad()
def convert_llm2clip(src, model_name: str = "cxr-llm", *, model_cfg: Optional[dict] = None,
                     text_base=None, adapter_name: str = "llm2clip", lora_alpha: Optional[float] = None,
                     pooler_from: str = "auto", preprocess_cfg: Optional[dict] = None):
    """-> (OpenCLIP model with LoRA unmerged, its model_cfg, preprocess_cfg).

    `model_cfg` defaults to the config of `model_name` (an OpenCLIP name or a config JSON file).
    `text_base` is an llm2vec4cxr folder (or our converted one) supplying the decoder tensors the
    checkpoint lacks, and the pooler (see `pooler_from`).
    """
    import open_clip
    import open_clip_cxr
    if pooler_from not in ("auto", "checkpoint", "text_base"):
        raise ValueError(f"pooler_from must be auto, checkpoint or text_base, got {pooler_from!r}")
    if model_cfg is None and str(model_name).endswith(".json") and Path(model_name).is_file():
        model_cfg = json.loads(Path(model_name).read_text())
        model_cfg = model_cfg.get("model_cfg", model_cfg)
    cfg = copy.deepcopy(model_cfg or open_clip.get_model_config(model_name))
    if cfg is None:
        raise ValueError(f"unknown model config {model_name!r}")
    if preprocess_cfg is None:
        preprocess_cfg = open_clip_cxr.factory.PREPROCESS_CFGS.get(model_name)
    parts = split_clip_state(read_state_dict(src))
    if parts["other"]:
        raise ConversionError(f"{src}: unexpected tensors outside visual / text / logit_scale: "
                              f"{sorted(parts['other'])[:8]}")
    if not parts["visual"] or not parts["core"] or not parts["projection"]:
        raise ConversionError(f"{src}: expected visual.*, text.core.* (or text.model.*) and text.projection.* "
                              f"tensors; found groups {[k for k, v in parts.items() if v]}")
    base, loras, ckpt_pooler = split_text_core(parts["core"])
    adapter, lora_mods = pick_adapter(loras, adapter_name)
    base_decoder, base_pooler = ({}, {})
    if text_base is not None:
        base_decoder, base_pooler = split_llm2vec_state(read_state_dict(Path(text_base).expanduser()))

    config, spec = _text_spec_with_lora(cfg["text_cfg"]["hf_model_name"], lora_mods, lora_alpha)
    if not config.output_norm:
        raise ConversionError("the target text tower has output_norm off; LLM2CLIP's projection starts with a LayerNorm")
    cfg["text_cfg"]["hf_model_name"] = spec
    proj_w = parts["projection"]["1.weight"]
    cfg["embed_dim"] = int(proj_w.shape[0])
    cfg["text_cfg"].pop("hf_model_pretrained", None)
    visual = parts["visual"]
    if "head.bias" in visual or "head.proj.bias" in visual:
        cfg["vision_cfg"]["timm_proj_bias"] = True
    model = build_clip(cfg, preprocess_cfg)
    cfg["vision_cfg"].pop("timm_model_pretrained", None)
    vision = _vision_state(dict(visual), model.visual.trunk)

    hidden = config.hidden_size
    pooler = _pooler_from(ckpt_pooler, base_pooler, pooler_from, hidden)
    state = dict(vision)
    state.update({f"text.transformer.pooler.{k}": v for k, v in pooler.items()})
    state.update({"text.transformer.norm." + k[2:]: v for k, v in parts["projection"].items() if k.startswith("0.")})
    state["text.proj.weight"] = proj_w
    if "1.bias" in parts["projection"]:
        state["text.transformer.norm.bias"] = fold_projection_bias(
            proj_w, parts["projection"]["1.bias"], state["text.transformer.norm.bias"])
    state.update(parts["logit"])
    state.update(_decoder_state(model, base, base_decoder, lora_mods, text_base is not None))
    load_clip_state(model, state, source=str(src))
    logging.info(f"converted {src}: LoRA adapter {adapter!r} (r={config.lora['r']}), "
                 f"pooler from {'text_base' if base_pooler and pooler_from != 'checkpoint' else 'checkpoint'}")
    return model.eval(), cfg, dict(model.visual.preprocess_cfg)
