"""Insertion errors borrowed from other training reports (`supcon.borrowed_insertions`)."""
from open_clip_cxr.reports.borrowed_insertions import SentencePool, pool_or_none
from open_clip_cxr.reports.mentions import classify_edit
from open_clip_cxr.reports.negatives import _INSERTIONS
from open_clip_cxr.reports.rewrite_common import base_text
from open_clip_cxr.reports.types import Report
from open_clip_cxr_train.supcon import report_texts

DONORS = [
    Report("d1", "t", findings="Stable mild cardiomegaly. No pneumothorax.", impression="No acute disease."),
    Report("d2", "t", findings="Calcified granuloma in the right upper lobe. Lungs otherwise clear."),
    # a template sentence of either style part, a negated finding and a two-finding sentence: never borrowed
    Report("d3", "t", findings=f"{_INSERTIONS[0][1]} {_INSERTIONS[-1][1]} No focal consolidation. "
                               "Small left pleural effusion and mild cardiomegaly."),
]


def test_pool_keeps_one_present_finding_sentences_and_no_template():
    pool = SentencePool(DONORS)
    borrowed = {s for ss in pool.by_finding.values() for s in ss}
    assert borrowed == {"Stable mild cardiomegaly.", "Calcified granuloma in the right upper lobe."}
    assert set(pool.by_finding) == {"cardiomegaly", "granuloma"} and len(pool) == 2


def test_copies_add_exactly_one_finding_the_report_does_not_mention():
    pool = SentencePool(DONORS)
    # the report mentions cardiomegaly (as absent): only the granuloma sentence may be borrowed
    r = Report("x", "t", findings="No cardiomegaly. Small left pleural effusion.", impression="Small effusion.")
    copies = pool.insertion_copies(r, seed=0, k=2)
    assert len(copies) == 1
    c = copies[0]
    assert "Calcified granuloma in the right upper lobe." in c.text and "Stable mild cardiomegaly." not in c.text
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
    plain, more = report_texts(r, 0), report_texts(r, 0, borrowed=pool, n_borrowed=1)
    assert more.variants == plain.variants and more.sections == plain.sections
    added = [n for n in more.negatives if n not in plain.negatives]
    assert more.negatives[:len(plain.negatives)] == plain.negatives and len(added) == 1
    assert any(s in added[0] for ss in pool.by_finding.values() for s in ss)
    assert pool_or_none(DONORS, 0) is None and isinstance(pool_or_none(DONORS, 1, log=lambda m: None), SentencePool)

