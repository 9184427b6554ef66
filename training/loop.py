"""The one step loop of every training stage (MNTP, supervised contrastive, CLIP).

A stage hands the loop a prepared module, optimiser and schedule, a `step_fn(module, batch)
-> (loss, samples, tokens)` and an iterator of micro-batches; the loop does the rest, the
same way for all of them:

    loop = Loop(accelerator, state, net, optimizer, scheduler, step_fn, cfg, name="clip", ...)
    loop.run(batches, until=state.step + 100)   # raises StopAfter at `train.stop_after`
    loop.close()

- gradient accumulation, clipping, optimiser and schedule steps (`accelerator.accumulate`);
- `metrics.jsonl` (a record per step when `every_step`, and one with the rates per log line),
  the trackers, a nanoGPT log line (loss, lr, ms/step, samples/s, tokens/s, MFU);
- throughput and MFU against the peak measured for the dtype the steps compute in, measured
  before the first step (probed again between steps if the machine was busier then);
  checkpoint and validation time are not counted as step time;
- checkpoints every `checkpoint_every` steps, at the end and at `stop_after`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from open_clip_cxr_train.checkpoints import resume_from_checkpoint, save_checkpoint
from open_clip_cxr_train.logs import log_line, progress_bar
from open_clip_cxr_train.speedups import low_precision_dtype
from open_clip_cxr_train.throughput import Throughput, peak_flops, precision_name


class StopAfter(Exception):
    """`train.stop_after` reached: the checkpoint is written and the run ends there (a planned
    interruption; rerunning the same recipe resumes from it). `args[0]`: the step."""


class StreamEnded(RuntimeError):
    """The batch iterator ran dry before the steps asked of it."""


@dataclass
class Cadence:
    """How often the loop logs and checkpoints, and where it stops (0: never)."""
    log_every: int = 10
    checkpoint_every: int = 0
    stop_after: int = 0
    grad_clip: float = 1.0
    keep_last: int = 2

    @classmethod
    def from_recipe(cls, train: dict, grad_clip, keep_last: int) -> "Cadence":
        return cls(int(train.get("log_every") or 10), int(train.get("checkpoint_every") or 0),
                   int(train.get("stop_after") or 0), float(grad_clip or 0.0), int(keep_last))


class Loop:
    """Optimises `module` (prepared) from `state.step` on; see the module docstring.

    `ckpt_dir`: where checkpoints go; `final_step`: the stage's last step (checkpointed; a
    `stop_after` there is no interruption); `writer`: a `MetricsWriter`; `extras(lrs) -> dict`:
    stage fields added to the records (e.g. epoch, logit_scale); `after_step()`: runs after each
    optimiser step (e.g. clamping the logit scale); `tracker`: the trackers' key prefix."""

    def __init__(self, accelerator, state, module, optimizer, scheduler, step_fn: Callable, cadence: Cadence, *,
                 name: str, ckpt_dir: str, final_step: int, writer, flops_per_sample: float = 0.0,
                 flops_per_token: float = 0.0, every_step: bool = False, extras: Optional[Callable] = None,
                 after_step: Optional[Callable] = None, tracker: Optional[str] = None, bar_total: int = 0,
                 bar_start: int = 0):
        self.acc, self.state, self.module, self.optimizer, self.scheduler = accelerator, state, module, optimizer, scheduler
        self.step_fn, self.c, self.name, self.ckpt_dir, self.final_step = step_fn, cadence, name, ckpt_dir, final_step
        self.writer, self.every_step, self.tracker = writer, every_step, tracker or name
        self.extras, self.after_step = extras or (lambda lrs: {}), after_step
        self.dtype = low_precision_dtype(accelerator.mixed_precision) or torch.float32   # what the steps compute in
        peak = peak_flops(accelerator.device, self.dtype) * accelerator.num_processes   # before any step
        self.meter = Throughput(flops_per_sample, peak, flops_per_token)
        self.peak_info = {"precision": precision_name(self.dtype), "threads": torch.get_num_threads(),
                          "peak_gflops": round(peak / 1e9, 1)}                    # what mfu is measured against
        self.bar = progress_bar(bar_total, bar_start, not accelerator.is_main_process, desc=name)
        self.losses, self.loss_sum, self.loss_n = [], torch.zeros((), device=accelerator.device), 0
        self.t0, self.paused_s, self.last_loss = time.perf_counter(), 0.0, None

    # ------------------------------------------------------------ the steps

    def run(self, batches, until: int) -> None:
        """Optimiser steps until `state.step == until`, each from `accum` micro-batches of `batches`."""
        self.module.train()
        while self.state.step < until:
            self.step(batches)

    def step(self, batches) -> None:
        acc, state = self.acc, self.state
        step_losses, n_samples = [], 0
        for _ in range(acc.gradient_accumulation_steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise StreamEnded(f"the training stream ended after {state.step_in_epoch} steps") from None
            with acc.accumulate(self.module):
                loss, samples, tokens = self.step_fn(self.module, batch)
                acc.backward(loss)
                if acc.sync_gradients and self.c.grad_clip:
                    acc.clip_grad_norm_(self.module.parameters(), self.c.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self._tally(loss, step_losses)
            n_samples += samples * acc.num_processes
            self.meter.update(samples * acc.num_processes, tokens * acc.num_processes, steps=0)
        lrs = self.scheduler.get_last_lr()        # the rates this step used
        self.scheduler.step()
        if self.after_step:
            self.after_step()
        state.step += 1
        state.step_in_epoch += 1
        state.samples_seen += n_samples
        self.meter.steps += 1
        self.bar.update(1)
        record = self._step_record(step_losses, lrs)
        if state.step % self.c.log_every == 0 or state.step == self.final_step:
            self._log(record, lrs)
        self._checkpoint_or_stop()

    def _tally(self, loss, step_losses) -> None:
        if self.every_step:     # a record per step: the loss goes to the host now
            step_losses.append(loss.detach().float().item())
            self.losses.append(step_losses[-1])
        else:                   # no host sync: summed on the device until the log line
            self.loss_sum += loss.detach()
            self.loss_n += 1

    def _step_record(self, step_losses, lrs) -> Optional[dict]:
        if not self.every_step:
            return None
        loss = sum(step_losses) / len(step_losses)
        record = {"step": self.state.step, "stage": self.name, "loss": loss, "lr": lrs[0], **self.extras(lrs)}
        self.writer.write(record)
        self.acc.log({f"{self.tracker}/loss": loss, f"{self.tracker}/lr": lrs[0]}, step=self.state.step)
        return record

    # ------------------------------------------------------------ logging

    def _interval_loss(self) -> float:
        if self.every_step:
            loss, self.losses = sum(self.losses) / len(self.losses), []
            return loss
        loss = self.acc.reduce(self.loss_sum, "mean").item() / self.loss_n
        self.loss_sum.zero_()
        self.loss_n = 0
        return loss

    def _rates(self) -> dict:
        now = time.perf_counter()
        stats = self.meter.stats(now - self.t0 - self.paused_s)
        self.t0, self.paused_s = now, 0.0
        if stats["mfu"] > 100 and self.acc.device.type == "cpu":
            # the machine was busier when the peak was probed: probe again, between steps
            fresh = peak_flops(self.acc.device, self.dtype, refresh=True) * self.acc.num_processes
            stats["mfu"] *= self.meter.peak / fresh
            self.meter.peak = fresh
            self.peak_info["peak_gflops"] = round(fresh / 1e9, 1)
        return stats

    def _log(self, record: Optional[dict], lrs) -> None:
        loss, stats = self._interval_loss(), self._rates()
        self.last_loss = loss
        if record is not None:
            rec = {**record, "loss_mean": loss, **stats, **self.peak_info}
        else:
            rec = {"step": self.state.step, **self.extras(lrs), "loss": loss, "lr": lrs[0], **stats, **self.peak_info}
        self.bar.set_postfix(loss=f"{loss:.3f}")
        if self.acc.is_main_process:
            skip = ("step", "samples_seen", "loss_mean", *self.peak_info)
            # why: on a CPU without fast bf16 the demo's stage 1 ran 4.5x longer; the line says how long is
            # left (step time only: checkpoints and validation come on top). Printed, not recorded.
            left = self.final_step - self.state.step
            log_line(self.state.step, {**{k: v for k, v in rec.items() if k not in skip}, "loss": loss,
                                       "eta_s": left * stats["ms_per_step"] / 1000.0 if left > 0 else None})
            self.writer.write(rec)
        groups = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g}
        self.acc.log({**({} if record is not None else {f"{self.tracker}/loss": loss}),
                      **{f"{self.tracker}/{k}": v for k, v in stats.items()}, **groups}, step=self.state.step)

    # ------------------------------------------------------------ checkpoints and the end

    def _checkpoint_or_stop(self) -> None:
        step, c = self.state.step, self.c
        stopping = bool(c.stop_after) and step >= c.stop_after and step != self.final_step
        if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == self.final_step or stopping:
            with self.paused():
                save_checkpoint(self.acc, self.ckpt_dir, self.state, keep_last=c.keep_last)
        if stopping:
            self.close()
            self.acc.end_training()
            raise StopAfter(step)

    @contextlib.contextmanager
    def paused(self):
        """Time inside the block (checkpoints, validation) is not step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def close(self) -> None:
        self.bar.close()


def resume(accelerator, state, ckpt_dir: str, writer, final_step: int, strict: bool = True,
           path: Optional[str] = None) -> bool:
    """Resume `state` and the registered objects from the latest good checkpoint in `ckpt_dir`
    (`checkpoints.resume_from_checkpoint`). If steps remain (`state.step < final_step`), what
    `metrics.jsonl` holds past that step was written after the checkpoint: it is dropped, so
    the steps trained again are not logged twice."""
    resumed = resume_from_checkpoint(accelerator, ckpt_dir, state, path, strict=strict)
    dropped = writer.drop_after(state.step) if state.step < final_step else 0
    if dropped:
        accelerator.print(f"metrics.jsonl: dropped {dropped} line(s) written after step {state.step}")
    return resumed
