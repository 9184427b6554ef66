"""Insertion errors borrowed from other reports: one finding sentence of another report added.

The rule-based insertion error (`negatives._insertion`) adds one of 16 template sentences, split
between the style parts, so a tower can learn to spot those few sentences rather than "one more
finding". Real reports hold hundreds of ways to state one present finding; a one-error copy that
borrows such a sentence from another training report is an insertion error in a wording no table
of ours lists. Only sentences the mention reader reads as exactly one present (not negated)
finding are borrowed, never one equal to an insertion template of either part, and a copy is kept
only when the checker reads it as exactly one added mention (`mentions.classify_edit`).
"""
import re
from typing import Dict, Iterable, List

from .clean import join_sections
from .mentions import classify_edit, extract_mentions
from .negatives import _INSERTIONS
from .rewrite_common import report_sections, rng_for, sentences
from .types import Report, Variant

MIN_WORDS, MAX_WORDS = 2, 20
_TRIES = 12            # candidate sentences tried per copy before giving up on a report


def _norm(sentence: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", sentence.lower()).strip()


_TEMPLATES = {_norm(s) for _, s, _ in _INSERTIONS}


class SentencePool:
    """One-finding sentences of `reports`, by finding: what `insertion_copies` borrows from."""

    def __init__(self, reports: Iterable[Report]):
        by_finding: Dict[str, Dict[str, None]] = {}
        for report in reports:
            for section in report_sections(report):
                for s in sentences(section):
                    if not MIN_WORDS <= len(s.split()) <= MAX_WORDS or _norm(s) in _TEMPLATES:
                        continue
                    ms = extract_mentions(s)
                    if len(ms) == 1 and not ms[0].negated:
                        by_finding.setdefault(ms[0].finding, {})[s] = None   # ordered, deduplicated
        self.by_finding = {f: sorted(ss) for f, ss in sorted(by_finding.items())}

    def __len__(self) -> int:
        return sum(len(ss) for ss in self.by_finding.values())

    def insertion_copies(self, report: Report, seed: int = 0, k: int = 1) -> List[Variant]:
        """Up to `k` copies of `report`, each with one borrowed sentence of a finding the report does
        not mention (present or absent) inserted in its first section; seeded by (seed, report)."""
        secs = report_sections(report)
        base = join_sections(*secs)
        if not base or k <= 0:
            return []
        present = {m.finding for m in extract_mentions(base)}
        findings = [f for f in self.by_finding if f not in present]
        rng = rng_for(seed, "borrowed_insertion", base)
        split = [sentences(s) for s in secs]
        out: List[Variant] = []
        for _ in range(_TRIES):
            if len(out) >= k or not findings:
                break
            finding = rng.choice(findings)      # by finding first: common findings do not crowd out rare ones
            borrowed = rng.choice(self.by_finding[finding])
            parts = [list(s) for s in split]
            parts[0].insert(rng.randint(0, len(parts[0])), borrowed)
            text = join_sections(*(" ".join(s) for s in parts))
            if classify_edit(base, text) == "insertion" and text not in (v.text for v in out):
                out.append(Variant(text=text, style="insert_borrowed", equivalent=False, error_type="insertion"))
                findings.remove(finding)        # k copies: k different findings
        return out


def pool_or_none(reports: List[Report], k: int, log=print):
    """A `SentencePool` of `reports` when `k` > 0 (recipe key `supcon.borrowed_insertions`), else None."""
    if k <= 0:
        return None
    pool = SentencePool(reports)
    log(f"supcon: borrowed insertions: {len(pool)} one-finding sentences of {len(pool.by_finding)} findings "
        f"from {len(reports)} training reports, {k} per report")
    return pool

