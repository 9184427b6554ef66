"""The weight average of stage 1 (`supcon.ema_decay`, `training/weight_average.py`): the update
against a hand computation, and a tiny run stopped and resumed that exports the same averaged
weights as the run left alone (the average is checkpointed with the run)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from open_clip_cxr_train import common
from open_clip_cxr_train.weight_average import WeightAverage
from test_train_text import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")   # conftest.py


def test_update_follows_the_warmed_up_decay_and_swap_in_writes_it():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = WeightAverage([w], decay=0.5)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 4.0]))
    avg.update()                               # d = min(0.5, 1/10) = 0.1
    expect = 0.1 * torch.tensor([1.0, 2.0]) + 0.9 * torch.tensor([3.0, 4.0])
    assert torch.allclose(avg.shadow[0], expect)
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 6.0]))
    avg.update()                               # d = min(0.5, 2/11)
    expect = 2 / 11 * expect + 9 / 11 * torch.tensor([5.0, 6.0])
    assert torch.allclose(avg.shadow[0], expect)
    avg.swap_in()
    assert torch.allclose(w.detach(), expect)
    again = WeightAverage([torch.nn.Parameter(torch.zeros(2))], decay=0.5)
    again.load_state_dict(avg.state_dict())
    assert again.n == 2 and torch.allclose(again.shadow[0], expect)
    with pytest.raises(ValueError, match="other weights"):
        WeightAverage([w, w], 0.5).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="outside"):
        WeightAverage([w], 1.0)


def exported(run: Path) -> dict:
    files = [f for f in sorted(run.rglob("*.safetensors")) if "work" not in f.parts]
    assert files
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def test_stopped_and_resumed_run_exports_the_same_average(tmp_path):
    from open_clip_cxr_train.text_stage import train
    over = {"supcon.steps": 4, "supcon.cache": True, "supcon.ema_decay": 0.9,
            "train.checkpoint_every": 100, "eval.enabled": False}
    for run in ("full", "cut", "last"):
        (tmp_path / run).mkdir()
    train(tiny_recipe(tmp_path / "full", **over))
    common.reset_accelerator_state()
    assert train(tiny_recipe(tmp_path / "cut", **over, **{"train.stop_after": 4})) == {"stopped_at": 4}
    common.reset_accelerator_state()
    train(tiny_recipe(tmp_path / "cut", **over))
    common.reset_accelerator_state()
    train(tiny_recipe(tmp_path / "last", **{**over, "supcon.ema_decay": 0.0}))
    full, cut, last = (exported(tmp_path / r / "stage1") for r in ("full", "cut", "last"))
    assert full.keys() == cut.keys() == last.keys()
    for k in full:
        assert torch.allclose(full[k].float(), cut[k].float(), atol=1e-6), k
    # the average is what was exported: the pooler differs from the last step's weights
    assert any(not torch.equal(full[k], last[k]) for k in full if "pooler" in k or "latent" in k)
