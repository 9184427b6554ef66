"""The CLIP stage's model, composed from two explicit tower sources, and where each tower's
weights came from (provenance).

    model: cxr-llm-small-l4          the architecture: vision tower, embedding size, preprocessing
    text:  {from: local-dir:runs/stage1}
    vision: {from: auto}
    pretrained_image: true

`text.from` (where the text tower comes from: its config, tokenizer and weights):
  null                 the text tower of `model` (its base weights when `pretrained_text`)
  local-dir:DIR        the text tower of an OpenCLIP folder (a stage-1 export, a released CLIP)
  hf-hub:ORG/NAME      the same, from the Hub (offline: from its cache)
  NAME                 the text tower of another built-in model (base weights per `pretrained_text`)

`vision.from` (where the vision tower's weights come from):
  auto (default)       the text source folder's vision tower when it was trained (a CLIP
                       export), else the pretrained weights when `pretrained_image` (timm's for
                       the architecture), else a random initialisation
  pretrained           timm's pretrained weights for the architecture, whatever the folders hold
  random               a random initialisation (logged as such)
  source               the text source folder's vision tower, even where `auto` would not take
                       it (unknown history); a tower still at its initialisation is refused
  local-dir:DIR | hf-hub:ORG/NAME   the vision tower of another OpenCLIP folder
  FILE                 a timm trunk checkpoint (.safetensors / .pt / .pth / .bin), loaded into
                       `visual.trunk` (a classifier head in it is dropped)

How "trained" is known: every folder that `train-text` or `train-clip` exports records in its
`open_clip_config.json` a `provenance` entry, per tower, with where its weights started
(`init`) and whether a stage trained them (`trained`). A stage-1 export says its vision tower
was never trained. A folder without that entry (older exports, other people's releases) is
read from its weights: a vision tower whose normalisation layers all still hold their initial
values (weight 1, bias 0; BatchNorm running mean 0, variance 1) was never trained; any
pretrained or trained network moves them. That check also guards the result: a tower that
should hold pretrained or trained weights but is still at its initialisation is an error.

The old spelling `model: local-dir:DIR` (with no `text.from`) still works: it is read as
`text.from: local-dir:DIR` with the folder's architecture, the vision tower chosen as above,
and the log says so.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from open_clip_cxr.errors import UsageError
# folders as sources (importable from here as before)
from open_clip_cxr_train.tower_folders import (CONFIG_NAME, FOLDER_SCHEMAS, NORM_TYPES, folder_config,  # noqa: F401
                                    folder_state_dict, is_folder, norms_at_init, read_provenance, sub_state,
                                    write_provenance)


class RecipeError(UsageError):
    """A tower source the recipe names cannot be used as asked: the user's to fix (the message
    says how). The CLI reports it in one line."""


VISION_CHOICES = ("auto", "pretrained", "random", "source")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------- the plan

@dataclass
class Plan:
    """What `compose` builds, decided before anything is loaded; `lines` is the log."""
    arch: str                          # the name or folder the architecture (vision, embed_dim) comes from
    text_from: Optional[str]           # None: the architecture's own text tower
    vision: str                        # pretrained | random | source | local-dir:... | hf-hub:... | FILE
    vision_source: Optional[str] = None   # the folder the vision weights come from (source / folder)
    text_desc: str = ""
    vision_desc: str = ""
    lines: list = field(default_factory=list)


def vision_trained(spec: str, state: dict):
    """(trained?, how we know) of a folder's vision tower: its provenance entry, else its weights
    (`state`, the folder's state dict) read into a fresh tower of the folder's vision config."""
    from open_clip.model import _build_vision_tower
    full = folder_config(spec)
    prov = full.get("provenance")
    if prov and isinstance(prov.get("vision"), dict) and "trained" in prov["vision"]:
        v = prov["vision"]
        said = f"trained by {v.get('by', '?')}" if v["trained"] else "never trained"
        return bool(v["trained"]), f"its provenance says the vision tower was {said} (init {v.get('init', '?')})"
    cfg = full["model_cfg"]
    template = _build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "timm_model_pretrained": False})
    template.load_state_dict(sub_state(state, "visual."), strict=True)
    at_init = norms_at_init(template)
    if at_init is None:
        return None, "no provenance entry, and no normalisation layers to read"
    return (not at_init), ("no provenance entry; its vision tower's normalisation layers hold "
                           + ("their initial values (never trained)" if at_init else "trained values"))


def make_plan(recipe: dict) -> Plan:
    """Resolve `model`, `text.from`, `vision.from` and `pretrained_image` into a Plan (no weights read
    except, for a folder without provenance, its vision tower's; see `compose`)."""
    arch, text_from = recipe["model"], recipe["text"].get("from")
    lines = []
    if text_from is None and is_folder(arch):
        text_from = arch
        lines.append(f"model={arch} with no text.from: read as text.from={arch}, with the folder's architecture; "
                     f"the vision tower per vision.from={recipe['vision'].get('from') or 'auto'} "
                     f"and pretrained_image={recipe['pretrained_image']}")
    vision = recipe["vision"].get("from") or "auto"
    if vision not in VISION_CHOICES and not is_folder(vision) and not str(vision).endswith(WEIGHT_FILE_SUFFIXES):
        raise RecipeError(f"vision.from={vision!r}: use auto, pretrained, random, source, local-dir:DIR, "
                          f"hf-hub:ORG/NAME or a timm weights file ({', '.join(WEIGHT_FILE_SUFFIXES)})")
    if vision == "source" and not is_folder(text_from):
        raise RecipeError("vision.from=source takes the text source folder's vision tower, but text.from "
                          f"({text_from}) is not a local-dir:/hf-hub: folder: set vision.from to pretrained or random")
    return Plan(arch=arch, text_from=text_from, vision=vision, lines=lines)


# ---------------------------------------------------------------- compose

def _text_cfg(plan: Plan, recipe: dict, arch_cfg: dict) -> tuple:
    """(text_cfg for the build, tokenizer source, description)."""
    import open_clip
    src = plan.text_from
    if src is None:
        cfg = copy.deepcopy(arch_cfg["text_cfg"])
        cfg["hf_model_pretrained"] = bool(recipe["pretrained_text"])
        return cfg, plan.arch, f"{plan.arch}'s text tower ({'base weights' if recipe['pretrained_text'] else 'random init'})"
    if is_folder(src):
        cfg = copy.deepcopy(folder_config(src)["model_cfg"]["text_cfg"])
        cfg["hf_model_pretrained"] = False   # the folder's weights are loaded after the build
        prov = (read_provenance(src) or {}).get("text") or {}
        how = f", trained by {prov['by']}" if prov.get("trained") else ""
        return cfg, src, f"{src} (its text tower's weights{how})"
    named = open_clip.get_model_config(src)
    if named is None:
        raise RecipeError(f"text.from={src!r} is neither a local-dir:/hf-hub: folder nor a known model name")
    cfg = copy.deepcopy(named["text_cfg"])
    cfg["hf_model_pretrained"] = bool(recipe["pretrained_text"])
    return cfg, src, f"{src}'s text tower ({'base weights' if recipe['pretrained_text'] else 'random init'})"


def load_trunk_file(visual: nn.Module, path: str) -> None:
    """A timm checkpoint of the trunk (keys as timm names them; `visual.trunk.` / `trunk.` prefixes
    accepted) into `visual.trunk`; a classifier in it that the trunk no longer has is dropped."""
    from open_clip.factory import load_state_dict
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision.from={path}: no such file")
    state = load_state_dict(path, weights_only=True)
    for prefix in ("visual.trunk.", "trunk."):
        if any(k.startswith(prefix) for k in state):
            state = sub_state(state, prefix)
    trunk = visual.trunk
    own = trunk.state_dict()
    classifier = getattr(trunk, "default_cfg", {}).get("classifier") or "classifier"
    extra = [k for k in state if k not in own]
    if any(not k.startswith(classifier + ".") for k in extra):
        raise RecipeError(f"vision.from={path}: keys the vision trunk does not have: "
                          f"{[k for k in extra if not k.startswith(classifier + '.')][:5]}")
    missing = [k for k in own if k not in state]
    if missing:
        raise RecipeError(f"vision.from={path}: the file lacks {len(missing)} trunk weights, e.g. {missing[:3]}")
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def _arch(plan: Plan) -> tuple:
    """(model config, preprocess config) of the architecture the plan names."""
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our models)
    from open_clip_cxr.factory import PREPROCESS_CFGS
    if is_folder(plan.arch):
        full = folder_config(plan.arch)
        return full["model_cfg"], full.get("preprocess_cfg")
    arch_cfg = open_clip.get_model_config(plan.arch)
    if arch_cfg is None:
        raise RecipeError(f"model={plan.arch!r} is not a known model name or a local-dir:/hf-hub: folder")
    return arch_cfg, PREPROCESS_CFGS.get(plan.arch)


def _vision_choice(plan: Plan, recipe: dict, src_state: Optional[dict]) -> str:
    """`vision.from` resolved (auto -> source | pretrained | random); sets `plan.vision_desc`."""
    vision = plan.vision
    if vision == "auto":
        trained, why = (None, "")
        if src_state is not None:
            trained, why = vision_trained(plan.text_from, src_state)
        if trained:
            vision, plan.vision_desc = "source", f"{plan.text_from}'s vision tower ({why})"
        elif recipe["pretrained_image"]:
            vision = "pretrained"
            plan.vision_desc = "pretrained weights of the architecture (pretrained_image: true" + \
                (f"; {plan.text_from}'s vision tower is not used: {why})" if src_state is not None else ")")
        else:
            vision = "random"
            plan.vision_desc = "RANDOM initialisation (pretrained_image: false" + \
                (f"; {plan.text_from}'s vision tower is not used: {why})" if src_state is not None else ")")
    elif vision == "pretrained":
        plan.vision_desc = "pretrained weights of the architecture (vision.from: pretrained)"
    elif vision == "random":
        plan.vision_desc = "RANDOM initialisation (vision.from: random)"
    elif vision == "source":
        plan.vision_desc = f"{plan.text_from}'s vision tower as it is (vision.from: source)"
    elif is_folder(vision):
        plan.vision_desc = f"{vision}'s vision tower (vision.from)"
    else:
        plan.vision_desc = f"timm trunk weights from the file {vision} (vision.from)"
    return vision


def _load_text(model, plan: Plan, arch_cfg: dict, src_state: Optional[dict]) -> None:
    if src_state is not None:
        text_state = sub_state(src_state, "text.")
        try:
            model.text.load_state_dict(text_state, strict=True)
        except RuntimeError as e:
            raise RecipeError(f"text.from={plan.text_from}: its text tower does not fit model={plan.arch} "
                              f"(embed_dim {arch_cfg.get('embed_dim')}): {str(e).splitlines()[0]} ... "
                              f"set model to the architecture the folder was built with") from None


def _load_vision(model, plan: Plan, vision: str, src_state: Optional[dict]) -> Optional[bool]:
    """The vision weights into `model` (a folder's tower and temperature, or a trunk file);
    refused if its normalisation layers are still at their initial values. Returns that check."""
    vision_state = None
    if vision == "source":
        vision_state = src_state
    elif is_folder(vision):
        vision_state = folder_state_dict(vision)
    if vision_state is not None:
        try:
            model.visual.load_state_dict(sub_state(vision_state, "visual."), strict=True)
        except RuntimeError as e:
            raise RecipeError(f"vision.from={plan.vision if vision != 'source' else plan.text_from}: its vision "
                              f"tower does not fit model={plan.arch}: {str(e).splitlines()[0]} ... name a folder "
                              f"of the same architecture, or vision.from=pretrained") from None
        with torch.no_grad():   # a CLIP's temperature belongs with its aligned towers
            for name in ("logit_scale", "logit_bias"):
                p = getattr(model, name, None)
                if isinstance(p, torch.Tensor) and name in vision_state:
                    p.copy_(vision_state[name].reshape(p.shape))
    elif vision not in ("pretrained", "random", "auto"):
        load_trunk_file(model.visual, vision)

    at_init = norms_at_init(model.visual)
    if vision != "random" and at_init:
        where = "timm's loader" if vision == "pretrained" else vision
        raise RecipeError(f"the vision tower should hold {plan.vision_desc}, but its normalisation layers are "
                          f"all at their initial values: the weights from {where} did not arrive. Fix the vision "
                          f"source, or set vision.from=random to train from a random initialisation on purpose")
    return at_init


def compose(recipe: dict, log=print):
    """(model, tokenizer, model_cfg, preprocess_cfg, provenance) per the recipe's tower sources.
    `provenance` says where each tower's weights came from; `log` gets one line per decision."""
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our models)
    plan = make_plan(recipe)
    arch_cfg, preprocess_cfg = _arch(plan)
    text_cfg, tokenizer_source, plan.text_desc = _text_cfg(plan, recipe, arch_cfg)

    # the text source folder's weights, read once (text tower; the vision tower too when it is kept)
    src_state = folder_state_dict(plan.text_from) if is_folder(plan.text_from) else None
    vision = _vision_choice(plan, recipe, src_state)
    build_pretrained = vision == "pretrained"

    timm_name = arch_cfg.get("vision_cfg", {}).get("timm_model_name")
    if build_pretrained:
        plan.vision_desc = plan.vision_desc.replace("of the architecture", f"of {timm_name or 'the vision tower'}")
    model = open_clip.create_model(plan.arch, load_weights=False, pretrained_image=build_pretrained,
                                   pretrained_text=bool(text_cfg.get("hf_model_pretrained")), text_cfg=text_cfg)
    _load_text(model, plan, arch_cfg, src_state)
    at_init = _load_vision(model, plan, vision, src_state)
    if preprocess_cfg:
        open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **preprocess_cfg})
    model_cfg = copy.deepcopy(arch_cfg)
    model_cfg["text_cfg"] = {k: v for k, v in text_cfg.items() if k != "hf_model_pretrained"}
    model_cfg["vision_cfg"].pop("timm_model_pretrained", None)
    tokenizer = open_clip.get_tokenizer(tokenizer_source)

    provenance = {
        "text": {"init": plan.text_from or plan.arch, "desc": plan.text_desc,
                 "source": (read_provenance(plan.text_from) or {}).get("text") if is_folder(plan.text_from) else None},
        "vision": {"init": {"source": plan.text_from, "pretrained": f"pretrained:{timm_name}",
                            "random": "random"}.get(vision, vision),
                   "desc": plan.vision_desc, "at_init": at_init},
    }
    for line in plan.lines:
        log(line)
    log(f"text tower: {plan.text_desc}")
    log(f"vision tower: {plan.vision_desc}")
    return model, tokenizer, model_cfg, preprocess_cfg, provenance
