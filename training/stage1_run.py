"""What the parts of stage 1 share: the run (`Stage1Run`) and `run_stage`, which hands one
part's model, batches and loss to the shared step loop (`training/loop.py`)."""
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from open_clip_cxr_train.checkpoints import TrainState
from open_clip_cxr_train.logs import MetricsWriter
from open_clip_cxr_train.loop import Cadence, Loop, resume
from open_clip_cxr_train.schedule import cosine_with_warmup


@dataclass
class Stage1Run:
    """What every part of stage 1 reads: the run's accelerator, recipe, state and data."""
    accelerator: object
    recipe: dict
    state: TrainState
    writer: MetricsWriter
    out: Path
    model: object
    tokenizer: object
    reports: list
    low: Optional[torch.dtype]            # the steps' low precision (None: fp32)
    frozen_dtype: Optional[torch.dtype]   # the frozen weights' storage dtype
    summary: dict = field(default_factory=dict)
    model_cfg: Optional[dict] = None
    preprocess_cfg: Optional[dict] = None

    def __post_init__(self):
        self.tower = self.model.text.transformer
        self.pad = self.tower.config.pad_token_id
        self.seed = int(self.recipe.get("seed", 0))
        self.max_length = int(self.recipe.get("max_length", 128))
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index


def run_stage(run: Stage1Run, name, module, param_groups, cfg, start_step, make_batch, step_fn, tokens_flops,
              average=None):
    """Optimise `module` for cfg['steps'] steps after global step `start_step` in the shared loop
    (`training/loop.py`); checkpoints under OUT/work/<name>. `make_batch(micro)` -> batch;
    `step_fn(module, batch)` -> (loss, samples, tokens); `average` (a `WeightAverage`, checkpointed
    with the run) is updated after each optimiser step. Returns the unwrapped module."""
    acc, state, train_cfg = run.accelerator, run.state, run.recipe["train"]
    work, steps = os.path.join(run.recipe["output_dir"], "work", name), int(cfg["steps"])
    param_groups = [g for g in param_groups if g["params"]]    # e.g. no LoRA group when only the pooler trains
    optimizer = torch.optim.AdamW(param_groups, weight_decay=float(cfg.get("weight_decay", 0.0)), betas=(0.9, 0.98))
    scheduler = cosine_with_warmup(optimizer, int(cfg.get("warmup_steps", 0)), steps,
                                   float(cfg.get("min_lr_ratio", 0.1)))
    n_train = sum(p.numel() for g in param_groups for p in g["params"])
    acc.print(f"{name}: {steps} steps, {n_train:,} trainable parameters")
    module, optimizer = acc.prepare(module, optimizer)
    if average is not None:
        acc.register_for_checkpointing(average)
    if resume(acc, state, work, run.writer, start_step + steps, strict=False):
        with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(state.step - start_step):   # the schedule is a pure function of the step
                scheduler.step()
    loop = Loop(acc, state, module, optimizer, scheduler, step_fn,
                Cadence.from_recipe(train_cfg, cfg.get("grad_clip", 1.0), keep_last=1),
                name=name, ckpt_dir=work, final_step=start_step + steps, writer=run.writer,
                flops_per_token=tokens_flops, every_step=True, bar_total=steps, bar_start=state.step - start_step,
                extras=lambda lrs: {"lr_head": lrs[-1]} if len(lrs) > 1 else {},
                after_step=average.update if average is not None else None)
    first = (state.step - start_step) * acc.gradient_accumulation_steps
    loop.run((make_batch(m) for m in range(first, 1 << 62)), start_step + steps)
    loop.close()
    module = acc.unwrap_model(module)
    acc.free_memory()
    return module
