"""Text-level retrieval matching (`eval --task retrieval --match text|both`) on constructed duplicates."""
import csv
import json

import pytest
import torch

from open_clip_cxr.eval import retrieval as R


def _n(*xs):
    return torch.nn.functional.normalize(torch.tensor(xs, dtype=torch.float32), dim=-1)


@pytest.mark.parametrize("a,b", [
    ("No acute cardiopulmonary process.", "  NO ACUTE\ncardiopulmonary   process. "),
    ("1. Small left effusion.\n2. Cardiomegaly.", "Small left effusion. 2. Cardiomegaly."),
    ("(1) Small left effusion; (2) cardiomegaly", "small left effusion; cardiomegaly"),
    ("- Clear lungs.\n- No effusion.", "Clear lungs. No effusion."),
])
def test_normalize_equates_case_space_and_numbering(a, b):
    assert R.normalize_report(a) == R.normalize_report(b)


@pytest.mark.parametrize("a,b", [
    ("Nodule 1.5 cm.", "Nodule 5 cm."),                        # a decimal is not a list number
    ("Grade 2. No effusion.", "Grade 3. No effusion."),        # nor a number ending a sentence
    ("Left effusion.", "Right effusion."),
    ("No effusion.", "No effusion"),                           # punctuation stays
])
def test_normalize_keeps_what_carries_meaning(a, b):
    assert R.normalize_report(a) != R.normalize_report(b)


@pytest.fixture
def dupes():
    """Seven studies, three pairs of reports that read the same, one report alone; the
    embeddings put each image nearest to the *other* study of its pair, or tie the pair."""
    texts = ["No acute cardiopulmonary process.",            # A  \ the same after normalising
             "NO ACUTE  cardiopulmonary process.",           # B  /
             "1. Small left effusion.\n2. Cardiomegaly.",     # C  \ the same
             "Small left effusion. 2. Cardiomegaly.",        # D  /
             "Right upper lobe pneumonia.",                  # E  alone
             "Cardiomegaly.",                                # F  \ identical text, identical embedding
             "Cardiomegaly."]                                # G  /
    studies = list("ABCDEFG")
    text_emb = torch.stack([_n(1, 0, 0, 0, 0, 0), _n(1, .3, 0, 0, 0, 0), _n(0, 0, 1, 0, 0, 0),
                          _n(0, 0, 1, .3, 0, 0), _n(0, 0, 0, 0, 1, 0), _n(0, 0, 0, 0, 0, 1), _n(0, 0, 0, 0, 0, 1)])
    image_study = ["A", "B", "C", "D", "E", "E", "F", "G"]
    image_emb = torch.stack([_n(1, .5, 0, 0, 0, 0),     # A's image: B's report first (study miss, text hit)
                           _n(1, 0, 0, 0, 0, 0),       # B's image: A's report first (study miss, text hit)
                           _n(0, 0, 1, .5, 0, 0),      # C's image: D's report first (study miss, text hit)
                           _n(0, 0, 0, 1, 0, 0),       # D's image: D's report (hit)
                           _n(0, 0, 0, 0, 1, .1),      # E's image: E's report (hit)
                           _n(1, 0, 0, 0, .01, 0),     # E's second image: A's report (a miss at both levels)
                           _n(0, 0, 0, 0, 0, 1),       # F's image: F and G tie (pessimistic study miss, text hit)
                           _n(0, 0, 0, 0, 0, 1)])      # G's image: the same
    return image_emb, image_study, text_emb, studies, texts


def brute_t2i_r1(image_emb, image_study, text_emb, studies, groups):
    """report->image R@1 by the full matrix: the top image's group equals the query's (ties: pessimistic)."""
    g_of = dict(zip(studies, groups))
    hits = 0
    for q, gq in zip(text_emb, groups):
        s = image_emb @ q
        true = torch.tensor([g_of[st] == gq for st in image_study])
        best = s[true].max()
        hits += int(((s >= best - 1e-6) & ~true).sum() == 0)
    return hits / len(groups)


def test_study_and_text_level_on_constructed_duplicates(dupes):
    image_emb, image_study, text_emb, studies, texts = dupes
    res = R.recall_by_match(image_emb, image_study, text_emb, studies, texts, match="both", ks=(1, 5))
    study, text = res["by_match"]["study"], res["by_match"]["text"]
    assert res["n_distinct_reports"] == 4 and res["n_reports"] == 7 and res["match"] == "both"
    assert study["image_to_text"]["R@1"] == pytest.approx(2 / 8)      # D's and E's first image
    assert text["image_to_text"]["R@1"] == pytest.approx(7 / 8)       # all but E's second image
    norm = [R.normalize_report(t) for t in texts]
    assert study["text_to_image"]["R@1"] == pytest.approx(brute_t2i_r1(image_emb, image_study, text_emb, studies, studies))
    assert text["text_to_image"]["R@1"] == pytest.approx(brute_t2i_r1(image_emb, image_study, text_emb, studies, norm))
    assert text["text_to_image"]["R@1"] > study["text_to_image"]["R@1"]
    # the top level stays the study level (what existing readers of results.json expect)
    assert res["image_to_text"] == study["image_to_text"] and res["mean_recall"] == study["mean_recall"]
    only_text = R.recall_by_match(image_emb, image_study, text_emb, studies, texts, match="text", ks=(1, 5))
    assert only_text["image_to_text"] == text["image_to_text"] and set(only_text["by_match"]) == {"text"}


def test_text_level_never_below_study_level(dupes):
    """A superset of true items can only lower a rank: text-level recall >= study-level, any K."""
    g = torch.Generator().manual_seed(1)
    _, _, _, _, texts = dupes
    n = 40
    reports = [texts[i % len(texts)] for i in range(n)]
    studies = [f"s{i}" for i in range(n)]
    text_emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    image_study = studies + studies[:10]
    image_emb = torch.nn.functional.normalize(torch.randn(len(image_study), 8, generator=g), dim=-1)
    res = R.recall_by_match(image_emb, image_study, text_emb, studies, reports, match="both", ks=(1, 5, 10))
    for d in ("image_to_text", "text_to_image"):
        for k, v in res["by_match"]["study"][d].items():
            assert res["by_match"]["text"][d][k] >= v


def test_bad_match_and_misaligned_texts(dupes):
    image_emb, image_study, text_emb, studies, texts = dupes
    with pytest.raises(ValueError, match="match must be one of"):
        R.recall_by_match(image_emb, image_study, text_emb, studies, texts, match="report")
    with pytest.raises(ValueError, match="6 report texts for 7 reports"):
        R.recall_by_match(image_emb, image_study, text_emb, studies, texts[:6], match="text")


def test_cli_match_both_writes_both_levels(tmp_path):
    """`eval --task retrieval --match both` on shards whose 16 studies carry 8 distinct reports."""
    from open_clip_cxr.cli import main
    from test_train_clip import write_shards
    urls = write_shards(tmp_path / "shards", "test", 16)
    out = tmp_path / "eval"
    torch.manual_seed(0)
    rc = main(["eval", "--task", "retrieval", "--model", "cxr-llm-tiny", "--shards", urls, "--out", str(out),
               "--match", "both", "--ks", "1", "5", "--batch-size", "8"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["match"] == "both" and res["n_reports"] == 16 and res["n_distinct_reports"] == 8
    study, text = res["by_match"]["study"], res["by_match"]["text"]
    for d in ("image_to_text", "text_to_image"):
        assert all(text[d][k] >= study[d][k] for k in ("R@1", "R@5"))
    with open(out / "image_to_text_topk.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and all(int(r["true_rank_text"]) <= int(r["true_rank"]) for r in rows)
