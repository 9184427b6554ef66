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
 5. steps: forward, ClipLoss/SigLipLoss across processes (`clip_step`), in the shared loop
    (`training/loop.py`: backward, clip, step, logs, checkpoints)
 6. each epoch end: retrieval recall on the validation shards; at the end: export

The model pieces live in `training/clip_model.py`, the data in `training/clip_data.py`; their
names stay importable from here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch

from open_clip_cxr_train import cached_text
from open_clip_cxr_train.accel import check_precision_env, init_tracking, move_to, setup_accelerator
from open_clip_cxr_train.checkpoints import RunLock, TrainState, keep_trainable_only, list_checkpoints, save_checkpoint
from open_clip_cxr_train.common import get_by_path, load_recipe, save_recipe
from open_clip_cxr_train.logs import MetricsWriter
from open_clip_cxr_train.loop import Cadence, Loop, StopAfter, resume
from open_clip_cxr_train.schedule import cosine_with_warmup
from open_clip_cxr_train.speedups import compile_blocks
from open_clip_cxr_train.throughput import peak_header
from open_clip_cxr_train.towers import write_provenance
# the pieces, importable from here as before
from open_clip_cxr_train.clip_data import SeededAugment, epoch_batches, preserved_rng, train_loader, validate  # noqa: F401
from open_clip_cxr_train.clip_model import (SCALAR_PARAMS, ContrastiveModel, add_vision_lora, build_loss,  # noqa: F401
                                 build_model, compute_loss, configure_trainable, export_provenance,
                                 frozen_base_cast, full_value, is_fsdp2, load_full_state_dict, merge_vision_lora,
                                 param_groups, scalars_to_1d, shard_ready, train_flops, transformer_blocks)

from open_clip_cxr_train.recipe_schema import defaults as schema_defaults  # noqa: E402
DEFAULT_RECIPE = schema_defaults("clip")   # every key at its default: the schema is the one place (training/recipe_schema.py)


def with_defaults(recipe: dict) -> dict:
    out = json.loads(json.dumps(DEFAULT_RECIPE))
    for k, v in recipe.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out



# ---------------------------------------------------------------- the run's pieces

@dataclass
class ClipRun:
    """What the steps and the export read: the accelerator, the recipe, the model and its state."""
    accelerator: object
    recipe: dict
    model: object                   # the OpenCLIP model as built (its towers' provenance on it)
    pre_train: object
    pre_val: object
    tokenizer: object
    model_cfg: dict
    lookup: object = None           # cached text features by sample key (`text.cached`)
    flops: tuple = (0.0, 0.0)       # (per image, per text token)
    final: dict = field(default_factory=dict)


def clip_step(net, batch, *, loss_fn, lookup, pad_id: int, device):
    """(loss, images, text tokens) of one micro-batch: both encoders, then ClipLoss/SigLipLoss."""
    images, text, keys = batch
    text = lookup(keys) if lookup is not None else text
    # counted on the host: `int()` of a GPU tensor would stall the queue of kernels every step
    n_tokens = 0 if lookup is not None else int((text != pad_id).sum())   # this rank's
    images, text = move_to((images, text), device)
    return compute_loss(loss_fn, net(images, text)), images.shape[0], n_tokens


def _text_cache(accelerator, recipe: dict, model, tokenizer):
    """`text.cached`: every training report through the frozen text tower once; the lookup."""
    out_dir = recipe["output_dir"]
    cache_dir = recipe["text"]["cache_dir"] or os.path.join(out_dir, "text_cache")
    if accelerator.is_main_process:
        model.to(accelerator.device)
        cached_text.build_text_cache(model, tokenizer, recipe["data"]["train"], cache_dir,
                                     batch_size=recipe["train"]["val_batch_size"], device=accelerator.device,
                                     autocast=accelerator.autocast, fingerprint={"model": recipe["model"],
                                                                                "text_from": recipe["text"]["from"]})
    accelerator.wait_for_everyone()
    return cached_text.TextFeatureCache(cache_dir)


def _build(accelerator, recipe: dict) -> ClipRun:
    """2. the model: towers, trainable parts, cached text, frozen base cast, compiled blocks."""
    model, pre_train, pre_val, tokenizer, model_cfg = build_model(recipe, log=accelerator.print)
    cached = bool(recipe["text"]["cached"])
    run = ClipRun(accelerator, recipe, model, pre_train, pre_val, tokenizer, model_cfg,
                  _text_cache(accelerator, recipe, model, tokenizer) if cached else None)
    if not is_fsdp2(accelerator):
        model.to(accelerator.device)   # as `prepare` would; FSDP2 shards from where the model is
    # counted before `prepare` (whose FSDP2 shards cannot run a forward outside the wrapper)
    run.flops = train_flops(model, recipe, next(model.parameters()).device, model.visual.image_size[0])
    run.cast = frozen_base_cast(model, recipe, accelerator)
    if run.cast.n_cast:
        accelerator.print(f"frozen text base in {accelerator.mixed_precision}: {run.cast.n_cast / 1e6:.1f}M weights")
    if recipe["train"]["compile"]:
        accelerator.print(f"compiling {compile_blocks(transformer_blocks(model, cached), recipe['train']['compile'])} "
                          f"blocks (torch.compile, one block at a time)")
    return run


def _prepare(run: ClipRun) -> None:
    """3. optimiser + schedule, the wrapped model; 4. checkpoint state and resume."""
    accelerator, recipe, model = run.accelerator, run.recipe, run.model
    fsdp2, r_train = is_fsdp2(accelerator), recipe["train"]
    if fsdp2:
        scalars_to_1d(model)
    optimizer = torch.optim.AdamW(param_groups(model, recipe), betas=tuple(recipe["optim"]["betas"]),
                                  eps=recipe["optim"]["eps"])
    if accelerator.state.deepspeed_plugin is not None:   # no prepared DataLoader to read it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            recipe["data"]["batch_size"]
    run.net, run.optimizer = accelerator.prepare(ContrastiveModel(model, run.lookup is not None), optimizer)
    run.clip = accelerator.unwrap_model(run.net).clip
    if fsdp2:
        shard_ready(run.net)
    probe = train_loader(recipe, run.pre_train, run.tokenizer, accelerator, recipe["seed"], run.lookup is not None)
    run.steps_per_epoch = max(1, probe.num_batches // accelerator.gradient_accumulation_steps)
    run.total = r_train["max_steps"] or run.steps_per_epoch * r_train["epochs"]
    run.epochs = math.ceil(run.total / run.steps_per_epoch)
    run.scheduler = cosine_with_warmup(run.optimizer, recipe["schedule"]["warmup_steps"], run.total,
                                       recipe["schedule"]["min_lr_ratio"])
    run.state = TrainState()
    accelerator.register_for_checkpointing(run.scheduler, run.state)
    if r_train["trainable_only_checkpoints"]:
        keep_trainable_only(accelerator)
    run.writer = MetricsWriter(os.path.join(recipe["output_dir"], "metrics.jsonl"), enabled=accelerator.is_main_process)
    how = r_train["resume"]
    if how not in (None, False, "none", "no"):
        resume(accelerator, run.state, recipe["output_dir"], run.writer, run.total,
               strict=not r_train["trainable_only_checkpoints"], path=None if how == "auto" else how)


def _loop(run: ClipRun) -> Loop:
    accelerator, recipe, clip, state = run.accelerator, run.recipe, run.clip, run.state

    def clamp_scale():
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))

    step = partial(clip_step, loss_fn=build_loss(recipe, accelerator), lookup=run.lookup,
                   pad_id=clip.text.config.pad_token_id, device=accelerator.device)
    loop = Loop(accelerator, state, run.net, run.optimizer, run.scheduler, step,
                Cadence.from_recipe(recipe["train"], recipe["optim"]["grad_clip"], recipe["train"]["keep_last"]),
                name="clip", ckpt_dir=recipe["output_dir"], final_step=run.total, writer=run.writer,
                flops_per_sample=run.flops[0], flops_per_token=run.flops[1], tracker="train", after_step=clamp_scale,
                extras=lambda lrs: {"epoch": state.epoch, "logit_scale": full_value(clip.logit_scale).exp().item(),
                                    "samples_seen": state.samples_seen},
                bar_total=run.total, bar_start=state.step)
    accelerator.print(peak_header(accelerator.device, accelerator.mixed_precision, accelerator.num_processes))
    accelerator.print(f"steps {run.total} ({run.steps_per_epoch}/epoch, {run.epochs} epochs), "
                      f"batch {recipe['data']['batch_size']}x{accelerator.num_processes}x"
                      f"{accelerator.gradient_accumulation_steps}, vision {run.flops[0] / 1e9:.2f} GFLOP/img, "
                      f"text {run.flops[1] / 1e6:.2f} MFLOP/token")
    return loop


def _epochs(run: ClipRun, loop: Loop) -> None:
    """5. the steps, epoch by epoch; 6. validation at each epoch end (not counted as step time)."""
    accelerator, recipe, state = run.accelerator, run.recipe, run.state
    accum, cached = accelerator.gradient_accumulation_steps, run.lookup is not None
    while state.epoch < run.epochs and state.step < run.total:
        batches = epoch_batches(recipe, run.pre_train, run.tokenizer, accelerator, state.epoch,
                                state.step_in_epoch * accum, cached)
        loop.run(batches, min(run.total, state.step + run.steps_per_epoch - state.step_in_epoch))
        if loop.last_loss is not None:
            run.final.update(loss=loop.last_loss)
        state.epoch += 1
        state.step_in_epoch = 0
        if recipe["data"]["val"]:
            with loop.paused():
                val = validate(accelerator, run.net if is_fsdp2(accelerator) else run.clip, run.pre_val,
                               run.tokenizer, recipe["data"]["val"], recipe["train"]["val_batch_size"])
                if accelerator.is_main_process:
                    print("validation: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in val.items()), flush=True)
                    run.writer.write({"step": state.step, "epoch": state.epoch, **val})
                accelerator.log(val, step=state.step)
                run.final.update(val)
    loop.close()


def _finish(run: ClipRun) -> dict:
    """The last checkpoint if the cadence missed it, the export (`train.export`), final_metrics.json."""
    accelerator, recipe, state, out_dir = run.accelerator, run.recipe, run.state, run.recipe["output_dir"]
    main, r_train, clip = accelerator.is_main_process, recipe["train"], run.clip
    if not any(p.endswith(f"-{state.step}") for p in list_checkpoints(out_dir)):
        save_checkpoint(accelerator, out_dir, state, keep_last=r_train["keep_last"])
    if r_train["export"]:
        from accelerate.utils import DistributedType
        from open_clip_cxr_convert.export import export_folder
        if accelerator.distributed_type == DistributedType.FSDP:   # gather the shards (all ranks), rebuild
            full = accelerator.get_state_dict(run.net)
            if main:
                clip = build_model(recipe, log=lambda *_: None)[0]
                load_full_state_dict(clip, full)
        if main:
            run.cast.restore()   # the exact fp32 base, not its bf16 copy
            if recipe["vision"]["mode"] == "lora":
                merge_vision_lora(clip)
            clip.to("cpu").float()
            run.final["export_dir"] = str(export_folder(clip, run.model_cfg, run.tokenizer,
                                                        os.path.join(out_dir, "export")))
            write_provenance(run.final["export_dir"], export_provenance(run.model.tower_provenance, recipe))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    run.final.update(step=state.step, epoch=state.epoch, samples_seen=state.samples_seen,
                     weights={k: v["desc"] for k, v in run.model.tower_provenance.items()})
    if main:
        with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
            json.dump(run.final, f, indent=2)
    return run.final


# ---------------------------------------------------------------- the stage

def train(recipe: dict) -> dict:
    """Run the CLIP stage per `recipe` (defaults: `DEFAULT_RECIPE`); returns the final metrics
    (`{"stopped_at": step, ...}` when `train.stop_after` ends it early)."""
    from open_clip_cxr_train.recipe_check import check_before_work   # refused recipes and data leave no run folder
    check_precision_env()
    recipe = with_defaults(check_before_work(recipe, "clip"))
    out_dir = recipe["output_dir"]
    accelerator = setup_accelerator(recipe)                                   # 1. accelerator
    with RunLock(out_dir, enabled=accelerator.is_main_process):
        if accelerator.is_main_process:
            os.makedirs(out_dir, exist_ok=True)
            save_recipe(recipe, os.path.join(out_dir, "recipe.yaml"), defaults=DEFAULT_RECIPE)
        init_tracking(accelerator, recipe, "clip_stage")
        run = _build(accelerator, recipe)                                     # 2. model
        _prepare(run)                                                         # 3., 4.
        loop = _loop(run)
        try:
            _epochs(run, loop)                                                # 5., 6.
        except StopAfter as stop:
            return {"stopped_at": stop.args[0], **run.final,
                    **({"loss": loop.last_loss} if loop.last_loss is not None else {})}
        return _finish(run)


# ---------------------------------------------------------------- CLI

from open_clip_cxr_train.clip_cli import add_arguments  # noqa: E402,F401  (the flags live there, free of torch: a fast --help)


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
