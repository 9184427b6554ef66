"""training/checkpoints.py, loop.py, logs.py: damaged checkpoints, the run lock, metrics on resume,
stale .tmp saves, and a bad OPEN_CLIP_CXR_PRECISION. CPU, seconds (one tiny CLIP run end to end)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from open_clip_cxr.cli import main
from open_clip_cxr.errors import UsageError
from open_clip_cxr_train.accel import reset_accelerator_state, setup_accelerator
from open_clip_cxr_train.checkpoints import (CheckpointDamagedError, RunLock, TrainState, list_checkpoints,
                                  resume_from_checkpoint, save_checkpoint)
from open_clip_cxr_train.logs import MetricsWriter
from open_clip_cxr_train.schedule import cosine_with_warmup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerator_state()
    yield
    reset_accelerator_state()
    torch.set_num_threads(threads)


def _setup(tmp_path):
    acc = setup_accelerator({"seed": 0, "output_dir": str(tmp_path), "train": {"log_with": None, "cpu": True,
                                                                               "mixed_precision": "fp32"}})
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    sched = cosine_with_warmup(opt, 2, 20)
    state = TrainState()
    acc.register_for_checkpointing(sched, state)
    return acc, model, opt, sched, state


def _steps_and_saves(tmp_path, steps=(3, 4)):
    """Checkpoints at each of `steps`; returns the weights saved at each."""
    acc, model, opt, sched, state = _setup(tmp_path)
    saved = {}
    for target in steps:
        while state.step < target:
            model(torch.randn(2, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            state.step += 1
        save_checkpoint(acc, str(tmp_path), state, keep_last=3)
        saved[target] = [p.detach().clone() for p in model.parameters()]
    return saved


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damaged):
    saved = _steps_and_saves(tmp_path)
    latest = Path(list_checkpoints(str(tmp_path))[-1])
    assert latest.name == "checkpoint-4"
    _truncate(latest / damaged)
    capsys.readouterr()
    reset_accelerator_state()
    acc, model, opt, sched, state = _setup(tmp_path)
    assert resume_from_checkpoint(acc, str(tmp_path), state)
    assert state.step == 3 and sched.last_epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(saved[3], model.parameters()))   # all of step 3, none of 4
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and str(latest) in warnings[0] and "damaged" in warnings[0], warnings


def test_only_checkpoint_damaged_is_a_usage_error(tmp_path):
    _steps_and_saves(tmp_path, steps=(2,))
    _truncate(Path(list_checkpoints(str(tmp_path))[0]) / "model.safetensors")
    reset_accelerator_state()
    acc, model, opt, sched, state = _setup(tmp_path)
    with pytest.raises(CheckpointDamagedError, match="checkpoint-2 is damaged"):
        resume_from_checkpoint(acc, str(tmp_path), state)
    assert issubclass(CheckpointDamagedError, UsageError)


def test_stale_tmp_saves_are_removed_at_start(tmp_path, capsys):
    _steps_and_saves(tmp_path, steps=(2,))
    stale = tmp_path / "checkpoints" / "checkpoint-7.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    reset_accelerator_state()
    acc, model, opt, sched, state = _setup(tmp_path)
    capsys.readouterr()
    assert resume_from_checkpoint(acc, str(tmp_path), state) and state.step == 2
    assert not stale.exists() and (tmp_path / "checkpoints" / "checkpoint-2").exists()
    assert "checkpoint-7.tmp" in capsys.readouterr().out


# ---------------------------------------------------------------- the lock

def test_lock_refuses_a_second_run_while_the_first_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / RunLock.NAME).write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(UsageError) as e:
            RunLock(str(tmp_path)).acquire()
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path) in msg and f"pid {holder.pid}" in msg
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / RunLock.NAME
    lock.write_text(f"{dead.pid} {os.uname().nodename}\n")
    with RunLock(str(tmp_path)):
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):   # held by a live run: this one
            RunLock(str(tmp_path)).acquire()
    assert not lock.exists()
    err = capsys.readouterr().err
    assert f"stale lock {lock} of pid {dead.pid}" in err


def test_locked_folder_refuses_train_text(tmp_path, capsys):
    """End to end: `train-text` into a folder another live run holds: exit 2, one line, nothing trained."""
    out = tmp_path / "stage1"
    out.mkdir()
    (tmp_path / "r.jsonl").write_text(json.dumps({"findings": "Clear lungs.", "impression": "Normal."}) + "\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / RunLock.NAME).write_text(f"{holder.pid} {os.uname().nodename}\n")
        rc = main(["train-text", "--out", str(out), "--set", "model=cxr-llm-tiny", "--set", "train.log_with=none",
                   "--set", "train.num_threads=1", "--set", "train.mixed_precision=fp32",
                   "--set", "data.source=table", "--set", f"data.path={tmp_path / 'r.jsonl'}"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0] and str(out) in err[0], err
    assert sorted(p.name for p in out.iterdir()) == [RunLock.NAME]    # no recipe, no metrics, no model


# ---------------------------------------------------------------- metrics on resume

def test_metrics_drop_after_a_step(tmp_path):
    w = MetricsWriter(str(tmp_path / "metrics.jsonl"))
    for rec in ({"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "val/r": 0.5},
                {"step": 3, "loss": 0.8}):
        w.write(rec)
    with open(w.path, "a") as f:
        f.write('{"step": 4, "lo')                  # a line cut short by a kill
    assert w.drop_after(2) == 3
    assert [json.loads(l) for l in Path(w.path).read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}]


def test_clip_resume_after_damaged_checkpoint_logs_each_step_once(tmp_path):
    """A CLIP run whose last checkpoint is damaged: the rerun warns, resumes from the one before,
    removes a stale .tmp, and metrics.jsonl ends with each step (and each validation) once, the
    retrained steps holding the first run's losses."""
    import test_train_clip as tc
    shards = {"train": tc.write_shards(tmp_path / "shards", "train", 32),
              "val": tc.write_shards(tmp_path / "shards", "val", 8, seed=1)}
    run = tmp_path / "run"
    r = dict(train__epochs=2, train__checkpoint_every=3, data__val=shards["val"])
    tc.train(tc.recipe(shards, run, **r))                      # 8 steps; checkpoints 6 and 8
    first = tc.read_metrics(run)
    assert [p.rsplit("-", 1)[1] for p in list_checkpoints(str(run))] == ["6", "8"]
    _truncate(run / "checkpoints" / "checkpoint-8" / "model.safetensors")
    (run / "checkpoints" / "checkpoint-9.tmp").mkdir()
    reset_accelerator_state()
    final = tc.train(tc.recipe(shards, run, **r))
    assert final["step"] == 8 and not (run / "checkpoints" / "checkpoint-9.tmp").exists()
    again = tc.read_metrics(run)
    assert [x["step"] for x in again if "loss" in x] == list(range(1, 9))
    assert [x["step"] for x in again if "val/mean_recall" in x] == [4, 8]
    losses = {x["step"]: x["loss"] for x in first if "loss" in x}
    for x in again:
        if "loss" in x:
            assert x["loss"] == pytest.approx(losses[x["step"]], abs=1e-6), x["step"]
    assert not (run / RunLock.NAME).exists()


# ---------------------------------------------------------------- a bad precision variable

@pytest.mark.parametrize("command", ["train-text", "train-clip"])
def test_bad_precision_variable_is_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("OPEN_CLIP_CXR_PRECISION", "fp33")
    argv = [command, "--set", "model=cxr-llm-tiny"]
    argv += ["--out", str(tmp_path / "run")] if command == "train-text" else \
        ["--output-dir", str(tmp_path / "run"), "--set", f"data.train={tmp_path / 'train-000000.tar'}"]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "OPEN_CLIP_CXR_PRECISION" in err[0] and "fp33" in err[0] and "fp32|bf16|auto" in err[0]
    assert not (tmp_path / "run").exists()


def test_old_common_names_resolve_to_the_moved_objects():
    """`open_clip_cxr_train.common.X` (used by older callers and the benches) is the object of X's new module."""
    from open_clip_cxr_train import accel, checkpoints, common, logs, schedule, throughput
    assert common.TrainState is checkpoints.TrainState and common.save_checkpoint is checkpoints.save_checkpoint
    assert common.setup_accelerator is accel.setup_accelerator and common.peak_flops is throughput.peak_flops
    assert common.MetricsWriter is logs.MetricsWriter and common.cosine_with_warmup is schedule.cosine_with_warmup
    with pytest.raises(AttributeError):
        common.no_such_name
