"""Two ways to make a training step cheaper without changing what it computes (much):

- `FrozenCast`: keep the frozen decoder weights in the autocast dtype. Under autocast every
  frozen Linear would otherwise be re-cast from fp32 at every call (1.2B weights a step for
  `cxr-llm`, a third of the CPU time of stage 1); on a GPU the fp32 masters move to host
  memory, which halves what the frozen base takes there.
- `compile_blocks`: regional `torch.compile`, one transformer block at a time.

Recipes switch them on with `train.frozen_low_precision` (both stages) and `train.compile`
(the CLIP stage only: stage 1's length-sorted chunks change shape at nearly every call, and each
new shape is a new compilation); `bench/gpu_cxr_llm.py` times both.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn as nn


def low_precision_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in under accelerate's `mixed_precision` ("no": None)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


class FrozenCast:
    """Store `tower.llm`'s frozen floating-point weights in `dtype` (None: do nothing).

    The fp32 originals are kept as masters, so `restore()` gives back exact weights before a
    LoRA merge or an export. `masters_device="cpu"` parks them in host memory: on a GPU the
    tower then holds only the low-precision copy."""

    def __init__(self, tower, dtype: Optional[torch.dtype], masters_device: Union[str, torch.device, None] = None):
        self.masters = {}
        if dtype is None:
            return
        for p in tower.llm.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                self.masters[p] = p.data if masters_device is None else p.data.to(masters_device)
                p.data = p.data.to(dtype)

    @property
    def n_cast(self) -> int:
        return sum(p.numel() for p in self.masters)

    def restore(self):
        for p, data in self.masters.items():
            p.data = data.to(p.device)
        self.masters = {}


def compile_blocks(blocks: Iterable[nn.Module], options: Union[bool, dict, None]) -> int:
    """Compile each block in place (`nn.Module.compile`); returns how many were compiled.

    Why per block: identical blocks share one graph, so compiling takes seconds to a minute,
    not many minutes for a whole 1.6B model; the data-dependent code around the blocks (padding
    trims, pooling masks, the loss gather) stays eager instead of breaking the graph; and
    in-place compilation keeps the state-dict keys, so checkpoints load compiled or not.
    `options`: True, or a dict of `torch.compile` arguments (e.g. {"mode": "max-autotune"})."""
    if not options:
        return 0
    blocks = list(blocks)
    for block in blocks:
        block.compile(**({} if options is True else dict(options)))
    return len(blocks)
