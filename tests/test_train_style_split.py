"""Stage 1 trains on the training part of the style split, and never on a test split."""
import json
from pathlib import Path

import pytest

from open_clip_cxr.reports.lexicon import entries
from open_clip_cxr.reports.noise import HELDOUT_STYLES
from open_clip_cxr.reports.types import Report
from open_clip_cxr_train import common
from open_clip_cxr_train.supcon import report_texts, training_split
from open_clip_cxr_train.text_stage import load_reports

ROOT = Path(__file__).resolve().parents[1]


def _table(tmp_path: Path) -> Path:
    rows = [{"study": f"s{i}", "findings": f"Small right pleural effusion number {i}.", "impression": "Effusion.",
             "split": split} for i, split in enumerate(["train", "train", "test", "validate", "test", "train"])]
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _recipe(tmp_path: Path, split):
    recipe = common.load_recipe(str(ROOT / "training/recipes/text-cxr-llm-small-cpu-short.yaml"), [])
    recipe["data"] = {"source": "table", "path": str(_table(tmp_path)), "findings_col": "findings",
                      "impression_col": "impression", "study_col": "study", "split_col": "split", "split": split}
    return recipe


def test_training_reads_the_train_split_only(tmp_path):
    recipe = _recipe(tmp_path, "train")
    reports = load_reports(recipe["data"], training_split(recipe))
    assert [r.study_id for r in reports] == ["s0", "s1", "s5"]


@pytest.mark.parametrize("split", ["test", None, ""])
def test_test_split_is_refused_as_training_data(tmp_path, split):
    with pytest.raises(ValueError, match="test split"):
        training_split(_recipe(tmp_path, split))


def test_training_on_the_evaluation_split_is_refused(tmp_path):
    recipe = _recipe(tmp_path, "validate")
    with pytest.raises(ValueError, match="never evaluate on training data"):
        training_split(recipe)
    recipe["eval"]["enabled"] = False
    assert training_split(recipe) == "validate"


def test_stage_one_refuses_a_test_split_before_training(tmp_path):
    from open_clip_cxr_train.text_stage import train
    recipe = _recipe(tmp_path, "test")
    recipe.update(model="cxr-llm-tiny", output_dir=str(tmp_path / "out"))
    recipe["train"].update(log_with="none", num_threads=1)
    with pytest.raises(ValueError, match="official test split"):
        train(recipe)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_training_texts_come_from_the_training_part():
    r = Report("x", "test", findings="Small right pleural effusion. The lungs are otherwise clear. "
               "Status post coronary artery bypass graft. Right lower lobe consolidation.",
               impression="Small right pleural effusion. Normal heart size.")
    held_short = {s for e in entries("heldout") for s in e.short} - {s for e in entries("train") for s in e.short}
    for seed in range(2):
        texts = report_texts(r, seed)
        for t in texts.variants:     # (a fixed inserted-error sentence may name the SVC)
            assert not any(f" {s} " in f" {t} " or f" {s}." in f" {t}" for s in held_short), t
    # the held-out protocol's style names never appear as training styles
    from open_clip_cxr.reports.variants import VARIANT_STYLES
    assert not set(HELDOUT_STYLES) & set(VARIANT_STYLES)


def test_context_lines_share_no_line_with_the_heldout_headers():
    # the training side's non-finding lines must not be the held-out institution's: the held-out
    # row then asks whether the tower skips lines it never saw, not whether it knows them
    from open_clip_cxr.reports import noise, variants
    heldout = [h.rstrip(":").lower() for h in noise._EXAM_HEADERS + noise._COMPARISONS
               + noise._FINDINGS_HEADERS + noise._IMPRESSION_HEADERS]
    train = variants._TRAIN_EXAM_LINES + variants._TRAIN_COMPARISON_LINES + variants._TRAIN_SIGNOFF_LINES
    for line in train:
        assert not any(h in line.lower() for h in heldout if len(h) > 12), line
    r = Report("x", "test", findings="Small right pleural effusion. No pneumothorax.", impression="Right effusion.")
    seen = {v.text for seed in range(20) for v in variants.equivalent_variants(r, seed) if v.style == "context_lines"}
    assert len(seen) > 5
    for t in seen:   # the report itself is kept whole, between added lines
        assert "Small right pleural effusion. No pneumothorax." in t and t.count("\n") >= 1
        assert not any(h in t.lower() for h in heldout if len(h) > 12), t


def test_context_lines_p_wraps_that_share_of_the_rewrites_in_place():
    # supcon.context_lines_p: header lines over the rewrites, not a style of their own, so the
    # share of each rewrite style stays what it was
    from open_clip_cxr.reports import noise, variants
    from open_clip_cxr_train.supcon import report_texts
    train_lines = variants._TRAIN_EXAM_LINES + variants._TRAIN_COMPARISON_LINES + variants._TRAIN_SIGNOFF_LINES
    heldout = [h.lower() for h in noise._EXAM_HEADERS + noise._COMPARISONS]
    reports = [Report(f"r{i}", "test", findings=f"Small right pleural effusion. No pneumothorax. Heart size is {w}.",
                      impression="Right effusion.") for i, w in enumerate(("normal", "enlarged", "stable", "upper normal"))]
    wrapped = unwrapped = 0
    for r in reports:
        plain, none, every = report_texts(r, 3), report_texts(r, 3, context_lines_p=0.0), report_texts(r, 3, context_lines_p=1.0)
        assert none == plain                                            # off by default
        assert len(every.variants) == len(plain.variants) and every.negatives == plain.negatives
        for before, after in zip(plain.variants, every.variants):
            assert before in after and after != before                  # the rewrite kept whole, lines added
            i = after.index(before)
            added = (after[:i] + after[i + len(before):]).split("\n")
            assert all(x in train_lines for x in added if x)
            assert not any(h in after.lower() for h in heldout)
        half = report_texts(r, 3, context_lines_p=0.5)
        assert half == report_texts(r, 3, context_lines_p=0.5)         # seeded
        for before, after in zip(plain.variants, half.variants):
            wrapped += after != before
            unwrapped += after == before
    assert wrapped and unwrapped


def test_phrase_pairs_pair_a_short_form_with_its_expansion():
    import random
    from open_clip_cxr_train.supcon import phrase_pairs, sample_example
    text = "Small right pleural effusion. No pneumothorax. Left lower lobe atelectasis."
    pairs = phrase_pairs(text, seed=0)
    assert ("No PTX.", "No pneumothorax.") in [(s, lg) for s, lg, _ in pairs]
    for short, long, negs in pairs:
        assert short != long and short.lower() != long.lower()
        assert all(n != long for n in negs)
    r = Report("x", "test", findings=text, impression="Small right effusion.")
    texts = report_texts(r, 0, phrases=True)
    assert texts.phrases and all(s in texts.all_texts() for s, _, _ in texts.phrases)
    exs = [sample_example(texts, random.Random(i), p_sections=0.0, p_phrases=1.0) for i in range(8)]
    assert all(e.task == "phrase" for e in exs)
    assert {(e.anchor, e.positive) for e in exs} <= {p for s, lg, _ in pairs for p in ((s, lg), (lg, s))}
    assert report_texts(r, 0).phrases == []


def test_negative_seeds_draw_more_distinct_one_error_copies():
    from open_clip_cxr.reports.negatives import hard_negatives
    r = Report("x", "test", findings="The heart is normal in size. Small left pleural effusion. No pneumothorax. "
               "Mild right basilar atelectasis.", impression="Small left effusion. No acute disease.")
    one, three = report_texts(r, 0), report_texts(r, 0, negative_seeds=3)
    assert one.negatives == [v.text for v in hard_negatives(r, 0, part="train")]   # default unchanged
    assert set(one.negatives) < set(three.negatives) and len(set(three.negatives)) == len(three.negatives)
    assert all(len(three.sections[k]) >= len(one.sections[k]) for k in one.sections)
    assert three.base not in three.negatives
    # every copy is still drawn from the training part of the error templates
    held = {v.text for s in range(0, 3 * 7_919, 7_919) for v in hard_negatives(r, s, part="heldout")}
    train = {v.text for s in range(0, 3 * 7_919, 7_919) for v in hard_negatives(r, s, part="train")}
    assert set(three.negatives) == train and (held - train) and not (set(three.negatives) & (held - train))


def test_a_one_section_rewrite_draws_only_copies_it_can_tell_from_its_report():
    """`supcon.section_negatives`: an impression-only pair never gets a copy whose error lies in the
    findings alone (from the impression it reads like the report); off, the draws are as before."""
    import random
    from open_clip_cxr_train.supcon import ReportTexts, sample_example, section_negatives
    findings, impression = "Small left effusion. No pneumothorax.", "Left effusion."
    base = f"{findings} {impression}"
    in_findings = ["Small right effusion. No pneumothorax. Left effusion.", "Small left effusion. Pneumothorax. Left effusion."]
    in_impression = ["Small left effusion. No pneumothorax. Right effusion."]
    texts = ReportTexts(base, ["rewrite one.", "rewrite two.", findings, impression], in_findings + in_impression,
                        {findings: ["Small right effusion. No pneumothorax."], impression: ["Right effusion."]})
    assert section_negatives(texts, impression) == in_impression + ["Right effusion."]
    assert section_negatives(texts, findings) == in_findings + ["Small right effusion. No pneumothorax."]
    on = [sample_example(texts, random.Random(i), p_sections=0.0, n_negatives=3, one_section_negatives=True)
          for i in range(200)]
    off = [sample_example(texts, random.Random(i), p_sections=0.0, n_negatives=3) for i in range(200)]
    for a, b in zip(on, off):
        assert (a.anchor, a.positive) == (b.anchor, b.positive)      # the same pairs: only the negatives differ
        rewrite = a.anchor if a.positive == base else a.positive
        if rewrite == impression:
            assert a.negatives and not set(a.negatives) & set(in_findings)
        elif rewrite == findings:
            assert set(a.negatives) <= set(in_findings) | {"Small right effusion. No pneumothorax."}
        else:
            assert a.negatives == b.negatives and set(b.negatives) <= set(texts.negatives)
    assert any(set(b.negatives) & set(in_findings) for a, b in zip(on, off) if impression in (a.anchor, a.positive))
