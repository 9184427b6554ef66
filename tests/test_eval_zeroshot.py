"""Zero-shot findings: rank AUC on constructed cases, label reading, and the prompt-ensemble path."""
import math
import random

import numpy as np
import pytest
import torch

from open_clip_cxr.eval import zeroshot as Z


def pairwise_auc(scores, labels):
    """Brute force: P(score_pos > score_neg) + 0.5 P(equal), over all pairs."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_constructed_cases():
    y = [0, 0, 1, 1, 1]
    assert Z.roc_auc([0.1, 0.2, 0.3, 0.4, 0.5], y) == 1.0
    assert Z.roc_auc([0.5, 0.4, 0.3, 0.2, 0.1], y) == 0.0
    assert Z.roc_auc([0.7] * 5, y) == 0.5
    assert Z.roc_auc([0.1, 0.3, 0.3, 0.9, 0.2], y) == pytest.approx(pairwise_auc([0.1, 0.3, 0.3, 0.9, 0.2], y))
    assert math.isnan(Z.roc_auc([0.1, 0.2], [1, 1]))
    assert Z.roc_auc([0.1, 0.9, 0.5], [0, 1, float("nan")]) == 1.0   # NaN labels are ignored


def test_auc_matches_pairwise_count_with_many_ties():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        labels = [rng.randint(0, 1) for _ in range(n)]
        if 0 < sum(labels) < n:
            assert Z.roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))


def test_label_matrix_ignores_uncertain_and_missing():
    labels = [{"Cardiomegaly": 1.0, "Edema": -1.0, "pleural_effusion": 0},
              {"Cardiomegaly": float("nan"), "Edema": None, "Pneumothorax": "1"},
              None]
    y = Z.label_matrix(labels, ["Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax"])
    assert y[0, 0] == 1 and np.isnan(y[0, 1]) and y[0, 2] == 0
    assert np.isnan(y[1, 0]) and np.isnan(y[1, 1]) and y[1, 3] == 1
    assert np.isnan(y[2]).all()


def test_prompt_ensemble_and_end_to_end():
    """A fake text encoder puts positive prompts on axis 2f and negatives on 2f+1 (f = finding)."""
    prompts = {"Cardiomegaly": (["big heart", "enlarged heart"], ["normal heart"]),
               "Edema": (["edema"], ["no edema", "clear lungs"])}
    axis = {"big heart": 0, "enlarged heart": 0, "normal heart": 1, "edema": 2, "no edema": 3, "clear lungs": 3}

    def encode_fn(texts):
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            out[i, axis[t]] = 1.0
        return out

    pos, neg = Z.prompt_embeddings(encode_fn, prompts)
    assert torch.allclose(pos[0], torch.tensor([1.0, 0, 0, 0])) and torch.allclose(neg[1], torch.tensor([0, 0, 0, 1.0]))
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1.0]]), dim=-1)
    labels = [{"Cardiomegaly": 1, "Edema": 0}, {"Cardiomegaly": 0, "Edema": 1},
              {"Cardiomegaly": 1, "Edema": -1}, {"Cardiomegaly": 0, "Edema": 0}]
    res = Z.evaluate_zeroshot(img, labels, encode_fn, logit_scale=10.0, prompts=prompts)
    assert res["per_finding"]["Cardiomegaly"] == {"auc": 1.0, "accuracy": 1.0, "n_pos": 2, "n_neg": 2, "support": 4}
    assert res["per_finding"]["Edema"]["n_pos"] == 1 and res["per_finding"]["Edema"]["n_neg"] == 2
    assert res["mean_auc"] == 1.0 and res["n_findings_scored"] == 2
    p = Z.finding_probabilities(img, pos, neg, 10.0)
    assert ((p > 0) & (p < 1)).all() and p[0, 0] > 0.99


def test_missing_class_reports_none_and_no_labels_raises():
    res = Z.score_findings(np.array([[0.2], [0.8]]), np.array([[1.0], [1.0]]), ["Edema"])
    assert res["per_finding"]["Edema"]["auc"] is None and res["mean_auc"] is None
    with pytest.raises(ValueError, match="no usable labels"):
        Z.evaluate_zeroshot(torch.zeros(1, 4), [{}], lambda t: torch.ones(len(t), 4))


def test_default_prompts_cover_chexpert():
    assert len(Z.FINDINGS) == 14 and "No Finding" in Z.PROMPTS
    assert all(len(p) >= 2 and len(n) >= 2 for p, n in Z.PROMPTS.values())


def test_auc_is_sklearns_and_support_is_counted():
    from sklearn.metrics import roc_auc_score
    s, y = [0.3, 0.1, 0.8, 0.8, 0.5, 0.2], [0, 0, 1, 0, 1, float("nan")]
    assert Z.roc_auc(s, y) == pytest.approx(roc_auc_score([0, 0, 1, 0, 1], s[:5]))
    res = Z.score_findings(np.array([[0.2], [0.8], [0.6]]), np.array([[0.0], [1.0], [np.nan]]), ["Nodule"])
    assert res["per_finding"]["Nodule"]["support"] == 2 and res["per_finding"]["Nodule"]["auc"] == 1.0


def test_load_prompts_and_its_errors(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("Nodule:\n  positive: [There is a nodule., A pulmonary nodule.]\n  negative: No nodule.\n")
    assert Z.load_prompts(good) == {"Nodule": (["There is a nodule.", "A pulmonary nodule."], ["No nodule."])}
    for text, msg in [("- a\n- b\n", "expected a mapping"), ("Nodule:\n  positive: [a]\n", "exactly the keys"),
                      ("Nodule:\n  positive: []\n  negative: [b]\n", "non-empty list"), ("a: [", "not valid YAML")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            Z.load_prompts(bad)


def test_select_prompts_matches_names_and_refuses_unknown_labels():
    sel = Z.select_prompts(Z.PROMPTS, ["cardiomegaly", "PLEURAL_EFFUSION"])
    assert list(sel) == ["cardiomegaly", "PLEURAL_EFFUSION"] and sel["cardiomegaly"] == Z.PROMPTS["Cardiomegaly"]
    with pytest.raises(ValueError, match="unknown label 'Nodule'.*--prompts"):
        Z.select_prompts(Z.PROMPTS, ["Cardiomegaly", "Nodule"])
    with pytest.raises(ValueError, match="'Edema' is in no image's metadata.*--label-cols"):
        Z.select_prompts(Z.PROMPTS, ["Edema"], available=["Cardiomegaly"])


def test_eval_cli_zeroshot_with_own_labels_and_prompts(tmp_path, monkeypatch):
    import argparse
    import json
    from test_eval_encode import TinyClip, TinyTokenizer, preprocess, write_shard
    from open_clip_cxr.eval import cli as C
    monkeypatch.setattr(C, "load_model", lambda args: (TinyClip(), preprocess, TinyTokenizer()))
    shard = write_shard(tmp_path / "test-000000.tar", studies={
        "s1": ("a", {"Nodule": 1, "Cardiomegaly": 0}), "s2": ("b", {"Nodule": 0}), "s3": ("c", {"Nodule": 1})})
    prompts = tmp_path / "p.yaml"
    prompts.write_text("Nodule:\n  positive: [a nodule]\n  negative: [no nodule]\n"
                       "Cardiomegaly:\n  positive: [big heart]\n  negative: [normal heart]\n")
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    base = ["--model", "tiny", "--shards", shard, "--out", str(tmp_path / "out"), "--task", "zeroshot"]
    assert C.run(p.parse_args(base + ["--labels", "Nodule", "--prompts", str(prompts)])) == 0
    res = json.load(open(tmp_path / "out" / "results.json"))["results"]
    assert list(res["per_finding"]) == ["Nodule"] and res["per_finding"]["Nodule"]["support"] == 4  # s2: 2 images
    assert res["per_finding"]["Nodule"]["n_pos"] == 2 and res["prompts"] == str(prompts)
    with pytest.raises(SystemExit, match="unknown label 'Nodule'"):          # built-in prompts have no Nodule
        C.run(p.parse_args(base + ["--labels", "Nodule"]))
    with pytest.raises(SystemExit, match="'Edema' is in no image's metadata"):
        C.run(p.parse_args(base + ["--labels", "Edema"]))
