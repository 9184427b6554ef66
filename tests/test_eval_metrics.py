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


@pytest.fixture(scope="module")
def minilm_scorer():
    try:
        TM.minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return TM.BertScorer("minilm")


def test_bertscore_package_with_the_shipped_minilm(minilm_scorer):
    out = minilm_scorer.score([REFS[0], "Small left pleural effusion.", "Total nonsense about zebras."], REFS)
    f = out["per_pair_f1"]
    assert f[0] == pytest.approx(1.0, abs=1e-5)
    assert f[1] > f[2]
    assert 0 < out["f1"] < 1
    assert minilm_scorer.settings["num_layers"] == 6 and minilm_scorer.settings["idf"] is False
    m = TM.text_metrics(REFS, REFS, bert_scorer=minilm_scorer, meteor=False)
    assert m["BERTScore-F1"] == pytest.approx(1.0, abs=1e-5) and m["BERTScore-settings"]["model"].startswith("all-MiniLM")


def test_bertscore_idf_and_baseline_options(tmp_path, minilm_scorer):
    cands = ["The heart is large.", "Small left pleural effusion.", "Total nonsense about zebras."]
    plain = minilm_scorer.score(cands, REFS)["per_pair_f1"]
    idf = TM.BertScorer("minilm", idf=True).score(cands, REFS)["per_pair_f1"]
    assert idf != pytest.approx(plain, abs=1e-3)           # idf from the references ('.' in all: weight 0)
    base = tmp_path / "baseline.tsv"                     # bert-score's format: one row per layer
    base.write_text("LAYER,P,R,F\n" + "".join(f"{i},0.5,0.5,0.5\n" for i in range(7)))
    rescaled = TM.BertScorer("minilm", rescale_with_baseline=True, baseline_path=str(base)).score(cands, REFS)
    assert rescaled["per_pair_f1"] == pytest.approx([(x - 0.5) / 0.5 for x in plain], abs=1e-4)
    with pytest.raises(FileNotFoundError, match="no BERTScore baseline"):
        TM.BertScorer("minilm", rescale_with_baseline=True)   # bert-score has no baseline for MiniLM


def test_bertscore_model_absent_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not available locally"):
        TM.BertScorer(str(tmp_path / "no-such-model"))


def test_radgraph_and_chexbert_without_weights_say_what_is_missing(tmp_path, monkeypatch):
    from open_clip_cxr.eval import clinical_metrics as CM
    with pytest.raises(CM.MetricUnavailableError, match="package is not installed"):
        CM._package_cache("no_such_package_xyz", "x")
    with pytest.raises(CM.MetricUnavailableError, match="no radgraph weights in .*cannot be downloaded offline"):
        CM.check_radgraph("radgraph", model_cache_dir=str(tmp_path))
    folder = tmp_path / "radgraph"
    folder.mkdir()
    (folder / "weights.th").write_bytes(b"")
    (folder / "config.json").write_text('{"model": {"embedder": {"token_embedders": {"bert": '
                                        '{"model_name": "no-such-org/no-such-encoder"}}}}}')
    with pytest.raises(CM.MetricUnavailableError, match="encoder 'no-such-org/no-such-encoder' is not in"):
        CM.check_radgraph("radgraph", model_cache_dir=str(tmp_path))
    with pytest.raises(CM.MetricUnavailableError, match="unknown RadGraph model"):
        CM.check_radgraph("radgraph-xxl")
    with pytest.raises(CM.MetricUnavailableError, match="no CheXbert weights"):
        CM.check_chexbert(str(tmp_path))
    (tmp_path / "chexbert.pth").write_bytes(b"")
    monkeypatch.setattr(CM, "in_hf_cache", lambda repo: False)
    with pytest.raises(CM.MetricUnavailableError, match="bert-base-uncased"):
        CM.check_chexbert(str(tmp_path))
    monkeypatch.setattr(CM, "_package_cache", lambda package, app: str(tmp_path / "empty"))
    with pytest.raises(CM.MetricUnavailableError, match="no CheXbert weights"):
        RG.evaluate_report_generation(REFS, REFS, meteor=False, chexbert=True)


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
        return {"summary": {"green": 0.5, "green_std": 0.1, "n_unparsed": 1}, "per_report": [{}] * len(refs)}

    out = RG.evaluate_report_generation(REFS, REFS, judge=judge, meteor=False)
    assert out["metrics"]["GREEN"] == 0.5 and out["metrics"]["GREEN_unparsed"] == 1 and out["metrics"]["GREEN_std"] == 0.1
    assert out["metrics"]["ROUGE-L"] == pytest.approx(1.0) and calls == [3]
