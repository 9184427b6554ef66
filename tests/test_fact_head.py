"""The fact head of stage 1 (`supcon.fact_weight`, `training/fact_head.py`, issue 19): the labels
the mention reader gives, the step's loss against a hand computation, a tiny stage-1 run that
learns the facts, and the refusal with `supcon.views` > 2."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from open_clip_cxr_train.fact_head import LABELS, WithFactHead, fact_ids, fact_targets, severity_step
from open_clip_cxr_train.stage1_supcon import supcon_step
from test_supcon_views import hand_batches
from test_train_text import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")   # conftest.py


def names(text):
    inv = {v: k for k, v in LABELS.items()}
    return {inv[i] for i in fact_ids(text)}


def test_one_fact_many_wordings_and_one_error_one_label():
    absent = {("pneumothorax", "absent")}
    for text in ("No pneumothorax.", "Pneumothorax is not seen.", "Negative for pneumothorax.", "No PTX."):
        assert names(text) == absent, text
    report = names("Small left pleural effusion. No pneumothorax.")
    assert report == absent | {("pleural_effusion", "present"), ("pleural_effusion", "left"),
                               ("pleural_effusion", "severity", 0)}
    swapped = names("Small right pleural effusion. No pneumothorax.")
    assert report ^ swapped == {("pleural_effusion", "left"), ("pleural_effusion", "right")}
    worse = names("Large left pleural effusion. No pneumothorax.")
    assert report ^ worse == {("pleural_effusion", "severity", 0), ("pleural_effusion", "severity", 2)}
    assert names("No acute cardiopulmonary process.") == set()
    assert (severity_step("tiny"), severity_step("moderate"), severity_step("mild-moderate"),
            severity_step("moderate-severe")) == (0, 1, 1, 2)
    y = fact_targets(["No pneumothorax.", "Nothing here."])
    assert y.shape == (2, len(LABELS)) and y.sum(1).tolist() == [1.0, 0.0]


def test_step_adds_the_weighted_fact_loss_to_the_contrastive_loss():
    module, batches = hand_batches(2, fact_weight=0.5)
    batch = batches(0)
    plain = batch[:5]
    assert batch[5].shape == (batch[0].shape[0], len(LABELS)) and batch[5].sum() > 0   # "no effusion", "left ..."
    torch.manual_seed(0)
    wrapped = WithFactHead(module, 16)
    with torch.no_grad():
        got = supcon_step(wrapped, batch, "cpu", 4, 2, 0.05, True, fact_weight=0.5)[0]
        base = supcon_step(module, plain, "cpu", 4, 2, 0.05, True)[0]
        emb = module(batch[0])
        logits = F.normalize(emb, dim=-1) * 4.0 @ wrapped.head.weight.T + wrapped.head.bias   # sqrt(16)
        by_hand = F.binary_cross_entropy_with_logits(logits, batch[5], reduction="sum") / emb.shape[0]
    assert torch.allclose(got, base + 0.5 * by_hand, atol=1e-5)
    # fact_weight 0 adds nothing to the batch: the batches of today
    _, off = hand_batches(2)
    assert len(off(0)) == 5


def test_tiny_stage1_with_the_fact_head_trains_and_drops_it(tmp_path, monkeypatch):
    from open_clip_cxr_train import stage1_supcon
    from open_clip_cxr_train.text_stage import train
    seen = []

    def spy(logits, targets):       # the run really scores facts of its texts
        seen.append(float(targets.sum()))
        return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / logits.shape[0]

    monkeypatch.setattr(stage1_supcon, "fact_loss", spy)
    recipe = tiny_recipe(tmp_path, **{"supcon.fact_weight": 1.0, "supcon.cache": True, "supcon.steps": 6,
                                      "supcon.batch_size": 4, "mntp.steps": 0, "eval.enabled": False})
    train(recipe)
    out = Path(recipe["output_dir"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "supcon" and "loss_mean" not in r]
    assert len(losses) == 6 and all(x > 0 for x in losses)
    assert len(seen) == 6 and sum(seen) > 0
    # the exported tower holds no fact head: it is a training aid only
    from safetensors.torch import load_file
    weights = [f for f in out.rglob("*.safetensors") if "work" not in f.parts]
    assert weights
    for f in weights:
        assert not any(k.startswith("head.") or ".head.weight" in k for k in load_file(str(f))), f


def test_fact_weight_with_views_is_refused_in_one_line(tmp_path, capsys):
    from test_train_recipe_check import run_text
    rc = run_text(tmp_path, "supcon.views=3", "supcon.fact_weight=0.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "supcon.fact_weight" in err[0], err
    assert not (tmp_path / "run").exists()


def test_cosine_head_reads_the_direction_and_its_weights_cannot_grow():
    torch.manual_seed(0)
    emb = torch.randn(3, 8)
    wrapped = WithFactHead(torch.nn.Identity(), 8, cosine_scale=5.0)
    _, logits = wrapped(emb)
    w, b = wrapped.head.weight, wrapped.head.bias
    by_hand = 5.0 * F.cosine_similarity(emb[:, None, :], w[None, :, :], dim=-1) + b
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # ten times larger weights: the free linear head's logits move, the cosine head's do not
        wrapped.head.weight.mul_(10.0)
    torch.testing.assert_close(wrapped(emb)[1], logits)
    free = WithFactHead(torch.nn.Identity(), 8)
    free.head.load_state_dict(wrapped.head.state_dict())
    assert not torch.allclose(free(emb)[1], logits, atol=1e-3)
    assert logits.abs().sub(b.abs()).abs().max() <= 5.0 + 1e-5    # |scale x cos| is at most the scale


def test_cosine_scale_without_the_fact_head_is_refused_in_one_line(tmp_path, capsys):
    from test_train_recipe_check import run_text
    rc = run_text(tmp_path, "supcon.fact_weight=0", "supcon.fact_cosine_scale=10")   # the recipe has the head on
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "supcon.fact_weight" in err[0], err
    assert not (tmp_path / "run").exists()
