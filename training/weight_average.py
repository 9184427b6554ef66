"""An exponential moving average of the trainable weights (recipe key `supcon.ema_decay`).

The contrastive step ends on whichever batches came last; the average of the weights over the
last few hundred steps is a smoother point (less tied to the seed's batch order). After each
optimiser step `update()` folds the weights into the average; at the end `swap_in()` writes the
average into the weights the export reads. Registered for checkpointing, so a resumed run goes
on with the average it had (`state_dict` holds tensors and numbers only: `weights_only=True`).
"""
from typing import Iterable, List

import torch


class WeightAverage:
    """shadow <- d * shadow + (1 - d) * weight after each step, with d = min(decay, (1 + n) / (10 + n))
    so the first steps' random start does not linger (n: updates so far)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay {decay} is outside (0, 1): use e.g. 0.998, or 0 for no average")
        self.params: List[torch.nn.Parameter] = list(params)
        self.decay, self.n = float(decay), 0
        self.shadow = [p.detach().float().clone() for p in self.params]   # fp32: bf16 would round the small updates away

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.n += 1

    @torch.no_grad()
    def swap_in(self) -> None:
        """The average written into the weights (what is exported from here on)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"n": self.n, **{f"shadow.{i}": s for i, s in enumerate(self.shadow)}}

    def load_state_dict(self, sd: dict) -> None:
        if sum(k.startswith("shadow.") for k in sd) != len(self.shadow):
            raise ValueError("the checkpoint's weight average holds other weights than this run trains: "
                             "resume with the recipe that wrote it")
        self.n = int(sd["n"])
        for i, s in enumerate(self.shadow):
            s.copy_(sd[f"shadow.{i}"])
