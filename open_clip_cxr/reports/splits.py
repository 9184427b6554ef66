"""The split rule, written once: which of "train" / "validate" / "test" a study belongs to.

A study keeps its dataset's official split when it has one (MIMIC-CXR's split csv, the CheXpert
Plus `split` column, a table's split column, a shard's recorded split), spelled any common way;
otherwise `hash_split` of its patient id (its study id when the source has no patients), so that
no patient straddles train and test and a rerun assigns the same studies.
"""
import hashlib
from typing import List, Optional

SPLIT_NAMES = ("train", "validate", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validate", "valid": "validate",
                 "validate": "validate", "validation": "validate", "dev": "validate", "test": "test",
                 "testing": "test"}
DEFAULT_VAL, DEFAULT_TEST = 0.1, 0.1


def normalise_split(split: Optional[str]) -> Optional[str]:
    """Map the many spellings of a split to "train" / "validate" / "test" (unknown names pass
    through lower-cased); None or blank -> None."""
    if split is None or not str(split).strip():
        return None
    s = str(split).strip().lower()
    return SPLIT_ALIASES.get(s, s)


def split_list(text: str) -> List[str]:
    """Comma-separated split names ("val,test") normalised (`normalise_split`); ValueError when none is
    named or one is named twice (validate,validation): pooled splits must be different reports."""
    names = [normalise_split(x) for x in str(text).split(",") if x.strip()]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"{text}: name each split at most once, comma-separated (e.g. validate,test)")
    return names


def hash_split(key, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST) -> str:
    """Deterministic "train"/"validate"/"test" from sha256(key), for sources without an official split."""
    u = int.from_bytes(hashlib.sha256(str(key).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < test:
        return "test"
    if u < test + val:
        return "validate"
    return "train"


def assign_split(official: Optional[str], patient_id=None, study_id=None,
                 val: float = DEFAULT_VAL, test: float = DEFAULT_TEST) -> str:
    """THE rule: the official split when there is one, else `hash_split(patient or study)`."""
    return normalise_split(official) or hash_split(patient_id or study_id, val=val, test=test)


def report_split(report, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST) -> str:
    """`assign_split` for a `Report` (its `split` is the official one, or None)."""
    return assign_split(report.split, report.patient_id, report.study_id, val=val, test=test)
