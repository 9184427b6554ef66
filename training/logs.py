"""What a run prints and writes: nanoGPT-style log lines, a progress bar, `metrics.jsonl`."""
from __future__ import annotations

import json
import os
import sys


def duration(seconds: float) -> str:
    """A short wall-time string: `45s`, `12m`, `1h05m`."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    m = (s + 30) // 60
    return f"{m}m" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def log_line(step: int, metrics: dict, file=None) -> str:
    """nanoGPT-style: `iter 120: loss 2.3456, lr 1.00e-04, 812.3ms/step, 39.4 samples/s, ... mfu 12.34%`;
    `eta_s` (the stage's remaining steps at this interval's rate) ends the line as `eta 33m`."""
    parts = [f"iter {step}"]
    fmt = {
        "loss": lambda v: f"loss {v:.4f}",
        "lr": lambda v: f"lr {v:.2e}",
        "ms_per_step": lambda v: f"{v:.1f}ms/step",
        "samples_per_s": lambda v: f"{v:.1f} samples/s",
        "tokens_per_s": lambda v: f"{v:.0f} tokens/s",
        "mfu": lambda v: f"mfu {v:.2f}%",
        "eta_s": lambda v: f"eta {duration(v)}",
    }
    for k in ("loss", "lr", "ms_per_step", "samples_per_s", "tokens_per_s", "mfu"):
        if k in metrics and metrics[k] is not None:
            parts.append(fmt[k](float(metrics[k])))
    for k, v in metrics.items():
        if k not in fmt and isinstance(v, (int, float)):
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    if metrics.get("eta_s") is not None:
        parts.append(fmt["eta_s"](float(metrics["eta_s"])))
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


    def drop_after(self, step: int) -> int:
        """Forget what a run wrote after its checkpoint at `step` (a resume writes it again):
        records of later steps, and evaluation records (no "loss") of `step` itself, which
        are written after that step's checkpoint. Returns how many lines were dropped."""
        if not (self.enabled and os.path.exists(self.path)):
            return 0
        with open(self.path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:      # a line cut short by a kill
                continue
            s = rec.get("step", 0)
            if s < step or (s == step and "loss" in rec):
                keep.append(line)
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        return len(lines) - len(keep)
