"""The CLIP stage's model: built from its tower sources, what trains, the module DDP/FSDP wrap,
the optimiser's parameter groups, the loss, and the FLOPs of a step (for MFU)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from open_clip_cxr_train import cached_text
from open_clip_cxr_train.speedups import FrozenCast, low_precision_dtype
from open_clip_cxr_train.throughput import flops_per_sample_transformer, measure_forward_flops


def build_model(recipe: dict, log=print):
    """(model, train transform, eval transform, tokenizer, model_cfg) with the trainable parts set.
    The towers come from `text.from` / `vision.from` (see `training/towers.py`); where each
    one's weights came from is logged and kept in `model.tower_provenance`."""
    from open_clip_cxr_train.towers import compose
    from open_clip_cxr.vision.transforms import transforms_from_preprocess_cfg
    model, tokenizer, model_cfg, _, provenance = compose(recipe, log=log)
    model.tower_provenance = provenance
    cfg = dict(model.visual.preprocess_cfg)
    pre_train, pre_val = transforms_from_preprocess_cfg(cfg, train=True), transforms_from_preprocess_cfg(cfg, train=False)
    configure_trainable(model, recipe)
    if recipe["loss"]["name"] == "siglip" and model.logit_bias is None:   # SigLIP's init: t=10, b=-10
        model.logit_scale.data.fill_(math.log(10.0))
        model.logit_bias = nn.Parameter(torch.tensor(-10.0))
    return model, pre_train, pre_val, tokenizer, model_cfg


def export_provenance(provenance: dict, recipe: dict) -> dict:
    """What the CLIP stage's export records: each tower's start (`init`) and that this stage
    trained it (the vision tower unless `vision.mode: locked`)."""
    text, vision = dict(provenance["text"]), dict(provenance["vision"])
    text.update(trained=True, by="train-clip" + (" (cached text: head only)" if recipe["text"]["cached"] else ""))
    vision.update(trained=recipe["vision"]["mode"] != "locked", by=f"train-clip (vision.mode {recipe['vision']['mode']})")
    vision.pop("at_init", None)
    return {"text": text, "vision": vision}


def configure_trainable(model, recipe: dict) -> None:
    tower = model.text.transformer
    if not tower.has_lora and recipe["text"].get("lora"):   # e.g. a merged stage-1 export
        tower.config.lora = dict(recipe["text"]["lora"])
        tower.enable_lora()
    if recipe["text"]["cached"]:
        cached_text.freeze_for_cached(model)
    model.text.proj.requires_grad_(True)
    tower.norm.requires_grad_(True)
    mode = recipe["vision"]["mode"]
    if mode == "locked":
        model.lock_image_tower()
    elif mode == "lora":
        add_vision_lora(model, recipe["vision"]["lora"])
    if recipe["train"]["grad_checkpointing"]:
        model.visual.set_grad_checkpointing(True)
        if not recipe["text"]["cached"]:   # non-reentrant: the frozen embeddings need no input grads
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_vision_lora(model, lora: dict) -> None:
    """LoRA on the timm trunk's Linear/Conv layers named in `target_modules`; the trunk's base
    weights frozen, the vision head (projection) still fully trained."""
    from peft import LoraConfig, inject_adapter_in_model
    trunk = model.visual.trunk
    trunk.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                       target_modules=list(lora["target_modules"])), trunk)
    for n, p in trunk.named_parameters():
        p.requires_grad_("lora_" in n)


def merge_vision_lora(model) -> None:
    """Fold the vision LoRA into its base layers and put the plain layers back (for export)."""
    from peft.tuners.lora import LoraLayer
    for name, module in list(model.visual.trunk.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.visual.trunk.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.visual.trunk
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())


def frozen_base_cast(model, recipe: dict, accelerator) -> FrozenCast:
    """With `train.frozen_low_precision` and bf16/fp16 mixed precision, the frozen text base
    stored in that dtype; its fp32 masters wait on the CPU for the export. Off in the cached
    mode (no LLM in the step) and under FSDP/DeepSpeed, which set parameter dtypes themselves
    (FSDP2 wants one dtype per wrapped block)."""
    from accelerate.utils import DistributedType
    tower = model.text.transformer
    low = low_precision_dtype(accelerator.mixed_precision)
    if not recipe["train"]["frozen_low_precision"] or low is None or recipe["text"]["cached"]:
        return FrozenCast(tower, None)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.print("train.frozen_low_precision: not applied under FSDP/DeepSpeed")
        return FrozenCast(tower, None)
    return FrozenCast(tower, low, masters_device="cpu")


def transformer_blocks(model, cached: bool = False) -> list:
    """The repeated blocks that `train.compile` compiles: the vision trunk's `blocks` (timm)
    and, unless the text is cached, the decoder's layers."""
    blocks = getattr(getattr(model.visual, "trunk", None), "blocks", None)
    out = list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []
    if not cached:
        out += list(model.text.transformer.base_llm().layers)
    return out


class ContrastiveModel(nn.Module):
    """What `accelerator.prepare` wraps: both encoders in one forward, so DDP sees every
    trainable parameter used there. `text` is token ids, or cached pooled features."""

    def __init__(self, clip, cached: bool = False):
        super().__init__()
        self.clip, self.cached = clip, cached

    @property
    def text(self):   # what `eval.encode.check_tokens` reads the vocabulary and context from
        return self.clip.text

    # validation through the wrapper: under FSDP2 only the wrapper's registered methods gather
    # the shards (see `shard_ready`)
    def encode_image(self, images, normalize: bool = False):
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, text, normalize: bool = False):
        return self.clip.encode_text(text, normalize=normalize)

    def forward(self, images, text):
        image_features = F.normalize(self.clip.encode_image(images), dim=-1)
        if self.cached:
            text_features = cached_text.normalized_text_features(self.clip, text)
        else:
            text_features = F.normalize(self.clip.encode_text(text), dim=-1)
        return image_features, text_features, self.clip.logit_scale.exp(), self.clip.logit_bias


# ---------------------------------------------------------------- FSDP2

SCALAR_PARAMS = ("logit_scale", "logit_bias")


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))   # absent from older accelerate releases


def scalars_to_1d(clip) -> None:
    """FSDP2 shards every parameter along dim 0 and refuses 0-d ones, such as OpenCLIP's
    logit_scale: under FSDP2 they train as shape [1] (`full_state_dict` turns them back)."""
    for name in SCALAR_PARAMS:
        p = getattr(clip, name, None)
        if isinstance(p, nn.Parameter) and p.ndim == 0:
            setattr(clip, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def shard_ready(net) -> None:
    """After FSDP2 has wrapped `net`: its encode methods gather the shards as `forward` does."""
    from torch.distributed.fsdp import register_fsdp_forward_method
    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(net, method)


def full_value(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (a collective on every rank for an FSDP2 shard)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def load_full_state_dict(clip, full: dict) -> None:
    """Load the gathered state dict of a `ContrastiveModel` into a freshly built `clip`, exactly
    (strict), undoing `scalars_to_1d`."""
    full = dict(full)
    for name in SCALAR_PARAMS:
        key, p = f"clip.{name}", getattr(clip, name, None)
        if key in full and p is not None:
            full[key] = full[key].reshape(p.shape)
    ContrastiveModel(clip).load_state_dict(full, strict=True)


def param_groups(model, recipe: dict) -> list:
    """text LoRA / text head / vision / logit scale+bias, each split into decay and no-decay."""
    o, tower = recipe["optim"], model.text.transformer
    parts = {"text_lora": (tower.llm, recipe["text"]["lr"]),
             "text_head": (nn.ModuleList([tower.norm, tower.pooler, model.text.proj]), recipe["text"]["head_lr"]),
             "vision": (model.visual, recipe["vision"]["lr"])}
    groups, seen = [], set()
    for name, (module, lr) in parts.items():
        decay, no_decay = [], []
        for n, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (no_decay if p.ndim < 2 or "norm" in n or n.endswith(".bias") else decay).append(p)
        groups += [{"name": f"{name}", "params": decay, "lr": lr, "weight_decay": o["weight_decay"]},
                   {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    logit = [p for p in (model.logit_scale, model.logit_bias) if p is not None and p.requires_grad]
    groups.append({"name": "logit", "params": logit, "lr": o["logit_lr"] or recipe["vision"]["lr"], "weight_decay": 0.0})
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen and
            all(p is not q for q in logit)]
    if left:
        raise ValueError(f"trainable parameters in no group: {left[:5]}")
    return [g for g in groups if g["params"]]


def build_loss(recipe: dict, accelerator):
    from open_clip.loss import ClipLoss, SigLipLoss
    world, rank = accelerator.num_processes, accelerator.process_index
    if recipe["loss"]["name"] == "siglip":
        return SigLipLoss(rank=rank, world_size=world)
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)


def compute_loss(loss_fn, outputs):
    img, txt, scale, bias = outputs
    img, txt = img.float(), txt.float()
    if bias is not None:
        return loss_fn(img, txt, scale.float(), bias.float())
    return loss_fn(img, txt, scale.float())


# ---------------------------------------------------------------- FLOPs

def train_flops(model, recipe, device, image_size: int):
    """(FLOPs per image, FLOPs per text token) of one training step, for MFU.

    Vision: the measured forward count of one image (FlopCounterMode) x3 when trained (forward,
    input and weight gradients), x1 when locked. Text: 6N per token for the trainable part,
    4N for the frozen base (forward + activation gradients), N = the decoder's matmul weights."""
    visual = model.visual
    x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=next(visual.parameters()).dtype)
    was = visual.training
    visual.eval()
    fwd = measure_forward_flops(visual, x)
    visual.train(was)
    vision = fwd * (1 if recipe["vision"]["mode"] == "locked" else 3)
    if recipe["text"]["cached"]:
        return vision, 0.0
    llm = model.text.transformer.llm
    mats = [p for n, p in llm.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    n_all = sum(p.numel() for p in mats)
    n_train = sum(p.numel() for p in mats if p.requires_grad)
    return vision, flops_per_sample_transformer(n_all, 1, n_trainable=n_train)
