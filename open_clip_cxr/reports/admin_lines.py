"""Administrative header lines (exam, indication, history, comparison, technique), dropped before a
tower reads a report.

Our towers are trained on findings and impression text. Reports from other institutions open
with lines that name the exam or the priors (`EXAM: CHEST 2 VIEWS`, `COMPARISON: NONE.`); they
say nothing about the patient's chest, but on a short report they outweigh its one sentence and
a longer report wins the retrieval (style-held-out protocol, `caps_headers`; README "The test
split, read once, and both splits pooled"). The tokenizer option
`text_cfg.tokenizer_kwargs.drop_admin_lines` (see `openclip_hooks`) removes such lines first, so
training, evaluation, search and `open_clip.get_tokenizer` read the same text.

The rule works on whole lines only: a line is dropped when it starts with one of the labels
below and a colon; every other line, and every line of a flattened one-line report, is kept as
it is, so findings that share a line with a label are never lost. A text made only of such
lines is kept whole (a query like `Comparison: none` still means something).

`ADMIN_LABELS` is frozen (version 1): an exported model records `drop_admin_lines: true` and must
tokenize the same with any later version of this package. The labels are the administrative
entries of `reports.sections`' lexicon as written on 2026-11-28 for the MIMIC-CXR parser, before
the style-held-out protocol existed; `sections` builds those entries from this table.
"""
import re
from typing import Dict, Tuple

# section -> labels (lower case). Frozen: a change needs a new option value, not an edit here.
ADMIN_LABELS: Dict[str, Tuple[str, ...]] = {
    "indication": ("indication", "indications", "reason for exam", "reason for examination", "reason for study",
                   "clinical indication", "clinical information", "clinical data", "reason"),
    "history": ("history", "clinical history", "patient history", "medical history", "hx"),
    "comparison": ("comparison", "comparisons", "comparison study", "comparison studies", "comparison exam",
                   "comparison exams", "prior", "priors", "prior studies", "prior study"),
    "technique": ("technique", "techniques", "procedure", "views", "view", "projection", "projections"),
    "examination": ("examination", "exam", "type of examination", "type of exam", "study", "examination type"),
}

_LABELS = sorted({name for names in ADMIN_LABELS.values() for name in names}, key=len, reverse=True)
# a label (any case, inner spaces free) and a colon that does not start a time or a ratio ("1:30")
_ADMIN_LINE = re.compile(r"^\s*(?:" + "|".join(r"\s+".join(map(re.escape, n.split())) for n in _LABELS)
                         + r")\s*:(?!\d)", re.I)


def is_admin_line(line: str) -> bool:
    """`line` starts with an administrative label and a colon."""
    return bool(_ADMIN_LINE.match(line))


def drop_admin_lines(text: str) -> str:
    """`text` without its administrative header lines (the tokenizer applies it to the text after
    each instruction separator on its own: `text.case.per_part`)."""
    lines = text.split("\n")
    kept = [line for line in lines if not is_admin_line(line)]
    if len(kept) == len(lines) or not any(line.strip() for line in kept):
        return text     # nothing to drop, or nothing would be left: the text as it came
    return "\n".join(kept)
