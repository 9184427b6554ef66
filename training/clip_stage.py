"""Stage 2: contrastive image-report training (CLIP), the text tower trained through LoRA.

    open-clip-cxr train-clip --recipe training/recipes/clip-cxr-llm-small-cpu.yaml \
        --set data.train=shards/train-{000000..000009}.tar --set train.max_steps=50
    accelerate launch --config_file training/recipes/accelerate/ddp_1node.yaml \
        -m open_clip_cxr.cli train-clip --recipe training/recipes/clip-cxr-llm.yaml

The loop, in the order a reader meets it in `train()`:
 1. recipe -> Accelerator (mixed precision, gradient accumulation, trackers, seed)
 2. model: composed from a text-tower source (`text.from`) and a vision-tower source
    (`vision.from`, pretrained per `pretrained_image`), each one's origin logged (`training/
    towers.py`; the export records it as `provenance`); text base frozen + LoRA, text head (norm,
    proj) trained; vision full / LoRA / locked; optional cached text features; the frozen
    base stored in bf16 and the blocks compiled, if the recipe asks (`training/speedups.py`)
 3. optimiser (AdamW, one param group per part, no decay on norms/biases/logit_scale) and a
    cosine schedule with warm-up
 4. checkpoint/resume: model, optimiser, scheduler, RNG and TrainState (data position)
 5. steps: forward, ClipLoss/SigLipLoss across processes, backward, clip, step; logs
 6. each epoch end: retrieval recall on the validation shards; at the end: export
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training import cached_text
from training.towers import write_provenance
from training.speedups import FrozenCast, compile_blocks, low_precision_dtype
from training.common import (MetricsWriter, Throughput, TrainState, cosine_with_warmup, data_seed,
                             flops_per_sample_transformer, get_by_path, init_tracking, keep_trainable_only,
                             list_checkpoints, load_recipe, log_line,
                             measure_forward_flops, move_to, peak_flops, peak_header, progress_bar, resume_from_checkpoint,
                             save_checkpoint, save_recipe, setup_accelerator)

from training.recipe_schema import defaults as schema_defaults  # noqa: E402
DEFAULT_RECIPE = schema_defaults("clip")   # every key at its default: the schema is the one place (training/recipe_schema.py)


def with_defaults(recipe: dict) -> dict:
    out = json.loads(json.dumps(DEFAULT_RECIPE))
    for k, v in recipe.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- model

def build_model(recipe: dict, log=print):
    """(model, train transform, eval transform, tokenizer, model_cfg) with the trainable parts set.
    The towers come from `text.from` / `vision.from` (see `training/towers.py`); where each
    one's weights came from is logged and kept in `model.tower_provenance`."""
    from training.towers import compose
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


# ---------------------------------------------------------------- data

@contextlib.contextmanager
def preserved_rng():
    """Run something (skipping batches) without moving the RNGs the training loop draws from."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0]); np.random.set_state(states[1]); torch.set_rng_state(states[2])


class SeededAugment:
    """The train transform, its random crops drawn from a stream of its own: the n-th image of
    a loader (per worker) is augmented with RNGs seeded from (seed, rank, worker, n), and the
    global RNGs are left untouched. The data then depends only on (seed, epoch, position),
    not on what the model drew from the RNGs in between - what an exact resume needs."""

    def __init__(self, transform, seed: int, rank: int = 0):
        self.transform, self.seed, self.rank, self.count = transform, seed, rank, 0

    def __call__(self, image):
        info = torch.utils.data.get_worker_info()
        s = hash((self.seed, self.rank, info.id if info else 0, self.count)) % (2 ** 31)
        self.count += 1
        with preserved_rng():
            random.seed(s)
            np.random.seed(s)
            torch.default_generator.manual_seed(s)   # the CPU generator only (CUDA's is the model's)
            return self.transform(image)


def train_loader(recipe, preprocess, tokenizer, accelerator, seed: int, cached: bool):
    """This process's share of an epoch (make_loader splits by rank itself: never `prepare()` it)."""
    from open_clip_cxr.data.loader import make_loader
    d = recipe["data"]
    preprocess = SeededAugment(preprocess, seed, accelerator.process_index)
    return make_loader(d["train"], preprocess=preprocess, tokenizer=None if cached else tokenizer,
                       batch_size=d["batch_size"], train=True, text_choice=d["text_choice"],
                       num_workers=d["num_workers"], shuffle_buffer=d["shuffle_buffer"], seed=seed,
                       world_size=accelerator.num_processes, rank=accelerator.process_index,
                       epoch_samples=d["epoch_samples"], return_keys=True)


def epoch_batches(recipe, preprocess, tokenizer, accelerator, epoch: int, done_micro: int, cached: bool):
    """Iterator over this process's micro-batches of `epoch`, after the `done_micro` already trained.

    Each epoch is a fresh stream seeded from (seed, epoch). On resume mid-epoch, `data.resume`
    picks how the position is restored: "skip" replays the epoch's stream and drops the
    batches already trained on (exact; costs their decoding), "reseed" starts a new stream
    seeded from (seed, epoch, step) (no replay, no cost; the default for large WebDatasets)."""
    skip, seed = 0, data_seed(recipe["seed"], epoch, 0)
    if done_micro and recipe["data"]["resume"] == "skip":
        skip = done_micro
    elif done_micro:
        seed = data_seed(recipe["seed"], epoch, done_micro)
    loader = train_loader(recipe, preprocess, tokenizer, accelerator, seed, cached)
    if not skip:
        return iter(loader)
    # Opening the loader (DataLoader draws a base seed) and the skipped batches' augmentations
    # must not move the RNGs that the checkpoint restored: the next batch then matches exactly.
    with preserved_rng():
        it = iter(loader)
        for _ in range(skip):
            next(it)
    return it


# ---------------------------------------------------------------- validation

@torch.no_grad()
def validate(accelerator, model, preprocess, tokenizer, urls, batch_size: int) -> dict:
    """Study-level image->report and report->image R@1/5/10, on the main process."""
    from open_clip_cxr.data.loader import SampleSource
    from open_clip_cxr.eval.encode import embed_shards
    from open_clip_cxr.eval.retrieval import recall_at_k
    from accelerate.utils import DistributedType
    out = {}
    # FSDP shards the weights: every rank must run the same forwards (each embeds the whole set)
    everyone = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.is_main_process or everyone:
        was_training = model.training
        model.eval()
        with accelerator.autocast():
            emb = embed_shards(model, preprocess, tokenizer, urls, batch_size=batch_size, device=accelerator.device,
                               progress=False, source=SampleSource(urls, preprocess=preprocess, world_size=1, rank=0))
        model.train(was_training)
        r = recall_at_k(emb.image_emb.float(), emb.image_study_ids, emb.text_emb.float(), emb.text_study_ids)
        out = {f"val/i2t_{k}": v for k, v in r["image_to_text"].items()}
        out.update({f"val/t2i_{k}": v for k, v in r["text_to_image"].items()})
        out["val/mean_recall"] = r["mean_recall"]
    accelerator.wait_for_everyone()
    return out if accelerator.is_main_process else {}


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


# ---------------------------------------------------------------- the training loop

def train(recipe: dict) -> dict:
    from training.recipe_check import check_before_work   # refused recipes and data leave no run folder
    recipe = with_defaults(check_before_work(recipe, "clip"))
    r_train, out_dir = recipe["train"], recipe["output_dir"]
    accelerator = setup_accelerator(recipe)                                   # 1. accelerator
    main = accelerator.is_main_process
    if main:
        os.makedirs(out_dir, exist_ok=True)
        save_recipe(recipe, os.path.join(out_dir, "recipe.yaml"), defaults=DEFAULT_RECIPE)
    init_tracking(accelerator, recipe, "clip_stage")

    model, pre_train, pre_val, tokenizer, model_cfg = build_model(recipe, log=accelerator.print)   # 2. model
    weights = {k: v["desc"] for k, v in model.tower_provenance.items()}      # where each tower's weights came from
    cached = bool(recipe["text"]["cached"])
    lookup = None
    if cached:
        cache_dir = recipe["text"]["cache_dir"] or os.path.join(out_dir, "text_cache")
        if main:
            model.to(accelerator.device)
            cached_text.build_text_cache(model, tokenizer, recipe["data"]["train"], cache_dir,
                                         batch_size=r_train["val_batch_size"], device=accelerator.device,
                                         autocast=accelerator.autocast, fingerprint={"model": recipe["model"],
                                                                        "text_from": recipe["text"]["from"]})
        accelerator.wait_for_everyone()
        lookup = cached_text.TextFeatureCache(cache_dir)

    fsdp2 = is_fsdp2(accelerator)
    if not fsdp2:
        model.to(accelerator.device)   # as `prepare` would; FSDP2 shards from where the model is
    # counted before `prepare` (whose FSDP2 shards cannot run a forward outside the wrapper)
    vision_flops, text_flops = train_flops(model, recipe, next(model.parameters()).device, model.visual.image_size[0])
    cast = frozen_base_cast(model, recipe, accelerator)
    if cast.n_cast:
        accelerator.print(f"frozen text base in {accelerator.mixed_precision}: {cast.n_cast / 1e6:.1f}M weights")
    if r_train["compile"]:
        accelerator.print(f"compiling {compile_blocks(transformer_blocks(model, cached), r_train['compile'])} "
                          f"blocks (torch.compile, one block at a time)")
    if fsdp2:
        scalars_to_1d(model)
    optimizer = torch.optim.AdamW(param_groups(model, recipe), betas=tuple(recipe["optim"]["betas"]),
                                  eps=recipe["optim"]["eps"])                 # 3. optimiser + schedule
    if accelerator.state.deepspeed_plugin is not None:   # no prepared DataLoader to read it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            recipe["data"]["batch_size"]
    net, optimizer = accelerator.prepare(ContrastiveModel(model, cached), optimizer)
    clip = accelerator.unwrap_model(net).clip
    if fsdp2:
        shard_ready(net)
    loss_fn = build_loss(recipe, accelerator)

    probe = train_loader(recipe, pre_train, tokenizer, accelerator, recipe["seed"], cached)
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = max(1, probe.num_batches // accum)
    total = r_train["max_steps"] or steps_per_epoch * r_train["epochs"]
    epochs = math.ceil(total / steps_per_epoch)
    scheduler = cosine_with_warmup(optimizer, recipe["schedule"]["warmup_steps"], total,
                                   recipe["schedule"]["min_lr_ratio"])

    state = TrainState()                                                      # 4. checkpoint / resume
    accelerator.register_for_checkpointing(scheduler, state)
    if r_train["trainable_only_checkpoints"]:
        keep_trainable_only(accelerator)
    resume = r_train["resume"]
    if resume not in (None, False, "none", "no"):
        resume_from_checkpoint(accelerator, out_dir, state, None if resume == "auto" else resume,
                               strict=not r_train["trainable_only_checkpoints"])

    peak = peak_flops(accelerator.device, accelerator.mixed_precision if accelerator.mixed_precision != "no"
                      else torch.float32) * accelerator.num_processes
    meter = Throughput(flops_per_sample=vision_flops, flops_per_token=text_flops, peak=peak)
    accelerator.print(peak_header(accelerator.device, accelerator.mixed_precision, accelerator.num_processes))
    pad_id = clip.text.config.pad_token_id
    metrics = MetricsWriter(os.path.join(out_dir, "metrics.jsonl"), enabled=main)
    bar = progress_bar(total, initial=state.step, disable=not main)
    accelerator.print(f"steps {total} ({steps_per_epoch}/epoch, {epochs} epochs), "
                      f"batch {recipe['data']['batch_size']}x{accelerator.num_processes}x{accum}, "
                      f"vision {vision_flops / 1e9:.2f} GFLOP/img, text {text_flops / 1e6:.2f} MFLOP/token")

    final, loss_sum, loss_n = {}, torch.zeros((), device=accelerator.device), 0
    t0, paused = time.perf_counter(), 0.0
    net.train()
    while state.epoch < epochs and state.step < total:                      # 5. steps
        batches = epoch_batches(recipe, pre_train, tokenizer, accelerator, state.epoch,
                                state.step_in_epoch * accum, cached)
        for images, text, keys in batches:
            if state.step_in_epoch >= steps_per_epoch:
                break
            text = lookup(keys) if cached else text
            # counted on the host: `int()` of a GPU tensor would stall the queue of kernels every step
            n_tokens = 0 if cached else int((text != pad_id).sum())   # this rank's; x processes below
            images, text = move_to((images, text), accelerator.device)
            with accelerator.accumulate(net):
                loss = compute_loss(loss_fn, net(images, text))
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe["optim"]["grad_clip"]:
                    accelerator.clip_grad_norm_(net.parameters(), recipe["optim"]["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_n += 1
            meter.update(images.shape[0] * accelerator.num_processes, n_tokens * accelerator.num_processes,
                         steps=int(accelerator.sync_gradients))
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]   # the rate this step used
            scheduler.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            state.step += 1
            state.step_in_epoch += 1
            state.samples_seen += images.shape[0] * accelerator.num_processes * accum
            bar.update(1)

            if state.step % r_train["log_every"] == 0 or state.step == total:
                loss_avg = accelerator.reduce(loss_sum, "mean").item() / loss_n
                dt, t0, paused = time.perf_counter() - t0 - paused, time.perf_counter(), 0.0
                speed = meter.stats(dt)
                rec = {"step": state.step, "epoch": state.epoch, "loss": loss_avg, "lr": lr,
                       **speed, "logit_scale": full_value(clip.logit_scale).exp().item(), "samples_seen": state.samples_seen}
                if main:
                    log_line(state.step, {k: v for k, v in rec.items() if k not in ("step", "samples_seen")})
                    metrics.write(rec)
                lrs = {f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}
                accelerator.log({"train/loss": loss_avg, **{f"train/{k}": v for k, v in speed.items()}, **lrs},
                                step=state.step)
                final.update(loss=loss_avg)
                loss_sum.zero_()
                loss_n = 0
            if state.step % r_train["checkpoint_every"] == 0 or state.step == total:
                t_save = time.perf_counter()
                save_checkpoint(accelerator, out_dir, state, keep_last=r_train["keep_last"])
                paused += time.perf_counter() - t_save   # rates exclude checkpointing and validation
            if r_train["stop_after"] and state.step >= r_train["stop_after"]:   # a planned interruption
                bar.close()
                accelerator.end_training()
                return {"stopped_at": state.step, **final}
            if state.step >= total:
                break
        else:
            if state.step_in_epoch < steps_per_epoch:
                raise RuntimeError(f"the training stream ended after {state.step_in_epoch} steps")

        state.epoch += 1                                                         # 6. epoch end
        state.step_in_epoch = 0
        if recipe["data"]["val"]:
            t_val = time.perf_counter()
            val = validate(accelerator, net if fsdp2 else clip, pre_val, tokenizer, recipe["data"]["val"], r_train["val_batch_size"])
            if main:
                print("validation: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in val.items()), flush=True)
                metrics.write({"step": state.step, "epoch": state.epoch, **val})
            accelerator.log(val, step=state.step)
            final.update(val)
            paused += time.perf_counter() - t_val
    bar.close()

    if not any(p.endswith(f"-{state.step}") for p in list_checkpoints(out_dir)):
        save_checkpoint(accelerator, out_dir, state, keep_last=r_train["keep_last"])
    if r_train["export"]:                                                      # export
        from accelerate.utils import DistributedType
        from conversion.export import export_folder
        if accelerator.distributed_type == DistributedType.FSDP:   # gather the shards (all ranks), rebuild
            full = accelerator.get_state_dict(net)
            if main:
                clip = build_model(recipe, log=lambda *_: None)[0]
                load_full_state_dict(clip, full)
    if r_train["export"] and main:
        cast.restore()   # the exact fp32 base, not its bf16 copy
        if recipe["vision"]["mode"] == "lora":
            merge_vision_lora(clip)
        clip.to("cpu").float()
        final["export_dir"] = str(export_folder(clip, model_cfg, tokenizer, os.path.join(out_dir, "export")))
        write_provenance(final["export_dir"], export_provenance(model.tower_provenance, recipe))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    final.update(step=state.step, epoch=state.epoch, samples_seen=state.samples_seen, weights=weights)
    if main:
        with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
    return final


# ---------------------------------------------------------------- CLI

from training.clip_cli import add_arguments  # noqa: E402,F401  (the flags live there, free of torch: a fast --help)


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe["output_dir"] = args.output_dir
    if args.max_steps:
        recipe.setdefault("train", {})["max_steps"] = args.max_steps
    if not get_by_path(recipe, "data.train"):
        raise SystemExit("the recipe names no training shards: --set data.train=DIR/train-{000000..000009}.tar")
    final = train(recipe)
    print(json.dumps(final, indent=2))
    return 0
