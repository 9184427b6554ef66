"""The learning-rate schedule both stages use."""
import math

import torch


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

