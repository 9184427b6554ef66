"""One-error copies borrowed from other training reports (`supcon.borrowed_insertions`, `_negations`,
`_absent_swaps`), and rewrites that word a negation as another report does (`_rewordings`)."""
from open_clip_cxr.reports.borrowed import SentencePool, borrowable, is_absent_swap, pool_or_none
from open_clip_cxr.reports.mentions import classify_edit
from open_clip_cxr.reports.negatives import _AFFIRM_TEMPLATES, _INSERTIONS, _NEGATE_TEMPLATES
from open_clip_cxr.reports.style_split import in_part
from open_clip_cxr.reports.rewrite_common import base_text
from open_clip_cxr.reports.types import Report
from open_clip_cxr_train.supcon import report_texts

DONORS = [
    Report("d1", "t", findings="Mild cardiomegaly. No pneumothorax. Stable left pleural effusion.", impression="No acute disease."),
    Report("d2", "t", findings="Calcified granuloma in the right upper lobe. Lungs otherwise clear."),
    # a template sentence of either style part, a two-finding sentence, a change over time ("stable"
    # above), a negation inside a present finding's sentence: never borrowed; negated: negation donors only
    Report("d3", "t", findings=f"{_INSERTIONS[0][1]} {_INSERTIONS[-1][1]} No focal consolidation. "
                               "Small left pleural effusion and mild cardiomegaly. Lungs clear of edema."),
]


def test_pool_keeps_one_finding_sentences_and_no_template():
    pool = SentencePool(DONORS)
    borrowed = {s for ss in pool.by_finding.values() for s in ss}     # insertion donors: present findings
    assert borrowed == {"Mild cardiomegaly.", "Calcified granuloma in the right upper lobe."}
    assert set(pool.by_finding) == {"cardiomegaly", "granuloma"}
    assert pool.by_key[("pneumothorax", None, True)] == ["No pneumothorax."]   # negated: negation donors only
    assert pool.by_key[("consolidation", None, True)] == ["No focal consolidation."]


def test_error_templates_of_the_heldout_part_are_never_borrowed():
    for table, templates, negated in (("negate_template", _NEGATE_TEMPLATES, True),
                                      ("affirm_template", _AFFIRM_TEMPLATES, False)):
        for key, t in templates.items():
            s = t.format(x="right pleural effusion", X="Right pleural effusion", be="is")
            if not in_part(table, key, "train"):
                assert not borrowable(s, negated), (key, s)
    assert borrowable("No right pleural effusion.", negated=True) and borrowable("Right pleural effusion is present.")
    assert not any(borrowable(s) for _, s, _ in _INSERTIONS) and borrowable("Heart size is mildly enlarged.")
    # polarity the mention reader may misread
    assert not borrowable("No acute disease, findings compatible with emphysema.", negated=True)
    assert not borrowable("Lungs clear of consolidation.") and not borrowable("No change in the known nodule.", True)


def test_copies_add_exactly_one_finding_the_report_does_not_mention():
    pool = SentencePool(DONORS)
    # the report mentions cardiomegaly (as absent): only the granuloma sentence may be borrowed
    r = Report("x", "t", findings="No cardiomegaly. Small left pleural effusion.", impression="Small effusion.")
    copies = pool.insertion_copies(r, seed=0, k=2)
    assert len(copies) == 1
    c = copies[0]
    assert "Calcified granuloma in the right upper lobe." in c.text and "Mild cardiomegaly." not in c.text
    assert classify_edit(base_text(r), c.text) == "insertion"
    assert (c.equivalent, c.error_type, c.style) == (False, "insertion", "insert_borrowed")
    assert pool.insertion_copies(r, seed=0, k=2) == copies                  # seeded: the same copy again
    # a report that mentions neither finding gets one copy per finding, k at most
    clear = Report("y", "t", findings="The lungs are clear. Heart size is normal.")
    two = pool.insertion_copies(clear, seed=3, k=2)
    assert len(two) == 2 and all(classify_edit(base_text(clear), v.text) == "insertion" for v in two)
    assert len(pool.insertion_copies(clear, seed=3, k=1)) == 1
    assert pool.insertion_copies(Report("e", "t"), seed=0, k=1) == []


def test_report_texts_add_borrowed_copies_to_the_negatives_only():
    pool = SentencePool(DONORS)
    r = Report("x", "t", findings="The lungs are clear. Small left pleural effusion.", impression="Small left effusion.")
    plain, more = report_texts(r, 0), report_texts(r, 0, borrowed=pool)
    assert more.variants == plain.variants and more.sections == plain.sections
    added = [n for n in more.negatives if n not in plain.negatives]
    assert more.negatives[:len(plain.negatives)] == plain.negatives and len(added) == 1
    assert any(s in added[0] for ss in pool.by_finding.values() for s in ss)
    assert pool_or_none(DONORS, 0, 0) is None and isinstance(pool_or_none(DONORS, 0, 1, log=lambda m: None), SentencePool)


def test_negation_copies_swap_one_sentence_for_a_borrowed_one_stated_the_other_way():
    donors = [Report("d1", "t", findings="A large pneumothorax has developed. No left pleural effusion."),
              Report("d2", "t", findings="No right pleural effusion.")]
    pool = SentencePool(donors)
    r = Report("x", "t", findings="Heart size is normal. No pneumothorax. Small left effusion.", impression="No acute disease.")
    base = base_text(r)
    copies = pool.negation_copies(r, seed=0, k=3)
    assert len(copies) == 2 and all(classify_edit(base, c.text) == "negation" for c in copies)
    assert all((c.error_type, c.style) == ("negation", "negate_borrowed") for c in copies)
    assert {next(d for d in ("A large pneumothorax has developed.", "No left pleural effusion.") if d in c.text)
            for c in copies} == {"A large pneumothorax has developed.", "No left pleural effusion."}
    assert pool.negation_copies(r, seed=0, k=1) == copies[:1]                # seeded, k at most
    # present -> absent needs a donor with the same finding and side: none says a right pneumothorax is absent
    assert pool.negation_copies(Report("y", "t", findings="Right pneumothorax is seen."), seed=0, k=1) == []
    assert [c.text for c in pool.negation_copies(Report("z", "t", findings="Right pleural effusion is seen."), 0, 1)] \
        == ["No right pleural effusion."]
    more = report_texts(r, 0, borrowed=SentencePool(donors, insertions=0, negations=1))
    assert copies[0].text in more.negatives


def test_absent_swap_copies_rule_out_another_finding_in_place_of_one():
    donors = [Report("d1", "t", findings="No pneumothorax. No focal consolidation. Mild cardiomegaly."),
              Report("d2", "t", findings="No pleural effusion. No pulmonary edema.")]
    pool = SentencePool(donors, insertions=0, negations=0, absent_swaps=2)
    assert set(pool.absent_by_finding) == {"pneumothorax", "consolidation", "pleural_effusion", "edema"}
    r = Report("x", "t", findings="Heart size is normal. No pneumothorax. No pleural effusion.", impression="Normal chest.")
    base = base_text(r)
    copies = pool.absent_swap_copies(r, seed=0, k=3)
    # donors of findings the report does not mention: consolidation and edema, one copy each (k at most)
    assert len(copies) == 2 and all(is_absent_swap(base, c.text) for c in copies)
    assert {d for c in copies for d in ("No focal consolidation.", "No pulmonary edema.") if d in c.text} \
        == {"No focal consolidation.", "No pulmonary edema."}
    for c in copies:     # one of the report's absent-finding sentences is gone, the rest is unchanged
        assert c.text.count("No pneumothorax.") + c.text.count("No pleural effusion.") == 1
        assert "Heart size is normal." in c.text and "Normal chest." in c.text
        assert (c.equivalent, c.error_type, c.style) == (False, "absent_swap", "absent_swap_borrowed")
    assert pool.absent_swap_copies(r, seed=0, k=1) == copies[:1]            # seeded, k at most
    # nothing ruled out in a sentence of its own, or every donor finding already mentioned: no copy
    assert pool.absent_swap_copies(Report("y", "t", findings="Mild cardiomegaly. Lungs are clear."), 0, 1) == []
    full = Report("z", "t", findings="No pneumothorax. No focal consolidation. No pleural effusion. No pulmonary edema.")
    assert pool.absent_swap_copies(full, 0, 1) == []
    # what the check refuses: a present finding put in, a mentioned finding ruled out again, two changes
    assert not is_absent_swap("No pneumothorax. Mild cardiomegaly.", "Small pleural effusion. Mild cardiomegaly.")
    assert not is_absent_swap("No pneumothorax. No pleural effusion.", "No pleural effusion. No pleural effusion.")
    assert not is_absent_swap("No pneumothorax.", "No pleural effusion. No pulmonary edema.")
    assert is_absent_swap("No pneumothorax. Mild cardiomegaly.", "No pulmonary edema. Mild cardiomegaly.")
    more = report_texts(r, 0, borrowed=SentencePool(donors, insertions=0, negations=0, absent_swaps=1))
    assert copies[0].text in more.negatives and more.variants == report_texts(r, 0).variants
    assert pool_or_none(donors, 0, 0, log=lambda m: None, absent_swaps=1).absent_swaps == 1


def test_reworded_negations_keep_every_mention_and_join_the_rewrites():
    donors = [Report("d1", "t", findings="Negative for pneumothorax. No focal consolidation."),
              Report("d2", "t", findings="There is no pneumothorax. No left pleural effusion. Mild cardiomegaly.")]
    pool = SentencePool(donors, insertions=0, negations=0, rewordings=2)
    r = Report("x", "t", findings="Heart size is normal. No pneumothorax. Small right pleural effusion.", impression="No acute disease.")
    base = base_text(r)
    copies = pool.reworded_negations(r, seed=0, k=2)
    # one site only (the one sentence ruling out one finding the donors rule out): one rewrite
    assert len(copies) == 1 and classify_edit(base, copies[0].text) == "equal"
    assert copies[0].text.replace("Negative for pneumothorax.", "No pneumothorax.").replace(
        "There is no pneumothorax.", "No pneumothorax.") == base
    assert (copies[0].equivalent, copies[0].error_type, copies[0].style) == (True, None, "negation_reworded")
    assert pool.reworded_negations(r, seed=0, k=2) == copies                 # seeded
    # a side must match: no donor rules out a right effusion, so that sentence is no site
    assert pool.reworded_negations(Report("y", "t", findings="No right pleural effusion."), 0, 1) == []
    assert pool.reworded_negations(Report("z", "t", findings="No left pleural effusion."), 0, 1) == []   # only itself
    plain, more = report_texts(r, 0), report_texts(r, 0, borrowed=pool)
    assert more.variants == plain.variants + [copies[0].text] and more.negatives == plain.negatives
    # the key at 0 (every recipe without it): the same texts as without a pool's positives
    assert report_texts(r, 0, borrowed=SentencePool(donors, insertions=0, negations=0)).variants == plain.variants


def test_report_texts_add_laterality_copies_to_the_negatives_only():
    r = Report(study_id="s", source="t", findings="Small left pleural effusion. Right PICC tip in the SVC.",
               impression="Left basilar atelectasis.")
    plain, more = report_texts(r, 0), report_texts(r, 0, laterality_copies=2)
    assert more.variants == plain.variants and more.sections == plain.sections
    added = [t for t in more.negatives if t not in plain.negatives]
    assert more.negatives[:len(plain.negatives)] == plain.negatives and len(added) == 2
    base = base_text(r).split()
    for t in added:                                                                # one word swapped
        assert len(t.split()) == len(base) and sum(a != b for a, b in zip(t.split(), base)) == 1
