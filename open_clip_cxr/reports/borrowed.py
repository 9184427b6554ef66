"""One-error copies borrowed from other reports: a real sentence of another training report
added (insertion), put in place of one that states the same finding the other way (negation), or
put in place of one that rules out another finding (absent swap: "No pneumothorax." ->
"No pleural effusion.", where the report says nothing of an effusion). One positive kind too: a
sentence that rules out one finding put in place of another report's sentence ruling out the same
finding in its own words (reworded negation: "No pneumothorax." -> "Negative for pneumothorax.").

The rule-based errors (`negatives.py`) use a few template sentences split between the style
parts (16 inserted findings, six ways to say a finding is absent, three to say it is present), so
a tower can learn to spot those templates rather than "one more finding" or "the finding is now
absent". Real reports state each finding in hundreds of ways; copies that borrow such sentences
from other training reports carry the same errors in wordings no table of ours lists.

Only sentences the mention reader reads as exactly one finding are borrowed, never one equal to
an insertion template, nor one written like a negation / affirmation template of the held-out
part (the held-out protocol's errors stay unseen), and a copy is kept only when the checker
reads it as exactly that one error (`mentions.classify_edit`).
"""
import re
from typing import Dict, Iterable, List, Optional, Tuple

from .clean import join_sections
from .mentions import classify_edit, extract_mentions, mention_keys
from .negatives import _AFFIRM_TEMPLATES, _INSERTIONS, _NEGATE_TEMPLATES, _apply, _insert
from .rewrite_common import report_sections, rng_for, sentences
from .style_split import in_part
from .types import Report, Variant

MIN_WORDS, MAX_WORDS = 2, 20
_TRIES = 12            # candidates tried per copy before giving up on a report


def _norm(sentence: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", sentence.lower()).strip()


def _template_re(template: str) -> "re.Pattern":
    body = re.escape(template).replace(r"\{x\}", ".+").replace(r"\{X\}", ".+").replace(r"\{be\}", "(?:is|are)")
    return re.compile(rf"^{body}$", re.I)


_INSERTED = {_norm(s) for _, s, _ in _INSERTIONS}
_HELDOUT_FORMS = [_template_re(t) for table, templates in (("negate_template", _NEGATE_TEMPLATES),
                                                           ("affirm_template", _AFFIRM_TEMPLATES))
                  for key, t in templates.items() if in_part(table, key, "heldout")]


# Sentences whose polarity the mention reader can misread: a change over time ("no change in the
# known nodule": present), for a present finding any negation word ("lungs clear of consolidation":
# absent), for an absent one a negation anywhere but in front or a second clause ("no acute
# abnormality, findings compatible with emphysema": present). Borrowed, they would make copies
# that are not errors at all.
_CHANGE_RE = re.compile(r"\b(?:change[sd]?|unchanged|stable|known|interval|again|previous(?:ly)?|prior|"
                        r"increas\w*|decreas\w*|resolv\w*|improv\w*|worsen\w*|persist\w*|suggest\w*)\b", re.I)
_NEGATION_WORD_RE = re.compile(r"\b(?:no|not|without|negative|clear|free|absent|removed|normal)\b", re.I)
_NEGATION_FIRST_RE = re.compile(r"^(?:no|there (?:is|are) no|negative for|without)\b", re.I)


def borrowable(sentence: str, negated: bool = False) -> bool:
    """A sentence of usable length that is no error template of ours and whose polarity (the
    finding stated absent: `negated`) is plain (see the module docstring and `_CHANGE_RE`)."""
    return (MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and _norm(sentence) not in _INSERTED
            and not any(rx.match(sentence.strip()) for rx in _HELDOUT_FORMS)
            and not _CHANGE_RE.search(sentence)
            and (bool(_NEGATION_FIRST_RE.match(sentence.strip())) and "," not in sentence if negated
                 else not _NEGATION_WORD_RE.search(sentence)))


def _plain_one_finding(split: List[List[str]]):
    """(section i, sentence j, sentence, its mention) for each short sentence of `split` that states
    one finding plainly (no change over time): the sentences a copy may replace."""
    for i, sents in enumerate(split):
        for j, s in enumerate(sents):
            ms = extract_mentions(s)
            if len(ms) == 1 and len(s.split()) <= MAX_WORDS and not _CHANGE_RE.search(s):
                yield i, j, s, ms[0]


class SentencePool:
    """One-finding sentences of `reports`, by (finding, side, negated); `copies` gives each report
    `insertions` insertion, `negations` negation and `absent_swaps` absent-swap copies (recipe keys
    `supcon.borrowed_*`)."""

    def __init__(self, reports: Iterable[Report], insertions: int = 1, negations: int = 0, absent_swaps: int = 0,
                 rewordings: int = 0):
        self.insertions, self.negations, self.absent_swaps = insertions, negations, absent_swaps
        self.rewordings = rewordings
        found: Dict[Tuple[str, Optional[str], bool], Dict[str, None]] = {}
        for report in reports:
            for section in report_sections(report):
                for s in sentences(section):
                    ms = extract_mentions(s)
                    if len(ms) == 1 and borrowable(s, ms[0].negated):
                        found.setdefault((ms[0].finding, ms[0].side, ms[0].negated), {})[s] = None
        self.by_key = {k: sorted(ss) for k, ss in sorted(found.items(), key=lambda kv: str(kv[0]))}
        present: Dict[str, List[str]] = {}
        for (finding, _, negated), ss in self.by_key.items():
            if not negated:
                present.setdefault(finding, []).extend(ss)
        self.by_finding = {f: sorted(set(ss)) for f, ss in sorted(present.items())}   # insertion donors
        absent: Dict[str, List[str]] = {}
        for (finding, _, negated), ss in self.by_key.items():
            if negated:
                absent.setdefault(finding, []).extend(ss)
        self.absent_by_finding = {f: sorted(set(ss)) for f, ss in sorted(absent.items())}   # absent-swap donors

    def __len__(self) -> int:
        return sum(len(ss) for ss in self.by_key.values())

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
            j = rng.randint(0, len(split[0]))
            text = _insert(split, 0, j, rng.choice(self.by_finding[finding]))
            if classify_edit(base, text) == "insertion" and text not in (v.text for v in out):
                out.append(Variant(text=text, style="insert_borrowed", equivalent=False, error_type="insertion"))
                findings.remove(finding)        # k copies: k different findings
        return out

    def negation_copies(self, report: Report, seed: int = 0, k: int = 1) -> List[Variant]:
        """Up to `k` copies of `report`, each with one of its one-finding sentences replaced by a
        borrowed sentence of the same finding and side, stated the other way (present <-> absent)."""
        secs = report_sections(report)
        base = join_sections(*secs)
        if not base or k <= 0:
            return []
        split = [sentences(s) for s in secs]
        sites = [(i, j, (m.finding, m.side, not m.negated)) for i, j, _, m in _plain_one_finding(split)
                 if (m.finding, m.side, not m.negated) in self.by_key]
        rng = rng_for(seed, "borrowed_negation", base)
        rng.shuffle(sites)
        out: List[Variant] = []
        for i, j, key in sites:
            for _ in range(3):
                text = _apply(split, i, j, rng.choice(self.by_key[key]))
                if classify_edit(base, text) == "negation" and text not in (v.text for v in out):
                    out.append(Variant(text=text, style="negate_borrowed", equivalent=False, error_type="negation"))
                    break
            if len(out) >= k:
                break
        return out

    def absent_swap_copies(self, report: Report, seed: int = 0, k: int = 1) -> List[Variant]:
        """Up to `k` copies of `report`, each with one of its sentences that rules out one finding
        replaced by a borrowed sentence ruling out a finding the report does not mention.

        Why: a paraphrase query's nearest wrong report is nearly always one with the same present
        findings that rules out other ones (issue 19, thirtieth round); these copies are that
        distractor made from the report itself, a hard negative no other copy type makes. Measured
        on the adapter recipe (thirty-first round): paraphrase did not move and discrimination fell,
        so no recipe sets it."""
        secs = report_sections(report)
        base = join_sections(*secs)
        if not base or k <= 0:
            return []
        mentioned = {m.finding for m in extract_mentions(base)}
        findings = [f for f in self.absent_by_finding if f not in mentioned]
        split = [sentences(s) for s in secs]
        sites = [(i, j) for i, j, _, m in _plain_one_finding(split) if m.negated]
        rng = rng_for(seed, "borrowed_absent_swap", base)
        out: List[Variant] = []
        for _ in range(_TRIES):
            if len(out) >= k or not sites or not findings:
                break
            (i, j), finding = rng.choice(sites), rng.choice(findings)
            text = _apply(split, i, j, rng.choice(self.absent_by_finding[finding]))
            if is_absent_swap(base, text) and text not in (v.text for v in out):
                out.append(Variant(text=text, style="absent_swap_borrowed", equivalent=False, error_type="absent_swap"))
                findings.remove(finding)        # k copies: k different findings
        return out

    def reworded_negations(self, report: Report, seed: int = 0, k: int = 1) -> List[Variant]:
        """Up to `k` rewrites of `report` (positives), each with one of its sentences that rules out
        one finding replaced by another training report's sentence ruling out the same finding and
        side in other words; kept only when the checker reads the same mentions (`equal`).

        Why: the held-out paraphrases word negations in ways the training part of the style split
        does not (six of eight templates held out), and the tower follows that wording (thirtieth
        round); real reports word negations in many ways no template of ours lists. Measured on the
        adapter recipe (thirty-first round): paraphrase did not move and the telegraphic impression
        fell, so no recipe sets it."""
        secs = report_sections(report)
        base = join_sections(*secs)
        if not base or k <= 0:
            return []
        split = [sentences(s) for s in secs]
        sites = []
        for i, j, s, m in _plain_one_finding(split):
            if not m.negated:      # only a sentence ruling a finding out is reworded
                continue
            donors = [d for d in self.by_key.get((m.finding, m.side, True), []) if _norm(d) != _norm(s)]
            if donors:
                sites.append((i, j, donors))
        rng = rng_for(seed, "borrowed_rewording", base)
        rng.shuffle(sites)
        out: List[Variant] = []
        for i, j, donors in sites:
            for _ in range(3):
                text = _apply(split, i, j, rng.choice(donors))
                if text != base and classify_edit(base, text) == "equal" and text not in (v.text for v in out):
                    out.append(Variant(text=text, style="negation_reworded", equivalent=True))
                    break
            if len(out) >= k:
                break
        return out

    def positives(self, report: Report, seed: int) -> List[Variant]:
        return self.reworded_negations(report, seed, self.rewordings)

    def copies(self, report: Report, seed: int) -> List[Variant]:
        return (self.insertion_copies(report, seed, self.insertions) + self.negation_copies(report, seed, self.negations)
                + self.absent_swap_copies(report, seed, self.absent_swaps))


def is_absent_swap(before: str, after: str) -> bool:
    """`after` rules out one finding `before` does not mention in place of one `before` ruled out,
    every other mention unchanged (`mentions.classify_edit` reads two findings changed: None)."""
    a, b = mention_keys(before), mention_keys(after)
    removed, added = a - b, b - a
    if sum(removed.values()) != 1 or sum(added.values()) != 1:
        return False
    (f0, _, n0, _), = removed
    (f1, _, n1, _), = added
    return n0 and n1 and f1 != f0 and f1 not in {key[0] for key in a}


def pool_or_none(reports: List[Report], insertions: int = 0, negations: int = 0, absent_swaps: int = 0,
                 rewordings: int = 0, log=print):
    """A `SentencePool` of `reports` when any copies are asked for (recipe keys
    `supcon.borrowed_insertions`, `supcon.borrowed_negations`, `supcon.borrowed_absent_swaps`,
    `supcon.borrowed_rewordings`), else None."""
    if insertions <= 0 and negations <= 0 and absent_swaps <= 0 and rewordings <= 0:
        return None
    pool = SentencePool(reports, insertions, negations, absent_swaps, rewordings)
    log(f"supcon: borrowed errors: {len(pool)} one-finding sentences of {len(pool.by_finding)} findings "
        f"from {len(reports)} training reports; per report {insertions} insertion, {negations} negation"
        + (f", {absent_swaps} absent-swap" if absent_swaps else "") + " copies"
        + (f"; {rewordings} reworded-negation rewrites" if rewordings else ""))
    return pool
