"""Several positives per report in stage 1's contrastive step (`supcon.views`, issue 19).

The multi-view SupCon loss against a plain double loop, the batches it is fed (V = 2 unchanged,
V = 4: four distinct texts of each report), and a tiny stage-1 run with `supcon.views: 3`.
"""
import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from open_clip_cxr_train.supcon import ReportTexts, text_key
from open_clip_cxr_train.supcon_loss import multiview_supcon_loss
from open_clip_cxr_train.stage1_supcon import SupconBatches, SupconData, multiview_step, supcon_step
from test_train_text import tiny_recipe


pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")   # conftest.py


# ---------------------------------------------------------------- the loss

def reference_loss(views, owner, negs, neg_owner, keys, neg_keys, t):
    """SupCon L_out written out: for each query, -mean over its positives of log softmax, the
    softmax over every other valid text except texts of other reports equal to one of mine."""
    v, n = F.normalize(views, dim=-1), F.normalize(negs, dim=-1)
    losses = []
    for i in range(len(v)):
        if owner[i] < 0:
            continue
        mine = {keys[k] for k in range(len(v)) if owner[k] == owner[i]}
        pos = [j for j in range(len(v)) if j != i and owner[j] == owner[i]]
        if not pos:
            continue
        others = [v[j] for j in range(len(v)) if j != i and owner[j] >= 0
                  and (owner[j] == owner[i] or keys[j] not in mine)]
        others += [n[h] for h in range(len(n)) if neg_owner[h] >= 0 and neg_keys[h] not in mine]
        log_z = torch.logsumexp(torch.stack([v[i] @ c for c in others]) / t, 0)
        losses.append(-torch.stack([v[i] @ v[p] / t - log_z for p in pos]).mean())
    return torch.stack(losses).mean()


def _views_case():
    """3 reports x 3 views and one padding row; 5 hard-negative rows, one padding; view 4 (report 1)
    is the text of view 0 (report 0), and negative 2 (of report 0) the text of view 7 (report 2)."""
    g = torch.Generator().manual_seed(0)
    views, negs = torch.randn(10, 8, generator=g), torch.randn(5, 8, generator=g)
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
    neg_owner = torch.tensor([0, 0, 0, 1, -1])
    keys = torch.arange(100, 110)
    keys[4] = keys[0]
    views[4] = views[0]
    neg_keys = torch.arange(200, 205)
    neg_keys[2] = keys[7]
    return views, owner, negs, neg_owner, keys, neg_keys


def test_multiview_loss_equals_the_double_loop_reference():
    views, owner, negs, neg_owner, keys, neg_keys = _views_case()
    got_v, got_n = views.clone().requires_grad_(True), negs.clone().requires_grad_(True)
    ref_v, ref_n = views.clone().requires_grad_(True), negs.clone().requires_grad_(True)
    got = multiview_supcon_loss(got_v, owner, got_n, neg_owner, 0.1, keys, neg_keys)
    ref = reference_loss(ref_v, owner.tolist(), ref_n, neg_owner.tolist(), keys.tolist(), neg_keys.tolist(), 0.1)
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    got.backward()
    ref.backward()
    torch.testing.assert_close(got_v.grad, ref_v.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_n.grad, ref_n.grad, atol=1e-5, rtol=1e-4)
    # the duplicates really are masked: without keys the loss differs
    assert multiview_supcon_loss(views, owner, negs, neg_owner, 0.1).item() != pytest.approx(ref.item(), abs=1e-3)


def _two_rank_case():
    """Each of 2 ranks: 2 reports x 3 views and a padding row, 3 hard negatives (one padding);
    rank 1's view 0 is the text of rank 0's view 1, and rank 1's negative 0 that of rank 0's view 4."""
    g = torch.Generator().manual_seed(1)
    views, negs = torch.randn(14, 8, generator=g), torch.randn(6, 8, generator=g)
    owner = torch.tensor([0, 0, 0, 1, 1, 1, -1, 0, 0, 0, -1, 1, 1, 1])      # local ids, per rank
    neg_owner = torch.tensor([0, 1, -1, 1, 0, -1])
    keys, neg_keys = torch.arange(100, 114), torch.arange(200, 206)
    keys[7], views[7] = keys[1], views[1]
    neg_keys[3], negs[3] = keys[4], views[4]
    return views, owner, negs, neg_owner, keys, neg_keys


def _rank_loss(rank, world, port, out):
    import os
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    views, owner, negs, neg_owner, keys, neg_keys = _two_rank_case()
    rv, rn = slice(7 * rank, 7 * rank + 7), slice(3 * rank, 3 * rank + 3)
    v, n = views[rv].clone().requires_grad_(True), negs[rn].clone().requires_grad_(True)
    loss = multiview_supcon_loss(v, owner[rv], n, neg_owner[rn], 0.1, keys[rv], neg_keys[rn])
    loss.backward()
    torch.save({"loss": loss.item(), "grads": [v.grad, n.grad]}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_multiview_loss_across_two_processes_equals_one_process(tmp_path):
    """Two gloo processes with half of the reports each (6 queries each): the mean of their losses
    is the one-process loss (report ids made global), and each one's gradients are twice the
    one-process gradients of its rows (the all-gather sums both losses' gradients)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_loss, args=(2, port, str(tmp_path / "rank")), nprocs=2)
    views, owner, negs, neg_owner, keys, neg_keys = _two_rank_case()
    owner = torch.where(owner >= 0, owner + 2 * (torch.arange(14) >= 7), owner)     # global report ids
    views.requires_grad_(True)
    negs.requires_grad_(True)
    loss = multiview_supcon_loss(views, owner, negs, neg_owner, 0.1, keys, neg_keys)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in range(2)]
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(loss.item(), abs=1e-5)
    for i, full in enumerate((views.grad, negs.grad)):
        torch.testing.assert_close(torch.cat([r["grads"][i] for r in ranks]) / 2, full, atol=1e-6, rtol=1e-4)
    ref = reference_loss(views.detach(), owner.tolist(), negs.detach(), neg_owner.tolist(), keys.tolist(),
                         neg_keys.tolist(), 0.1)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_multiview_loss_lower_when_views_agree():
    torch.manual_seed(0)
    centre = torch.randn(4, 16).repeat_interleave(3, 0)
    owner = torch.arange(4).repeat_interleave(3)
    aligned = multiview_supcon_loss(centre + 0.05 * torch.randn(12, 16), owner)
    shuffled = multiview_supcon_loss(centre[torch.randperm(12)] + 0.05 * torch.randn(12, 16), owner)
    assert aligned < 1.0 < shuffled


# ---------------------------------------------------------------- the batches

def hand_texts(i: int) -> ReportTexts:
    """Report i: 1 + i % 4 rewrites (and one that is the report in capitals), 3 one-error copies,
    findings and impression for odd i."""
    return ReportTexts(f"report {i}. no effusion.",
                       [f"rewrite {k} of report {i}." for k in range(1 + i % 4)] + [f"REPORT {i}.  No effusion."],
                       [f"report {i}. {w} effusion." for w in ("left", "right", "large")],
                       {f"findings {i}.": [f"findings {i} error."], f"impression {i}.": [f"impression {i} error."]}
                       if i % 2 else {})


class BagOfTokens(torch.nn.Module):
    """A fixed random embedding per token, averaged: texts -> vectors without a language model."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(70_000, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return self.table[ids].mean(1)


def hand_batches(views: int, **scfg):
    import open_clip
    import open_clip_cxr  # noqa: F401
    run = types.SimpleNamespace(seed=3, tokenizer=open_clip.get_tokenizer("cxr-llm-tiny"), max_length=32, pad=0,
                                world=1, rank=0)
    data = SupconData(BagOfTokens(), lambda i, epoch: hand_texts(i), 7)
    return data.module, SupconBatches(run, {"batch_size": 4, "n_negatives": 2, "views": views, **scfg}, data)


def test_two_views_keep_todays_batches_and_loss():
    """Recorded on the code before `supcon.views` existed (commit 591913d), same texts and seed."""
    module, batches = hand_batches(2)
    digest = hashlib.sha256()
    for m in range(3):
        for e in batches.examples(m):
            digest.update(repr((e.anchor, e.positive, e.negatives, e.task)).encode())
    assert digest.hexdigest() == "5ebb59be08858f293c8b959a423169b9494cf41dc0dde815392d61b5288074a7"
    with torch.no_grad():
        losses = [supcon_step(module, batches(m), "cpu", 4, 2, 0.05, True)[0].item() for m in range(3)]
    assert losses == pytest.approx([2.2142295837402344, 1.80112886428833, 2.0032501220703125], abs=1e-5)


def test_four_views_hold_the_report_and_distinct_rewrites():
    module, batches = hand_batches(4, p_sections=0.0)
    seen = set()
    for m in range(4):
        groups = batches.examples(m)
        assert len(groups) == 4
        for g in groups:
            base = next(t for t in g.texts if t.startswith("report "))
            i = int(base.split()[1].rstrip("."))
            n_rewrites = 1 + i % 4          # the capitals copy is the report, not a view of its own
            assert g.texts[0] == base and len(g.texts) == min(4, 1 + n_rewrites), g.texts
            assert len({text_key(t) for t in g.texts}) == len(g.texts)
            assert g.negatives and not set(g.negatives) & set(g.texts)
            seen.add(len(g.texts))
        batch = batches(m)
        assert batch[1].tolist() == [j * 4 + k for j, g in enumerate(groups) for k in range(len(g.texts))]
        loss, samples, _ = multiview_step(module, batch, "cpu", 4, 4, 2, 0.05)
        assert samples == 4 and torch.isfinite(loss) and loss > 0
        loss.backward()
        assert torch.isfinite(module.table.grad).all() and module.table.grad.abs().sum() > 0
    assert seen == {2, 3, 4}    # reports with fewer rewrites give fewer views, not repeats
    # sections: findings and impression, two views
    _, batches = hand_batches(4, p_sections=1.0)
    odd = [g for m in range(3) for g in batches.examples(m) if g.task == "sections"]
    assert odd and all(len(g.texts) == 2 and g.texts[0].startswith("findings") for g in odd)


# ---------------------------------------------------------------- a tiny stage-1 run

def test_tiny_stage1_with_three_views_trains(tmp_path, monkeypatch):
    from open_clip_cxr_train import stage1_supcon
    from open_clip_cxr_train.text_stage import train
    views_per_report = []

    def spy(views, report_ids, *args, **kw):     # the run really scores 3 views of each report
        views_per_report.append(torch.bincount(report_ids[report_ids >= 0]).tolist())
        return multiview_supcon_loss(views, report_ids, *args, **kw)

    monkeypatch.setattr(stage1_supcon, "multiview_supcon_loss", spy)
    # every step reads all 8 reports, each as the report and its 2 kept rewrites: the same texts
    # each step (in another order), so the loss must fall
    recipe = tiny_recipe(tmp_path, **{"supcon.views": 3, "supcon.cache": True, "supcon.steps": 8,
                                      "supcon.batch_size": 8, "supcon.max_variants": 2, "supcon.p_sections": 0.0,
                                      "supcon.lr": 3e-3, "supcon.head_lr": 1e-2, "mntp.steps": 0, "supcon.fact_weight": 0.0,
                                      "eval.enabled": False})
    train(recipe)
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "supcon" and "loss_mean" not in r]
    assert len(losses) == 8 and all(x > 0 for x in losses)
    assert views_per_report == [[3] * 8] * 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_negative_weight_counts_each_hard_negative_w_times():
    """w = 3 equals the plain loss with every valid hard negative repeated three times."""
    from open_clip_cxr_train.supcon_loss import supcon_loss
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 8)
    valid = torch.tensor([True, True, False, True, True, False, True, True])
    weighted = supcon_loss(a, p, n, 0.1, negative_valid=valid, symmetric=True, negative_weight=3.0)
    repeated = supcon_loss(a, p, n.repeat(3, 1), 0.1, negative_valid=valid.repeat(3), symmetric=True)
    assert torch.allclose(weighted, repeated, atol=1e-5)
    plain = supcon_loss(a, p, n, 0.1, negative_valid=valid, symmetric=True)
    assert torch.allclose(plain, supcon_loss(a, p, n, 0.1, negative_valid=valid, symmetric=True,
                                             negative_weight=1.0))
    assert weighted > plain      # the negatives weigh more in the denominator
    with pytest.raises(ValueError, match="negative_weight"):
        supcon_loss(a, p, n, 0.1, negative_weight=0.0)
