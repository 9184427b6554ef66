"""Shorthand by truncation (`reports.truncate`): held-out entries' words and fact words stay whole."""
import random
import re

from open_clip_cxr.reports.lexicon import entries
from open_clip_cxr.reports.truncate import protected_words, truncate_words
from open_clip_cxr.reports.types import Report
from open_clip_cxr.reports.variants import equivalent_variants

TEXT = ("The cardiomediastinal silhouette is within normal limits. Moderate bilateral pleural effusions, "
        "increased since the radiograph, with adjacent consolidation. Degenerative changes of the thoracic spine.")


def test_no_heldout_entry_word_and_no_fact_word_is_ever_cut():
    held = set(entries()) - set(entries("train"))
    held_words = {w for e in held for w in re.findall(r"[a-z]+", e.long) if len(w) >= 7}
    assert held_words and held_words <= protected_words("train")
    for seed in range(50):
        out = truncate_words(TEXT, random.Random(seed), part="train", p=1.0)
        words = set(re.findall(r"[a-z]+", out.lower()))
        for w in ("moderate", "bilateral", "increased", "effusions") + tuple(w for w in held_words if w in TEXT.lower()):
            assert any(x.startswith(w) for x in words), (w, out)
        assert "adjacent" not in words          # p=1: every unprotected long word is cut


def test_a_cut_keeps_the_first_letters_and_is_deterministic():
    a = truncate_words(TEXT, random.Random(3), part="train", p=1.0)
    assert a == truncate_words(TEXT, random.Random(3), part="train", p=1.0)
    cut = a.split()[1].rstrip(".")
    assert 3 <= len(cut) <= 6 and "cardiomediastinal".startswith(cut.lower())
    assert truncate_words("No acute disease.", random.Random(0)) is None   # nothing long enough


def test_truncate_is_a_training_style_checked_like_the_others():
    r = Report(study_id="s", source="table", findings=TEXT, impression="No pneumothorax.")
    vs = [v for seed in range(5) for v in equivalent_variants(r, seed=seed, part="train") if v.style == "truncate"]
    assert vs and all(v.equivalent for v in vs)
