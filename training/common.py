"""Training infrastructure shared by the text stage and the CLIP stage.

Everything a training script needs besides its model and loss, as small visible pieces:

    recipe = load_recipe("training/recipes/clip-cxr-llm-small-cpu.yaml", ["optim.lr=1e-4"])
    accelerator = setup_accelerator(recipe)            # mixed precision, grad accumulation, trackers, seed
    scheduler = cosine_with_warmup(optimizer, warmup_steps=100, total_steps=10_000)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)   # (scheduler not passed to prepare())
    resume_from_checkpoint(accelerator, out_dir, state)         # -> True if it resumed
    ...
    save_checkpoint(accelerator, out_dir, state, keep_last=2)

Recipe keys read here (all optional; each also accepted at the top level):
    seed: 0
    output_dir: runs/x
    train.mixed_precision: auto | fp32 | bf16 | fp16   (auto: measured, `open_clip_cxr/precision.py`;
                                       OPEN_CLIP_CXR_PRECISION overrides; "no" = fp32)
    train.grad_accum_steps: 1          (alias gradient_accumulation_steps)
    train.log_with: tensorboard        ("none"/null to disable, or a list)
    train.cpu: false                   (force the CPU even when a GPU is there)
    train.num_threads: null            (torch CPU threads: an int, auto = 1 vs all cores measured, null = torch's)

Throughput and MFU (nanoGPT's definition): achieved model FLOPs per second divided by the
hardware's peak. The training FLOPs of a transformer are estimated as 6 * N * tokens (2 for
the forward multiply-adds, 4 for the backward), N = parameters that take part in the matmuls;
with a frozen base (LoRA) the backward still computes activation gradients through the
frozen weights (2 of the 4), so 4 * N_frozen + 6 * N_trainable is the honest count:
`flops_per_sample_transformer(n_params, tokens, n_trainable=...)`. For the vision tower
(convolutions, attention over patches) a measured forward count is better:
`measure_forward_flops(model.visual, one_image)` with torch's FlopCounterMode, times 3 for a
fully trained tower (forward + 2x backward).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

import torch
import yaml

# ---------------------------------------------------------------- recipes
# recipe I/O lives in `training/recipe_io.py` (free of torch); re-exported for existing callers
from .recipe_io import (RESUMABLE_KEYS, _deep_merge, _Loader, _opt, _resumable, flatten,  # noqa: E402,F401
                        get_by_path, load_recipe, parse_value, recipe_differences, save_recipe, set_by_path)


# ---------------------------------------------------------------- accelerator

def setup_accelerator(recipe: dict):
    """An `Accelerator` configured from the recipe (see the module docstring for the keys)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    if hasattr(sys.stdout, "reconfigure"):
        # logs redirected to a file (nohup, a cluster's job log) appear line by line, not in 8 kB blocks
        sys.stdout.reconfigure(line_buffering=True)
    out_dir = _opt(recipe, "output_dir", default="runs/default")
    choice, threads, threads_why = _resolve_precision(recipe)
    mixed = choice.mixed_precision
    accum = int(_opt(recipe, "train.grad_accum_steps", "train.gradient_accumulation_steps",
                     "gradient_accumulation_steps", default=1))
    # an explicit `log_with: null` means no tracker (`_opt` would read it as unset: TensorBoard)
    log_with = get_by_path(recipe, "train.log_with", get_by_path(recipe, "log_with", "tensorboard"))
    if log_with in ("none", "None", False, "", []):
        log_with = None
    cpu = bool(_opt(recipe, "train.cpu", "cpu", default=False))
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=accum,
        log_with=log_with,
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=out_dir, logging_dir=os.path.join(out_dir, "logs")),
    )
    accelerator.precision_choice = choice
    accelerator.print(f"{choice.line()}; threads {threads} ({threads_why})")
    set_seed(int(_opt(recipe, "seed", default=0)))
    return accelerator


def _resolve_precision(recipe: dict):
    """`train.mixed_precision` (default auto) and `train.num_threads` (auto, an int, or null)
    resolved by `open_clip_cxr.precision` (measured, cached per process); torch's threads set.
    The outcome goes into the recipe as `resolved:` (saved with the run, free to differ on a
    resume: it is what this machine measured, not what is learned)."""
    from open_clip_cxr import precision
    cpu = bool(_opt(recipe, "train.cpu", "cpu", default=False)) or not torch.cuda.is_available()
    value = get_by_path(recipe, "train.mixed_precision")
    value = value if value is not None else recipe.get("mixed_precision", "auto")
    threads = _opt(recipe, "train.num_threads", "num_threads")
    choice, n, why = precision.resolve(value, threads, "cpu" if cpu else "cuda")
    if cpu and choice.requested == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        PartialState(cpu=True)                 # the process group the Accelerator will use
        choice = precision.agree(choice)       # one precision on every process
    recipe["resolved"] = {**choice.record(), "threads_reason": why}
    return choice, n, why


def reset_accelerator_state() -> None:
    """Forget the process-wide accelerate state so another `Accelerator` (other mixed precision)
    can be made in the same process: tests, notebooks, benchmarks. Not under `accelerate launch`."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def init_tracking(accelerator, recipe: dict, project_name: str) -> None:
    """Start the accelerate trackers (if any) with the flattened recipe as hyper-parameters."""
    if accelerator.log_with:
        accelerator.init_trackers(project_name, config=flatten(recipe))


# ---------------------------------------------------------------- schedule

def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine down to
    `min_lr_ratio * lr` at `total_steps` (held there afterwards). One `.step()` per optimiser step."""
    warmup_steps, total_steps = int(warmup_steps), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- state and checkpoints

class TrainState:
    """Counters that must survive a restart; register with `accelerator.register_for_checkpointing`."""

    def __init__(self, step: int = 0, epoch: int = 0, samples_seen: int = 0, best_metric: Optional[float] = None):
        self.step, self.epoch, self.samples_seen, self.best_metric = step, epoch, samples_seen, best_metric
        self.step_in_epoch = 0  # optimiser steps taken in the current epoch

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "best_metric": self.best_metric, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.epoch = int(sd["step"]), int(sd["epoch"])
        self.samples_seen, self.best_metric = int(sd["samples_seen"]), sd.get("best_metric")
        self.step_in_epoch = int(sd.get("step_in_epoch", 0))

    def __repr__(self):
        return f"TrainState({self.state_dict()})"


CKPT_PREFIX = "checkpoint-"
_DONE = "COMPLETE"


def list_checkpoints(out_dir: str) -> list:
    """Complete checkpoints under `out_dir/checkpoints`, oldest first (by step)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = re.fullmatch(CKPT_PREFIX + r"(\d+)", name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, _DONE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, out_dir: str, state: TrainState, keep_last: int = 2) -> str:
    """`accelerator.save_state` (model, optimiser, registered scheduler and TrainState, RNG
    states of every process, grad scaler) into `checkpoints/checkpoint-<step>`.

    Written to `checkpoint-<step>.tmp` and renamed when whole (with a COMPLETE marker), so a
    run killed mid-save leaves the previous checkpoint as the latest. Keeps the last `keep_last`."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"{CKPT_PREFIX}{state.step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, _DONE), "w") as f:
            json.dump(state.state_dict(), f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last and keep_last > 0:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_from_checkpoint(accelerator, out_dir: str, state: TrainState, path: Optional[str] = None,
                           strict: bool = True) -> bool:
    """Load the latest complete checkpoint (or `path`) into the prepared objects and `state`.
    Returns False when there is none (a fresh run). `strict=False` for checkpoints that hold
    only the trained parameters (`keep_trainable_only`)."""
    if path is None:
        ckpts = list_checkpoints(out_dir)
        if not ckpts:
            return False
        path = ckpts[-1]
    with _safe_custom_state():
        accelerator.load_state(path, strict=strict)
    accelerator.print(f"resumed from {path}: {state}")
    return True


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds more than tensors and plain values; loading it could run code."""


def load_custom_state_safely(obj, path: str, index: int = 0) -> None:
    """accelerate's `load_custom_state`, but with `torch.load(weights_only=True)`: accelerate
    itself unpickles `custom_checkpoint_*.pkl` with `weights_only=False`, so a crafted checkpoint
    folder could run code on resume. Our registered states (scheduler, `TrainState`) are plain
    numbers and lists, which the restricted unpickler reads."""
    file = os.path.join(path, f"custom_checkpoint_{index}.pkl")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise UnsafeCheckpointError(
            f"refusing to resume from {file}: it is not plain tensors and numbers "
            f"(torch.load(weights_only=True) failed: {str(e).splitlines()[0][:200]}); delete that checkpoint "
            "folder or start a new run with another --output-dir") from None
    obj.load_state_dict(sd)


class _safe_custom_state:
    """Swap accelerate's unrestricted custom-state loader for `load_custom_state_safely` while
    `load_state` runs (accelerate's own model, optimiser and RNG loads already use weights_only)."""

    def __enter__(self):
        import accelerate.accelerator as acc
        self._module, self._saved = acc, acc.load_custom_state
        acc.load_custom_state = load_custom_state_safely

    def __exit__(self, *exc):
        self._module.load_custom_state = self._saved
        return False


def keep_trainable_only(accelerator) -> None:
    """Make `save_state` store only the parameters that train (and every buffer), not frozen
    base weights (an 8B-parameter frozen LLM would be 16 GB per checkpoint). The frozen
    weights are rebuilt from the recipe's model on resume; load with `strict=False`."""
    def hook(models, weights, output_dir):
        for model, sd in zip(models, weights):
            named = dict(accelerator.unwrap_model(model).named_parameters())
            for key in list(sd):
                name = key[len("module."):] if key.startswith("module.") else key
                if name in named and not named[name].requires_grad:
                    del sd[key]
    accelerator.register_save_state_pre_hook(hook)


def data_seed(seed: int, epoch: int, step: int = 0) -> int:
    """Seed for the data stream of a (re)started epoch: WebDataset streams cannot seek, so a
    run resumed at (epoch, step) draws a fresh, reproducible stream instead of replaying the
    batches the interrupted run already saw. A fresh epoch 0 at step 0 uses `seed` itself."""
    if epoch == 0 and step == 0:
        return int(seed)
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(step)) % (2 ** 31 - 1)


# ---------------------------------------------------------------- throughput / MFU

def flops_per_sample_transformer(n_params: int, tokens: int, n_trainable: Optional[int] = None) -> float:
    """Training FLOPs of one sample through a transformer of `n_params` matmul parameters.

    6 * N * tokens (forward 2N, backward 4N per token; attention's own T^2 term ignored, as in
    the PaLM/nanoGPT estimate). If `n_trainable` is given, the frozen part only pays for the
    forward and the activation gradients: 4 * (N - n_trainable) + 6 * n_trainable per token."""
    if n_trainable is None:
        return 6.0 * n_params * tokens
    return (4.0 * (n_params - n_trainable) + 6.0 * n_trainable) * tokens


def measure_forward_flops(fn, *inputs, **kwargs) -> float:
    """FLOPs of one forward `fn(*inputs)`, counted by torch's FlopCounterMode (matmuls, convs,
    attention). Multiply by 3 for a trained module's forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs, **kwargs)
    return float(counter.get_total_flops())


# measured on the 2-core development CPU (AMD EPYC Zen 4, avx512_bf16; torch matmul 1024^2):
# only with measure=False, a quick guess; runs measure (`open_clip_cxr.precision.peak_flops`)
CPU_PEAK_DEFAULT = {"bf16": 890e9, "fp16": 890e9, "fp32": 210e9}


def precision_name(dtype) -> str:
    """torch dtype or accelerate value -> fp32 | bf16 | fp16."""
    from open_clip_cxr.precision import dtype_name
    return dtype_name(dtype)


_dtype_name = precision_name


def peak_flops(device, dtype=torch.float32, measure: bool = True, refresh: bool = False) -> float:
    """Peak dense FLOP/s of `device` for `dtype` (the dtype the run computes in): a table for
    known GPUs; on the CPU the `F.linear` rate at the text towers' widths and the current
    thread count, measured once per process (`open_clip_cxr.precision.peak_flops`), or
    `CPU_PEAK_DEFAULT` with measure=False. Call it before the steps, never inside one."""
    from open_clip_cxr import precision
    device = torch.device(device)
    if device.type == "cpu" and not measure:
        return CPU_PEAK_DEFAULT.get(_dtype_name(dtype), CPU_PEAK_DEFAULT["fp32"])
    return precision.peak_flops(device, dtype, refresh=refresh)


def peak_header(device, dtype, num_processes: int = 1) -> str:
    """The log header's peak line: what MFU is measured against."""
    from open_clip_cxr.precision import MODEL_SHAPE
    device = torch.device(device)
    name = _dtype_name(dtype)
    how = (f"F.linear x{MODEL_SHAPE[1]}->{MODEL_SHAPE[2]} measured, {torch.get_num_threads()} thread(s)"
           if device.type == "cpu" else f"table, {torch.cuda.get_device_name(device)}")
    total = peak_flops(device, dtype) * num_processes
    procs = f", x{num_processes} processes" if num_processes > 1 else ""
    return f"MFU peak {total / 1e9:.1f} GFLOP/s {name} ({how}{procs})"


class Throughput:
    """Counts samples, tokens and optimiser steps between log lines; `stats(elapsed)` gives rates.

    Model FLOPs = flops_per_sample * samples + flops_per_token * tokens (see
    `flops_per_sample_transformer`, `measure_forward_flops`); peak: the hardware's FLOP/s
    summed over all processes. MFU% = achieved model FLOP/s / peak * 100."""

    def __init__(self, flops_per_sample: float = 0.0, peak: float = 0.0, flops_per_token: float = 0.0):
        self.flops_per_sample, self.flops_per_token, self.peak = flops_per_sample, flops_per_token, peak
        self.samples = self.tokens = self.steps = 0

    def update(self, samples: int, tokens: int = 0, steps: int = 1) -> None:
        self.samples += int(samples)
        self.tokens += int(tokens)
        self.steps += int(steps)

    def stats(self, elapsed: float) -> dict:
        """Rates over `elapsed` seconds (wall time since the last `stats`); resets the counts."""
        elapsed = max(elapsed, 1e-9)
        flops = self.flops_per_sample * self.samples + self.flops_per_token * self.tokens
        out = {
            "ms_per_step": 1000.0 * elapsed / max(1, self.steps),
            "samples_per_s": self.samples / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "mfu": 100.0 * flops / elapsed / self.peak if self.peak else 0.0,
        }
        self.samples = self.tokens = self.steps = 0
        return out


# ---------------------------------------------------------------- logging

def log_line(step: int, metrics: dict, file=None) -> str:
    """nanoGPT-style: `iter 120: loss 2.3456, lr 1.00e-04, 812.3ms/step, 39.4 samples/s, ... mfu 12.34%`."""
    parts = [f"iter {step}"]
    fmt = {
        "loss": lambda v: f"loss {v:.4f}",
        "lr": lambda v: f"lr {v:.2e}",
        "ms_per_step": lambda v: f"{v:.1f}ms/step",
        "samples_per_s": lambda v: f"{v:.1f} samples/s",
        "tokens_per_s": lambda v: f"{v:.0f} tokens/s",
        "mfu": lambda v: f"mfu {v:.2f}%",
    }
    for k in ("loss", "lr", "ms_per_step", "samples_per_s", "tokens_per_s", "mfu"):
        if k in metrics and metrics[k] is not None:
            parts.append(fmt[k](float(metrics[k])))
    for k, v in metrics.items():
        if k not in fmt and isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    line = parts[0] + ": " + ", ".join(parts[1:])
    print(line, file=file or sys.stdout, flush=True)
    return line


def progress_bar(total: int, initial: int = 0, disable: bool = False, desc: str = "train"):
    """A tqdm bar over optimiser steps (disabled off the main process, or when not a TTY)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty(), leave=False)


class MetricsWriter:
    """Append one JSON object per line (`metrics.jsonl`), main process only."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def unwrap(accelerator, model):
    return accelerator.unwrap_model(model)


def move_to(batch, device):
    """Tensors (also inside tuples/lists/dicts) to `device`; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch
