"""Report-generation metrics on tiny examples, and nearest-report generation."""
import shutil

import pytest
import torch

from open_clip_cxr.eval import report_gen as RG
from open_clip_cxr.eval import text_metrics as TM

REFS = ["The heart is normal in size. The lungs are clear.", "Small left pleural effusion with atelectasis.",
        "Right lower lobe pneumonia. No pneumothorax."]


def test_tokenize_drops_case_and_punctuation():
    assert TM.tokenize("No  acute, cardio-pulmonary\nprocess.") == "no acute cardio pulmonary process"


def test_coco_metrics_identical_and_disjoint():
    same = TM.coco_metrics(REFS, REFS, meteor=False)
    for n in range(1, 5):
        assert same[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0)
    assert same["CIDEr"] > 1.0
    assert same["notes"] == ["METEOR not computed (disabled)"]
    other = TM.coco_metrics(["zebra giraffe okapi"] * 3, REFS, meteor=False)
    assert other["BLEU-1"] < 0.01 and other["ROUGE-L"] == 0.0 and other["CIDEr"] == pytest.approx(0.0, abs=1e-6)


def test_partial_overlap_orders_metrics_and_empty_candidate():
    good = TM.coco_metrics(["The heart is normal. The lungs are clear.", "Small left effusion.", "Right lower lobe pneumonia."],
                           REFS, meteor=False)
    bad = TM.coco_metrics(["Lungs.", "Effusion.", ""], REFS, meteor=False)
    assert good["BLEU-1"] > bad["BLEU-1"] and good["ROUGE-L"] > bad["ROUGE-L"]
    with pytest.raises(ValueError):
        TM.coco_metrics(["a"], ["a", "b"])


def test_meteor_skipped_with_a_note_without_java(monkeypatch):
    monkeypatch.setattr(TM.shutil, "which", lambda name: None)
    out = TM.coco_metrics(REFS, REFS)
    assert "METEOR" not in out and "java" in out["notes"][0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_with_java():
    out = TM.coco_metrics(REFS, REFS)
    assert out["METEOR"] > 0.9
    worse = TM.coco_metrics(["Lungs clear.", "Effusion.", "Pneumonia."], REFS)
    assert worse["METEOR"] < out["METEOR"]


def test_bertscore_greedy_matching_by_hand():
    a = torch.eye(3)                                  # three orthogonal tokens
    p, r, f = TM.BertScorer.greedy_match(a, a)
    assert (p, r, f) == (1.0, 1.0, 1.0)
    p, r, f = TM.BertScorer.greedy_match(a[:1], a)   # candidate matches one of three reference tokens
    assert p == 1.0 and r == pytest.approx(1 / 3) and f == pytest.approx(0.5)
    assert TM.BertScorer.greedy_match(a[:0], a) == (0.0, 0.0, 0.0)


def test_bertscore_with_the_shipped_minilm():
    try:
        scorer = TM.BertScorer(TM.minilm_dir())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = scorer.score([REFS[0], "Small left pleural effusion.", "Total nonsense about zebras."], REFS)
    f = out["per_pair_f1"]
    assert f[0] == pytest.approx(1.0, abs=1e-5)
    assert f[1] > f[2]
    assert 0 < out["f1"] < 1
    m = TM.text_metrics(REFS, REFS, bert_scorer=scorer, meteor=False)
    assert m["BERTScore-F1"] == pytest.approx(1.0, abs=1e-5)


def test_retrieve_reports_excludes_own_study_and_joins_distinct():
    bank_text = ["A normal.", "B effusion.", "B effusion.", "C pneumonia."]
    bank_ids = ["s1", "s2", "s3", "s4"]
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.9, 0.1, 0], [0, 0, 1.0]]), dim=-1)
    q = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    gen, used = RG.retrieve_reports(q, ["s1", "s9"], bank, bank_ids, bank_text, k=1)
    assert gen == ["B effusion.", "C pneumonia."]               # s1's own report is excluded
    gen, used = RG.retrieve_reports(q, ["s1", "s9"], bank, bank_ids, bank_text, k=2, joiner=" | ")
    assert gen[0] == "B effusion. | C pneumonia."               # the duplicate "B effusion." joined once
    assert used[0][0] in ("s2", "s3")
    with pytest.raises(ValueError, match="outside its own study"):
        RG.retrieve_reports(q[:1], ["s1"], bank[:1], ["s1"], bank_text[:1])
    with pytest.raises(ValueError, match="empty"):
        RG.retrieve_reports(q, ["a", "b"], bank[:0], [], [])


def test_evaluate_report_generation_with_a_fake_judge():
    calls = []

    def judge(refs, cands):
        calls.append(len(refs))
        return {"summary": {"green": 0.5, "n_unparsed": 1}, "per_report": [{}] * len(refs)}

    out = RG.evaluate_report_generation(REFS, REFS, judge=judge, meteor=False)
    assert out["metrics"]["GREEN"] == 0.5 and out["metrics"]["GREEN_unparsed"] == 1
    assert out["metrics"]["ROUGE-L"] == pytest.approx(1.0) and calls == [3]
