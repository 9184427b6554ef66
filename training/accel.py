"""Accelerator setup: mixed precision, gradient accumulation, trackers, seed, CPU threads.

    accelerator = setup_accelerator(recipe)   # refuses a bad OPEN_CLIP_CXR_PRECISION first (UsageError)
    init_tracking(accelerator, recipe, "text_stage")

Recipe keys read here (all optional; each also accepted at the top level):
    seed: 0
    output_dir: runs/x
    train.mixed_precision: auto | fp32 | bf16 | fp16   (auto: measured, `open_clip_cxr/precision.py`;
                                       OPEN_CLIP_CXR_PRECISION overrides; "no" = fp32)
    train.grad_accum_steps: 1          (alias gradient_accumulation_steps)
    train.log_with: tensorboard        ("none"/null to disable, or a list)
    train.cpu: false                   (force the CPU even when a GPU is there)
    train.num_threads: null            (torch CPU threads: an int, auto = 1 vs all cores measured, null = torch's)
"""
from __future__ import annotations

import os
import sys

import torch

from open_clip_cxr.errors import UsageError
from open_clip_cxr_train.common import _opt, flatten, get_by_path


def check_precision_env() -> None:
    """A bad `OPEN_CLIP_CXR_PRECISION` is the user's mistake: one line naming the variable and
    its values, before any work (it would otherwise surface as a traceback from deep inside)."""
    from open_clip_cxr import precision
    value = os.environ.get(precision.ENV, "").strip()
    if not value:
        return
    try:
        precision.normalize(value)
    except ValueError:
        raise UsageError(f"{precision.ENV}={value!r} is not a precision: set it to one of fp32|bf16|auto "
                         f"(or unset it to use the recipe's train.mixed_precision)") from None


def setup_accelerator(recipe: dict):
    """An `Accelerator` configured from the recipe (see the module docstring for the keys)."""
    check_precision_env()
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
