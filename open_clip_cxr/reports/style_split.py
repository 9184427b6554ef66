"""The style split: which rewrite entries stage 1 may train on, and which only the suite sees.

Every rule table of the rewriters (abbreviation lexicon entries, synonym pairs, negation
templates, severity swaps, inserted-error sentences) is split by entry into a "train" part and
a "heldout" part, by a hash of the entry's key (stable when entries are added or reordered).
Stage 1 draws rewrites from the train part only (`open_clip_cxr_train.supcon.report_texts`); the
held-out protocol (`open_clip_cxr.eval.robustness.run_heldout`) builds its variants from the
held-out part plus rewrite operations no training rule makes (`reports.noise`). A model that
learned our lexicon rather than abbreviation in general fails there, as it failed on the
private benchmark of issue 19.

`part=None` everywhere means both parts (the rewriters' behaviour before the split).
"""
import hashlib
from typing import Optional

PARTS = ("train", "heldout")
HELDOUT_FRACTION = 0.4     # share of each table's entries held out
_SALT = "cxr-style-split/v1"


def part_of(table: str, key: str) -> str:
    """"train" or "heldout" for entry `key` of rule table `table` (deterministic)."""
    h = hashlib.sha256(f"{_SALT}\x1f{table}\x1f{key}".encode()).digest()
    return "heldout" if int.from_bytes(h[:4], "big") / 2 ** 32 < HELDOUT_FRACTION else "train"


def in_part(table: str, key: str, part: Optional[str]) -> bool:
    """Whether entry `key` of `table` may be used by a rewriter restricted to `part` (None: any)."""
    if part is None:
        return True
    if part not in PARTS:
        raise ValueError(f"style part must be one of {PARTS} or None, got {part!r}")
    return part_of(table, key) == part
