"""training/common.py: recipes, schedule, checkpoints, throughput/MFU, logging. CPU, seconds."""
import json
import os

import pytest
import torch

from open_clip_cxr_train import common, logs
from open_clip_cxr_train.common import (Throughput, TrainState, cosine_with_warmup, data_seed, flops_per_sample_transformer,
                             list_checkpoints, load_recipe, log_line, measure_forward_flops, parse_value,
                             peak_flops, resume_from_checkpoint, save_checkpoint, save_recipe)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    common.reset_accelerator_state()
    yield
    common.reset_accelerator_state()


# ---------------------------------------------------------------- recipes

def test_parse_value_types():
    assert parse_value("1e-4") == 1e-4 and isinstance(parse_value("1e-4"), float)
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("false") is False
    assert parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("bf16") == "bf16"
    assert parse_value("runs/x-{000..009}.tar") == "runs/x-{000..009}.tar"


def test_load_recipe_overrides_base_and_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\noptim:\n  lr: 1e-4\n  betas: [0.9, 0.98]\ntrain:\n  steps: 10\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\noptim:\n  weight_decay: 0.05\n")
    r = load_recipe(str(tmp_path / "r.yaml"), ["optim.lr=2e-3", "train.mixed_precision=bf16", "new.deep.key=7"])
    assert r["seed"] == 1
    assert r["optim"] == {"lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 0.05}   # 1e-4 read as float, merged
    assert r["train"] == {"steps": 10, "mixed_precision": "bf16"}
    assert r["new"]["deep"]["key"] == 7
    save_recipe(r, str(tmp_path / "out" / "saved.yaml"))
    assert load_recipe(str(tmp_path / "out" / "saved.yaml")) == r
    # a run saved before a key existed resumes under the key's default, and only under that
    old, defaults = str(tmp_path / "old" / "saved.yaml"), {"train": {"new_key": True}}
    save_recipe(r, old)
    with_default = {**r, "train": {**r["train"], "new_key": True, "compile": True}}   # compile may change
    with pytest.raises(ValueError, match="new_key"):
        save_recipe(with_default, old)   # without the defaults: a difference
    with pytest.raises(ValueError, match="new_key"):
        save_recipe({**r, "train": {**r["train"], "new_key": False}}, old, defaults=defaults)
    save_recipe(with_default, old, defaults=defaults)
    with pytest.raises(ValueError):
        load_recipe(None, ["no_equals_sign"])


def test_setup_accelerator_reads_recipe(tmp_path):
    acc = common.setup_accelerator({"seed": 5, "output_dir": str(tmp_path),
                                    "train": {"mixed_precision": "bf16", "grad_accum_steps": 3, "log_with": "none"}})
    assert acc.mixed_precision == "bf16" and acc.gradient_accumulation_steps == 3
    assert acc.project_dir == str(tmp_path)
    a = torch.rand(3)
    common.reset_accelerator_state()
    common.setup_accelerator({"seed": 5, "output_dir": str(tmp_path), "train": {"log_with": None}})
    assert torch.equal(a, torch.rand(3))   # seeded


# ---------------------------------------------------------------- schedule

def test_cosine_with_warmup_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)                    # cosine starts at the peak
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)        # half-way: mid point
    assert lrs[14:] == pytest.approx([0.1, 0.1])           # held at min after total
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------- checkpoints

def _tiny_setup(tmp_path):
    acc = common.setup_accelerator({"seed": 0, "output_dir": str(tmp_path), "train": {"log_with": None}})
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    sched = cosine_with_warmup(opt, 2, 20)
    state = TrainState()
    acc.register_for_checkpointing(sched, state)
    return acc, model, opt, sched, state


def _step(model, opt, sched, state):
    loss = model(torch.randn(16, 4)).pow(2).mean()   # uses the torch RNG twice (data, dropout)
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    state.step += 1
    state.samples_seen += 16
    return loss.item()


def test_checkpoint_resume_restores_everything(tmp_path):
    acc, model, opt, sched, state = _tiny_setup(tmp_path)
    assert not resume_from_checkpoint(acc, str(tmp_path), state)   # nothing yet
    for _ in range(3):
        _step(model, opt, sched, state)
    state.best_metric = 0.5
    save_checkpoint(acc, str(tmp_path), state, keep_last=2)
    expected = [_step(model, opt, sched, state) for _ in range(2)]
    weights = [p.detach().clone() for p in model.parameters()]

    common.reset_accelerator_state()
    acc, model, opt, sched, state = _tiny_setup(tmp_path)
    assert resume_from_checkpoint(acc, str(tmp_path), state)
    assert (state.step, state.samples_seen, state.best_metric) == (3, 48, 0.5)
    assert sched.last_epoch == 3
    got = [_step(model, opt, sched, state) for _ in range(2)]
    assert got == expected                                          # model, optimiser, RNG all restored
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_checkpoint_atomic_and_keep_last(tmp_path):
    acc, model, opt, sched, state = _tiny_setup(tmp_path)
    for _ in range(4):
        _step(model, opt, sched, state)
        save_checkpoint(acc, str(tmp_path), state, keep_last=2)
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint-3", "checkpoint-4"]
    # a save killed half-way: a .tmp folder, and a folder without its COMPLETE marker
    os.makedirs(tmp_path / "checkpoints" / "checkpoint-9.tmp")
    os.makedirs(tmp_path / "checkpoints" / "checkpoint-8")
    assert os.path.basename(list_checkpoints(str(tmp_path))[-1]) == "checkpoint-4"
    state2 = TrainState()
    common.reset_accelerator_state()
    acc, model, opt, sched, state2 = _tiny_setup(tmp_path)
    assert resume_from_checkpoint(acc, str(tmp_path), state2) and state2.step == 4
    marker = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / "COMPLETE").read_text())
    assert marker["step"] == 4


def test_trainstate_roundtrip():
    s = TrainState(step=7, epoch=2, samples_seen=700, best_metric=0.3)
    s.step_in_epoch = 5
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_data_seed_distinct():
    seeds = {data_seed(0, e, s) for e in range(3) for s in range(0, 50, 5)}
    assert len(seeds) == 30 and data_seed(7, 0, 0) == 7


# ---------------------------------------------------------------- throughput

def test_flops_estimates():
    assert flops_per_sample_transformer(1000, 10) == 60_000
    assert flops_per_sample_transformer(1000, 10, n_trainable=100) == (4 * 900 + 6 * 100) * 10
    lin = torch.nn.Linear(32, 16, bias=False)
    assert measure_forward_flops(lin, torch.zeros(5, 32)) == 2 * 5 * 32 * 16
    # attention is counted on the CPU too (scores and weighted values: 2 x 2 x T x S x d per head)
    q, kv = torch.zeros(1, 2, 7, 8), torch.zeros(1, 2, 11, 8)
    assert measure_forward_flops(torch.nn.functional.scaled_dot_product_attention, q, kv, kv) == 4 * 2 * 7 * 11 * 8


def test_throughput_and_peak():
    assert peak_flops("cpu", torch.bfloat16, measure=False) == 890e9 and peak_flops("cpu", "fp32", measure=False) == 210e9
    assert peak_flops("cpu", torch.float32, measure=True) > 1e8
    t = Throughput(flops_per_sample=1e9, flops_per_token=1e6, peak=1e12)
    t.update(samples=8, tokens=1000)
    t.update(samples=8, tokens=1000)
    s = t.stats(2.0)
    assert s["samples_per_s"] == 8 and s["tokens_per_s"] == 1000 and s["ms_per_step"] == 1000
    assert s["mfu"] == pytest.approx(100 * (16e9 + 2e9) / 2.0 / 1e12)
    assert t.stats(1.0)["samples_per_s"] == 0   # reset


def test_log_line_format(capsys):
    line = log_line(12, {"loss": 1.23456, "lr": 1e-4, "ms_per_step": 250.0, "samples_per_s": 32.0,
                         "tokens_per_s": 4096.0, "mfu": 12.3456, "epoch": 1})
    assert line == ("iter 12: loss 1.2346, lr 1.00e-04, 250.0ms/step, 32.0 samples/s, 4096 tokens/s, "
                    "mfu 12.35%, epoch 1")
    assert capsys.readouterr().out.strip() == line
    # the remaining time ends the line; none at a stage's last step
    assert log_line(5, {"loss": 1.0, "eta_s": 3900.0}).endswith("loss 1.0000, eta 1h05m")
    assert log_line(5, {"loss": 1.0, "eta_s": 89.0}).endswith("eta 1m") and "eta" not in log_line(5, {"eta_s": None})
    assert [logs.duration(s) for s in (0, 44.6, 60, 3599, 7260)] == ["0s", "45s", "1m", "1h00m", "2h01m"]


def test_move_to_and_flatten():
    from collections import namedtuple
    P = namedtuple("P", "a b")
    out = common.move_to({"x": [torch.zeros(1)], "p": P(torch.ones(1), "s")}, "cpu")
    assert out["p"].b == "s" and torch.equal(out["x"][0], torch.zeros(1))
    assert common.flatten({"a": {"b": 1, "c": [1]}}) == {"a.b": 1, "a.c": "[1]"}
