"""Checkpoints: the state that survives a restart, written whole or not at all, read safely.

    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)   # (scheduler not passed to prepare())
    resume_from_checkpoint(accelerator, out_dir, state)         # -> True if it resumed
    ...
    save_checkpoint(accelerator, out_dir, state, keep_last=2)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from typing import List, Optional

import torch

from open_clip_cxr.errors import UsageError


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
    only the trained parameters (`keep_trainable_only`).

    Stale `checkpoint-*.tmp` folders (saves that never finished) are removed first. A damaged
    latest checkpoint (a truncated safetensors file, an unreadable optimiser state) is passed
    over with a one-line warning for the previous complete one; every piece is loaded again
    from that one, so nothing of the damaged one survives. A checkpoint refused as unsafe
    (`UnsafeCheckpointError`) is never passed over."""
    if path is not None:
        with _safe_custom_state():
            accelerator.load_state(path, strict=strict)
        accelerator.print(f"resumed from {path}: {state}")
        return True
    if accelerator.is_main_process:
        remove_stale_tmp(out_dir, log=accelerator.print)
    accelerator.wait_for_everyone()
    ckpts = list_checkpoints(out_dir)
    for i, ckpt in enumerate(reversed(ckpts)):
        try:
            with _safe_custom_state():
                accelerator.load_state(ckpt, strict=strict)
        except UnsafeCheckpointError:
            raise
        except Exception as e:   # safetensors, zip and pickle errors of a damaged file
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            if i == len(ckpts) - 1:
                raise CheckpointDamagedError(
                    f"checkpoint {ckpt} is damaged ({type(e).__name__}: {why}) and there is no earlier one: "
                    "delete that folder to start over, or give another output folder") from None
            print(f"warning: checkpoint {ckpt} is damaged ({type(e).__name__}: {why}); "
                  f"resuming from the previous one", file=sys.stderr, flush=True)
            continue
        accelerator.print(f"resumed from {ckpt}: {state}")
        return True
    return False


def remove_stale_tmp(out_dir: str, log=print) -> List[str]:
    """Delete `checkpoints/checkpoint-*.tmp`: saves killed half-way (a run holds the folder's
    `RunLock` before calling this, so no live save is touched). Returns the removed paths."""
    root = os.path.join(out_dir, "checkpoints")
    gone = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if re.fullmatch(CKPT_PREFIX + r"\d+\.tmp", name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                gone.append(os.path.join(root, name))
                log(f"removed {os.path.join(root, name)}: a checkpoint save that never finished")
    return gone


class CheckpointDamagedError(UsageError):
    """Every complete checkpoint of a run folder failed to load."""


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



# ---------------------------------------------------------------- one run per folder

class RunLock:
    """`<run folder>/train.lock` (pid and host of its holder) while a run trains there, so a
    second run into the same folder stops with a one-line `UsageError` instead of both
    writing the same checkpoints. A lock whose pid is no longer alive (on this host) is stale:
    taken over with a warning. Main process only; released on exit from the `with` block.

        with RunLock(out_dir):
            ...train...
    """
    NAME = "train.lock"

    def __init__(self, out_dir: str, enabled: bool = True):
        self.path, self.enabled, self.held = os.path.join(out_dir, self.NAME), enabled, False

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._holder()
                if pid is not None and host == socket.gethostname() and not _alive(pid):
                    print(f"warning: taking over the stale lock {self.path} of pid {pid} (no longer running)",
                          file=sys.stderr, flush=True)
                    os.remove(self.path)
                    continue
                raise UsageError(f"{os.path.dirname(os.path.abspath(self.path))} is being trained into by another "
                                 f"run (pid {pid} on {host}, lock {self.path}): wait for it to end, or give "
                                 "another output folder") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return
        raise UsageError(f"could not take the lock {self.path}: another run took it first")

    def _holder(self):
        try:
            with open(self.path) as f:
                pid, host = (f.read().split() + ["?", "?"])[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, "?"

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True
