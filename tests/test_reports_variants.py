"""Lexicon, mention checker, equivalent variants and hard negatives on hand-written reports."""
import random
import re
from collections import Counter

import pytest

from open_clip_cxr.reports import (ERROR_TYPES, LEXICON, VARIANT_STYLES, Report, Variant, abbreviate,
                                   classify_edit, equivalent_variants, expand, extract_mentions,
                                   hard_negatives, join_sections, make_variants, mention_keys)
from open_clip_cxr.reports.clean import clean_text
from open_clip_cxr.reports.negatives import _AFFIRM_TEMPLATES, _NEGATE_TEMPLATES
from open_clip_cxr.reports.style_split import part_of

# Hand-written (findings, impression) pairs in the styles of several institutions:
# full sentences, telegraphic, organ sub-headings, numbered impressions, abbreviations.
REPORTS = [
    ("PA and lateral views of the chest. The lungs are clear without focal consolidation, pleural effusion, "
     "or pneumothorax. Heart size is normal. The osseous structures are intact.",
     "No acute cardiopulmonary process."),
    ("There is a small left pleural effusion with adjacent left basilar atelectasis. No pneumothorax. "
     "The cardiomediastinal silhouette is normal.", "Small left pleural effusion."),
    ("Right IJ central venous catheter tip in the SVC. ETT terminates 4 cm above the carina. NG tube courses "
     "below the diaphragm. No PTX.", "Lines and tubes in appropriate position. No pneumothorax."),
    ("Moderate cardiomegaly. Mild pulmonary edema. Small bilateral pleural effusions.",
     "Findings consistent with CHF with mild pulmonary edema."),
    ("The heart is mildly enlarged. There is no pleural effusion. Right lower lobe opacity may reflect "
     "atelectasis or pneumonia.", "RLL opacity, possibly pneumonia in the appropriate clinical setting."),
    ("Large right pneumothorax with leftward mediastinal shift. No left pneumothorax.",
     "Large right pneumothorax. Findings were discussed with Dr. ___ at 3:15 p.m."),
    ("S/p median sternotomy and CABG. Stable mild cardiomegaly. No focal consolidation. No pleural effusion "
     "or pneumothorax.", "No acute cardiopulmonary abnormality."),
    ("Left-sided PICC terminates in the mid SVC. Lungs are clear. No effusion.",
     "Left PICC in the SVC. No acute process."),
    ("Heart size is top-normal. There is a moderate right pleural effusion, increased from ___. Mild left "
     "basilar atelectasis.", "Increased moderate right pleural effusion."),
    ("Lungs: clear. Pleura: no effusion, no pneumothorax. Heart: normal size. Bones: no acute fracture.",
     "Normal chest radiograph."),
    ("There is no evidence of pneumothorax. A left chest tube is in place. Small left apical pneumothorax is "
     "not seen.", "Left chest tube in place without pneumothorax."),
    ("Low lung volumes. Bibasilar atelectasis. No large pleural effusion.",
     "Low lung volumes with bibasilar atelectasis."),
    ("Nodular opacity in the right upper lobe measuring 1.5 cm. No pleural effusion.",
     "1.5 cm RUL nodular opacity. Recommend CT for further evaluation."),
    ("Hyperinflated lungs consistent with COPD. No focal consolidation. No pneumothorax.",
     "COPD without acute cardiopulmonary process."),
    ("Left chest wall pacemaker with leads in the right atrium and right ventricle. Mild cardiomegaly. "
     "No edema.", "Mild cardiomegaly without pulmonary edema."),
    ("Moderate to severe pulmonary edema. Moderate bilateral pleural effusions. The cardiac silhouette is "
     "enlarged.", "Moderate to severe pulmonary edema and cardiomegaly."),
    ("", "No acute cardiopulmonary process."),
    ("", "1. Small right pleural effusion. 2. No pneumothorax."),
    ("Consolidation in the left lower lobe. No effusion.", ""),
    ("There is a moderate hiatal hernia. The lungs are clear. No pneumothorax.",
     "Moderate hiatal hernia. No acute process."),
    ("AP portable upright view of the chest. Endotracheal tube tip is 5 cm above the carina. Enteric tube "
     "tip in the stomach. Right IJ line tip at the cavoatrial junction. Mild vascular congestion. "
     "No pneumothorax.", "Support devices as above. Mild pulmonary vascular congestion."),
    ("Interval removal of the right chest tube. Tiny right apical pneumothorax. Stable small right pleural "
     "effusion.", "Tiny right apical pneumothorax after chest tube removal."),
    ("Patchy opacities in the bilateral lower lobes. No pneumothorax. Heart size is normal.",
     "Bilateral lower lobe opacities concerning for multifocal pneumonia."),
    ("Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax is seen.", "Normal chest."),
    ("Mildly enlarged cardiac silhouette. Small left pleural effusion. No pneumothorax.",
     "Mild cardiomegaly and small left effusion."),
    ("Calcified granuloma in the left upper lobe. No focal consolidation.",
     "No acute disease. Old granulomatous disease."),
    ("Lines: Right PICC tip in the distal SVC. Lungs: Mild left lower lobe atelectasis. Pleura: Trace right "
     "pleural effusion.", "Trace right pleural effusion. Mild LLL atelectasis."),
    ("Acute fracture of the right posterior seventh rib. No pneumothorax.",
     "Right seventh rib fracture without pneumothorax."),
    ("Widened mediastinum. No pleural effusion.", "Mediastinal widening. Recommend CT angiography."),
    ("There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal silhouette is "
     "within normal limits. Heart size is normal.", "No acute cardiopulmonary process."),
    ("Left lower lobe collapse. Small left effusion. Right lung is clear.",
     "Left lower lobe collapse with small left effusion."),
    ("Heart size normal; lungs clear; no effusion; no PTX.", "Normal CXR."),
]


def _report(i, findings, impression):
    f, imp = clean_text(findings), clean_text(impression)
    return Report(study_id=f"hand{i}", source="test", findings=f, impression=imp, text=join_sections(f, imp))


REPORT_OBJS = [_report(i, f, imp) for i, (f, imp) in enumerate(REPORTS)]

# ---------------------------------------------------------------- lexicon


def test_lexicon_entries_are_documented():
    assert len(LEXICON) >= 25
    for e in LEXICON:
        assert e.short and e.long and e.note
    shorts = {s for e in LEXICON for s in e.short}
    for needed in ("PTX", "ETT", "NGT", "NG tube", "CHF", "RLL", "RUL", "RML", "LLL", "LUL", "s/p", "b/l",
                   "CP angles", "CXR", "AP", "PA", "ICD", "PICC", "IJ", "SVC", "CABG", "COPD"):
        assert needed in shorts


def test_expand_is_word_boundary_safe_and_case_preserving():
    assert expand("S/p CABG. Right IJ CVC tip in the SVC.") == \
        "Status post coronary artery bypass graft. Right internal jugular central venous catheter tip in " \
        "the superior vena cava."
    assert expand("PTX. No PTX. RLL and LUL opacities.") == \
        "Pneumothorax. No pneumothorax. Right lower lobe and left upper lobe opacities."
    # words that merely contain an abbreviation are left alone
    assert expand("SPTXA ETTs IJK ptx cabg") == "SPTXA ETTs IJK ptx cabg"
    # PA/AP only as projections; a PA catheter is a pulmonary artery catheter; AP window is anatomy
    assert expand("PA and lateral views.") == "Posteroanterior and lateral views."
    assert expand("PA catheter tip in the right PA.") == "Pulmonary artery catheter tip in the right PA."
    assert expand("Fullness of the AP window.") == "Fullness of the AP window."
    assert expand("b/l effusions w/o PTX, c/w CHF.") == \
        "Bilateral effusions without pneumothorax, consistent with congestive heart failure."


def test_abbreviate_is_deterministic_and_reverses_expand():
    text = ("Status post coronary artery bypass graft. Right internal jugular catheter tip in the superior vena "
            "cava. No pneumothorax. Endotracheal tube 4 cm above the carina.")
    a1, a2 = abbreviate(text, random.Random(3)), abbreviate(text, random.Random(3))
    assert a1 == a2 and a1 != text
    assert expand(abbreviate(text, random.Random(0), p=1.0)) == text
    assert abbreviate("Lungs are clear.", random.Random(0)) == "Lungs are clear."
    assert abbreviate("Pneumothorax is absent.", random.Random(0), p=1.0) == "PTX is absent."
    assert abbreviate("Status post lobectomy.", random.Random(0), p=1.0) == "S/p lobectomy."


# ---------------------------------------------------------------- mention checker


@pytest.mark.parametrize("text, expected", [
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     [("consolidation", None, True, None), ("pleural_effusion", None, True, None),
      ("pneumothorax", None, True, None)]),
    ("There is a small left pleural effusion and right lower lobe atelectasis.",
     [("pleural_effusion", "left", False, "small"), ("atelectasis", "right", False, None)]),
    ("Opacity in the left lower lobe and right effusion.",
     [("opacity", "left", False, None), ("pleural_effusion", "right", False, None)]),
    ("The heart is mildly enlarged.", [("cardiomegaly", None, False, "mild")]),
    ("Mildly enlarged cardiac silhouette.", [("cardiomegaly", None, False, "mild")]),
    ("Heart size is not enlarged.", [("cardiomegaly", None, True, None)]),
    ("Right IJ catheter tip in the SVC.", [("central_line", "right", False, None)]),
    ("Consolidation, effusion or pneumothorax is not seen.",
     [("consolidation", None, True, None), ("pleural_effusion", None, True, None),
      ("pneumothorax", None, True, None)]),
    ("No change in moderate right pleural effusion.", [("pleural_effusion", "right", False, "moderate")]),
    ("Lungs are clear without consolidation, but there is a small right apical PTX.",
     [("consolidation", None, True, None), ("pneumothorax", "right", False, "small")]),
    ("Pneumothorax is absent.", [("pneumothorax", None, True, None)]),
    ("Moderate to severe pulmonary edema.", [("edema", None, False, "moderate-severe")]),
    ("Bibasilar atelectasis.", [("atelectasis", "bilateral", False, None)]),
    ("Left pleural effusion has resolved.", [("pleural_effusion", "left", True, None)]),
    ("Focal consolidation in posterior segment of right lower lobe.", [("consolidation", "right", False, None)]),
])
def test_extract_mentions(text, expected):
    assert [m.key() for m in extract_mentions(text)] == expected


def test_classify_edit():
    base = "Small left pleural effusion. No pneumothorax."
    assert classify_edit(base, "No PTX. Small left pleural effusion.") == "equal"
    assert classify_edit(base, "Small right pleural effusion. No pneumothorax.") == "laterality"
    assert classify_edit(base, "Large left pleural effusion. No pneumothorax.") == "severity"
    assert classify_edit(base, "Small left pleural effusion. Pneumothorax is present.") == "negation"
    assert classify_edit(base, base + " Mild pulmonary edema.") == "insertion"
    assert classify_edit(base, "Small left pleural effusion.") == "subset"
    assert classify_edit(base, "Large right pleural effusion. No pneumothorax.") is None


def test_line_breaks_list_marks_and_dashes_end_a_negation():
    # Without these boundaries "No pneumothorax" would negate the effusion on the next item.
    base = "No pneumothorax. Small left pleural effusion."
    for text in ("No pneumothorax\nSmall left pleural effusion", "- No pneumothorax.\n- Small left pleural effusion.",
                 "* No pneumothorax. * Small left pleural effusion.", "No pneumothorax - small left pleural effusion",
                 "No pneumothorax | small left pleural effusion", "\u2022 No pneumothorax \u2022 Small left pleural effusion"):
        assert classify_edit(base, text) == "equal", text
    assert classify_edit(base, "No pneumothorax or small left pleural effusion") == "negation"
    assert classify_edit("Mild to moderate cardiomegaly.", "Mild - moderate cardiomegaly.") == "equal"


# ---------------------------------------------------------------- equivalent variants

def _assert_equivalent(report, v):
    assert isinstance(v, Variant) and v.equivalent and v.error_type is None
    assert v.style in VARIANT_STYLES
    assert v.text and v.text != report.text, v.style        # never a copy
    if v.style in ("impression_only", "findings_only"):
        # drops a section: mentions may only disappear, never change
        assert not (mention_keys(v.text) - mention_keys(report.text)), (v.style, v.text)
    else:
        assert mention_keys(v.text) == mention_keys(report.text), (v.style, report.text, v.text)


@pytest.mark.parametrize("verify", [True, False])
def test_equivalent_variants_keep_side_negation_and_severity(verify):
    # verify=False: the rewrite rules alone must already keep the invariant on these reports
    seen = Counter()
    for r in REPORT_OBJS:
        for v in equivalent_variants(r, seed=0, verify=verify):
            _assert_equivalent(r, v)
            seen[v.style] += 1
    assert set(seen) == set(VARIANT_STYLES)
    assert seen["terse"] >= 25 and seen["reorder"] >= 25 and seen["rephrase"] >= 15


def test_equivalent_variants_skip_styles_that_do_not_apply():
    impression_only = REPORT_OBJS[16]          # no findings section, one sentence
    styles = {v.style for v in equivalent_variants(impression_only)}
    assert not styles & {"impression_only", "findings_only", "reorder", "abbreviate", "expand"}
    both = REPORT_OBJS[1]
    by_style = {v.style: v.text for v in equivalent_variants(both)}
    assert by_style["impression_only"] == both.impression and by_style["findings_only"] == both.findings
    assert equivalent_variants(Report(study_id="x", source="t")) == []


def test_specific_rewrites():
    r = _report(0, "No pneumothorax. Moderate cardiomegaly.", "")
    rephrased = [v.text for s in range(8) for v in equivalent_variants(r, seed=s) if v.style == "rephrase"]
    assert any(t.startswith(("There is no evidence of pneumothorax.", "Pneumothorax is absent.",
                             "There is no pneumothorax.")) for t in rephrased)
    assert any("Moderately enlarged cardiac silhouette." in t for t in rephrased)
    terse = {v.style: v.text for v in equivalent_variants(
        _report(1, "There is no pleural effusion. The lungs are clear. The heart is not enlarged.", ""))}["terse"]
    assert terse == "No pleural effusion; lungs clear; heart not enlarged."


def test_negation_rephrasing_of_a_sentence_typed_with_two_periods():
    # 302 of 3,927 Open-I reports end a sentence "..": the rewrite once read "Acute findings. is absent."
    from open_clip_cxr.reports import noise
    r = _report(2, "", "Heart size normal. No acute cardiopulmonary findings..")
    texts = [v.text for s in range(8) for v in equivalent_variants(r, seed=s) + noise.heldout_variants(r, seed=s)
             if v.style in ("rephrase", "paraphrase_heldout")]
    assert texts and not any(re.search(r"\.\s+(?:is|are)\b", t) for t in texts)
    assert any("Acute cardiopulmonary findings are " in t or "Negative for acute cardiopulmonary findings." in t
               or "no evidence of acute cardiopulmonary findings." in t for t in texts)


def test_reorder_keeps_back_references_with_their_sentence():
    r = _report(0, "Small left effusion. It is unchanged from ___. No pneumothorax. Heart size is normal.", "")
    for seed in range(10):
        text = {v.style: v.text for v in equivalent_variants(r, seed=seed)}["reorder"]
        assert "Small left effusion. It is unchanged from ___." in text
        assert sorted(re.split(r"(?<=\.) ", text)) == sorted(re.split(r"(?<=\.) ", r.text))


# ---------------------------------------------------------------- hard negatives

def test_hard_negatives_have_exactly_one_error():
    seen = Counter()
    for r in REPORT_OBJS:
        negs = hard_negatives(r, seed=0)
        assert len({v.error_type for v in negs}) == len(negs)       # at most one per type
        for v in negs:
            assert not v.equivalent and v.error_type in ERROR_TYPES
            assert v.text != r.text
            assert classify_edit(r.text, v.text) == v.error_type, (v.error_type, r.text, v.text)
            seen[v.error_type] += 1
    assert seen["insertion"] == len(REPORT_OBJS)
    assert seen["negation"] >= 25 and seen["laterality"] >= 15 and seen["severity"] >= 12


def _word_diff(a, b):
    wa, wb = a.split(), b.split()
    return [(x, y) for x, y in zip(wa, wb) if x != y] if len(wa) == len(wb) else None


def test_laterality_and_severity_change_one_word():
    for r in REPORT_OBJS:
        for v in hard_negatives(r, seed=1):
            if v.error_type == "laterality":
                (old, new), = _word_diff(r.text, v.text)
                pair = {re.sub(r"\W", "", old).lower()[:1], re.sub(r"\W", "", new).lower()[:1]}
                assert pair == {"l", "r"}, (old, new)
            if v.error_type == "severity" and _word_diff(r.text, v.text) is not None:
                assert len(_word_diff(r.text, v.text)) == 1


def test_specific_hard_negatives():
    r = _report(0, "Small left pleural effusion. No pneumothorax.", "")
    negs = {v.error_type: v for v in hard_negatives(r)}
    assert negs["laterality"].text == "Small right pleural effusion. No pneumothorax."
    assert negs["severity"].text == "Large left pleural effusion. No pneumothorax."
    negated = {t.format(x="left pleural effusion", X="Left pleural effusion", be="is") + " No pneumothorax."
               for t in _NEGATE_TEMPLATES.values()}
    affirmed = {"Small left pleural effusion. " + t.format(x="pneumothorax", X="Pneumothorax", be="is")
                for t in _AFFIRM_TEMPLATES.values()}
    assert negs["negation"].text in negated | affirmed
    assert negs["insertion"].style in ("insert_device", "insert_finding")
    # the inserted sentence names a finding the report did not mention at all
    added = mention_keys(negs["insertion"].text) - mention_keys(r.text)
    (finding, *_), = added
    assert finding not in {"pleural_effusion", "pneumothorax"}


def test_negated_list_affirms_one_item():
    r = _report(0, "No focal consolidation, pleural effusion, or pneumothorax.", "")
    texts = {v.text for s in range(12) for v in hard_negatives(r, seed=s, part="train")
             if v.error_type == "negation"}
    affirm = [t for k, t in _AFFIRM_TEMPLATES.items() if part_of("affirm_template", k) == "train"]
    assert texts <= {
        rest + " " + t.format(x=x, X=x[:1].upper() + x[1:], be="is")
        for rest, x in (("No pleural effusion or pneumothorax.", "focal consolidation"),
                        ("No focal consolidation or pneumothorax.", "pleural effusion"),
                        ("No focal consolidation or pleural effusion.", "pneumothorax"))
        for t in affirm}
    assert len(texts) >= 2


# ---------------------------------------------------------------- layout families

def test_separators_and_bullets_keep_the_words_and_leave_the_held_out_marks_alone():
    from open_clip_cxr.reports import variants as V
    secs = ["The heart is normal in size. No pleural effusion. Lungs are clear.", "No acute disease."]
    words = sorted(re.findall(r"[a-z]+", " ".join(secs).lower()))
    for seed in range(30):
        sep = V._separators(secs, random.Random(seed))
        bul = V._bullets(secs, random.Random(seed))
        for text in (sep, bul):
            assert sorted(re.findall(r"[a-z]+", text.lower())) == words    # nothing clinical added or lost
        assert ", " not in sep and "." not in sep         # the held-out telegraphic join is ", "
        assert not re.search(r"\d", bul) and bul.count(bul[0]) >= 4  # one mark a sentence, never numbers
    assert V._separators(["No acute disease."], random.Random(0)) is None
    assert V._bullets(["No acute disease."], random.Random(0)) is None


# ---------------------------------------------------------------- determinism and API

def test_deterministic_under_seed():
    for r in REPORT_OBJS[:12]:
        assert make_variants(r, seed=5) == make_variants(r, seed=5)
    differs = sum(make_variants(r, seed=0) != make_variants(r, seed=1) for r in REPORT_OBJS)
    assert differs >= 10


def test_make_variants_is_equivalents_then_negatives():
    r = REPORT_OBJS[2]
    assert make_variants(r, seed=2) == equivalent_variants(r, seed=2) + hard_negatives(r, seed=2)
    assert VARIANT_STYLES == ("abbreviate", "expand", "impression_only", "findings_only", "reorder",
                              "rephrase", "terse", "lowercase", "line_list", "section_headers",
                              "compose", "separators", "bullets", "context_lines", "truncate")
    assert ERROR_TYPES == ("laterality", "negation", "severity", "insertion")


def test_laterality_copies_swap_a_different_side_word_each():
    from open_clip_cxr.reports.negatives import laterality_copies
    r = _report(0, "Small left pleural effusion. Right PICC tip in the SVC. No pneumothorax.",
                "Left basilar atelectasis.")
    copies = laterality_copies(r, 5, seed=3)
    assert len(copies) == 3 and len({v.text for v in copies}) == 3      # three side words, three copies
    for v in copies:
        assert v.error_type == "laterality" and not v.equivalent
        (old, new), = _word_diff(r.text, v.text)                          # exactly one word changed
        assert {old.lower().strip("."), new.lower().strip(".")} == {"left", "right"}
    assert [v.text for v in laterality_copies(r, 5, seed=3)] == [v.text for v in copies]   # seeded
    assert len(laterality_copies(r, 2, seed=3)) == 2
    assert laterality_copies(_report(0, "No pneumothorax.", ""), 3) == []    # no side word, no copy
    assert laterality_copies(r, 0) == []
