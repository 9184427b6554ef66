"""Rule-based extraction of (finding, side, negated, severity) mentions.

This is a checker, not a labeller: it only has to read the same report the same
way before and after a rewrite, so that `classify_edit` can tell a clinically
equivalent rewrite (same mentions) from one with a single error (one mention
changed or added). Each sentence is abbreviation-expanded, then read clause by clause.
"""
import re
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import List, Optional, Tuple

from .clean import split_sentences
from .lexicon import expand

# Canonical finding -> regex (lower-case text). Order matters: at one position the
# first alternative wins, so specific multi-word terms precede the generic ones.
FINDINGS: Tuple[Tuple[str, str], ...] = (
    ("pericardial_effusion", r"pericardial effusions?"),
    ("pleural_effusion", r"(?:pleural )?effusions?|hydrothorax"),
    ("pneumothorax", r"(?:hydro)?pneumothora(?:x|ces)"),
    ("pneumoperitoneum", r"pneumoperitoneum|free (?:intraperitoneal |subdiaphragmatic )?air"),
    ("cardiomegaly", r"cardiomegaly|cardiac enlargement|enlarged (?:cardiac silhouette|heart)"
                     r"|enlargement of (?:the )?(?:cardiac silhouette|heart)"
                     r"|(?:heart size|heart|cardiac silhouette)(?: (?:is|are|appears|remains))?"
                     r"(?: not)?(?: (?:mildly|moderately|severely|markedly))? enlarged"),
    ("widened_mediastinum", r"widen(?:ed|ing) (?:of (?:the )?)?mediastinum|mediastinal widening"),
    ("nodule", r"nodular opacit(?:y|ies)|nodules?"),
    ("mass", r"mass(?:es)?"),
    ("consolidation", r"consolidations?|consolidative opacit(?:y|ies)"),
    ("pneumonia", r"pneumonias?"),
    ("atelectasis", r"atelecta(?:sis|ses|tic changes?)|collapse"),
    ("edema", r"(?:(?:pulmonary|interstitial|alveolar) )?edema"),
    ("vascular_congestion", r"(?:pulmonary )?(?:vascular|venous) congestion"),
    ("opacity", r"opacit(?:y|ies)|opacification|airspace disease"),
    ("emphysema", r"emphysema(?:tous changes?)?|chronic obstructive pulmonary disease"),
    ("fibrosis", r"fibrosis|fibrotic changes?|interstitial lung disease"),
    ("lymphadenopathy", r"(?:(?:hilar|mediastinal) )?(?:lymphadenopathy|adenopathy)"),
    ("fracture", r"fractures?"),
    ("hernia", r"(?:hiatal |hiatus )?hernias?"),
    ("granuloma", r"(?:calcified )?granulomas?"),
    ("scoliosis", r"scoliosis"),
    # devices: insertions and laterality errors often concern them
    ("endotracheal_tube", r"endotracheal tube|tracheostomy tube"),
    ("enteric_tube", r"(?:nasogastric|orogastric|enteric|feeding|dobhoff) tube"),
    ("central_line", r"peripherally inserted central catheter(?: line)?|central venous (?:catheter|line)"
                     r"|central line|(?:internal jugular|subclavian)(?: central venous| central)?"
                     r" (?:catheter|line)"),
    ("pa_catheter", r"pulmonary artery catheter|swan-ganz catheter"),
    ("chest_tube", r"chest tubes?|pigtail catheters?|pleural drains?"),
    ("pacemaker", r"(?:automatic )?implantable cardioverter-defibrillator|pacemaker|pacer"
                  r"|cardiac (?:device|pacing leads?)"),
    ("sternotomy", r"(?:median )?sternotomy(?: wires)?"),
)
_FINDING_RE = re.compile("|".join(rf"(?P<f{i}>\b(?:{rx})\b)" for i, (_, rx) in enumerate(FINDINGS)))

SIDES_RE = re.compile(r"\b(left|right)(?:-sided)?\b|\b(bilateral(?:ly)?|bibasilar|bibasal|biapical)\b")
SEVERITY_RE = re.compile(
    r"\b(mild|small|moderate|trace)(?:\s*-\s*|\s+to\s+)(moderate|large|severe)\b"
    r"|\b(trace|tiny|small|minimal|mild(?:ly)?|moderate(?:ly)?|large|severe(?:ly)?|massive|extensive"
    r"|marked(?:ly)?)\b"
)
# Words that end the reach of a modifier written before a finding.
MODIFIER_CUT_RE = re.compile(r",|\b(?:and|or|nor|with|without|in|at|of|within|on|no|not|but)\b")
_PRE_NEG_RE = re.compile(
    r"\b(?:no|without|negative for|free of|absence of|not)\b"
    r"(?!\s+(?:significant\s+|interval\s+|substantial\s+|appreciable\s+|definite\s+|other\s+)?"
    r"(?:change|changes|increase|decrease|worsening|improvement|difference|longer)\b)"
)
_NEG_SCOPE_END_RE = re.compile(
    r"\b(?:but|however|although|though|whereas|which|except|aside from|apart from|other than"
    r"|there (?:is|are)|(?:is|are) (?:present|seen|noted|identified))\b"
)
_ARTICLE_RE = re.compile(r"\b(?:the|a|an)\s+")
_POST_NEG_RE = re.compile(
    r"^[^;,]{0,40}?\b(?:(?:is|are|was|were|has|have|been)\s+)*"
    r"(?:not\s+(?:(?:\w+)\s+)?(?:seen|identified|present|visualized|visible|evident|demonstrated"
    r"|appreciated|detected|noted)|no longer\s+(?:\w+\s+)?(?:seen|present|visualized|visible|identified"
    r"|evident|demonstrated)|absent|resolved)\b"
)
_POST_SIDE_RE = re.compile(
    r"^\s*(?:\w+\s+){0,3}?(?:in|at|of|within|involving|on|along|over|projecting over)\s+"
    r"(?:\w+\s+)?(?:left|right)\b|^\s*bilaterally\b"
)
_POST_SEVERITY_RE = re.compile(
    r"^\s*(?:(?:in|on|at) (?:left|right)(?: \w+)?\s+)?(?:(?:is|are|appears?|remains?|now|again|which is)\s+)+$"
)
# " - " ends a clause unless it joins a severity range ("mild - moderate").
_CLAUSE_RE = re.compile(r";|\s[|/]\s|(?<!mild)(?<!small)(?<!moderate)(?<!trace)\s-\s|,?\s+\b(?:but|however|although|though|whereas)\b,?")
# A line break or a list mark ends a sentence even without a period ("- No effusion\n- Heart normal").
# ("*" and bullets anywhere; "-" and ">" only where a sentence may start: "mild - moderate" is a range).
_ITEM_BREAK_RE = re.compile(r"\s*\n\s*|(?:^|(?<=\s))[*\u2022]\s+|(?:^|(?<=[.!?])\s)\s*[->]\s+")
_COORDINATED_RE = re.compile(r"^[\s,/]*(?:(?:and|or|nor|and/or)\s+)?(?:[a-z-]+\s+){0,2}$")


@dataclass(frozen=True)
class Mention:
    finding: str                 # canonical name from FINDINGS
    side: Optional[str]          # "left", "right", "bilateral" or None
    negated: bool
    severity: Optional[str]      # "small", "mild", "mild-moderate", ... or None
    sentence: int                # index of the sentence in the expanded text
    term: str                    # matched text (lower case)
    span: Tuple[int, int] = (0, 0)  # where `term` is in the lower-cased expanded sentence

    def key(self) -> Tuple:
        # A negated finding has no severity ("no large effusion" == "no effusion").
        return (self.finding, self.side, self.negated, None if self.negated else self.severity)


def _side(word_match: "re.Match") -> str:
    return word_match.group(1) or "bilateral"


def _severity(m: "re.Match") -> str:
    if m.group(1):
        return f"{m.group(1)}-{m.group(2)}"
    w = m.group(3)
    return {"mildly": "mild", "moderately": "moderate", "severely": "severe", "markedly": "marked"}.get(w, w)


def _clauses(sentence: str) -> List[Tuple[int, int]]:
    spans, start = [], 0
    for m in _CLAUSE_RE.finditer(sentence):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(sentence)))
    return spans


def _last(rx: "re.Pattern", text: str):
    found = list(rx.finditer(text))
    return found[-1] if found else None


def _clause_mentions(clause: str, sent_idx: int, offset: int = 0) -> List[Mention]:
    hits = [(m.start(), m.end(), FINDINGS[int(m.lastgroup[1:])][0], m.group(0))
            for m in _FINDING_RE.finditer(clause)]
    out = []
    post_neg = []
    for i, (start, end, finding, term) in enumerate(hits):
        prev_end = hits[i - 1][1] if i else 0
        next_start = hits[i + 1][0] if i + 1 < len(hits) else len(clause)
        before = clause[prev_end:start]
        # Articles removed so that telegraphic style ("in right lower lobe") reads the same.
        after = _ARTICLE_RE.sub("", clause[end:next_start])
        cut = _last(MODIFIER_CUT_RE, before)
        near = before[cut.end():] if cut else before

        side_m = _last(SIDES_RE, near + " " + term)
        side = _side(side_m) if side_m else None
        if side is None:
            post = _POST_SIDE_RE.search(after)
            if post:
                side = _side(_last(SIDES_RE, post.group(0)))

        sev_m = _last(SEVERITY_RE, near + " " + term)
        if sev_m is None:
            after_sev = SEVERITY_RE.search(after)
            if after_sev and _POST_SEVERITY_RE.match(after[:after_sev.start()]):
                sev_m = after_sev
        severity = _severity(sev_m) if sev_m else None

        negated = bool(re.search(r"\bnot\b", term))
        for cue in _PRE_NEG_RE.finditer(clause[:start]):
            if not _NEG_SCOPE_END_RE.search(clause[cue.end():start]):
                negated = True
        post_neg.append(bool(_POST_NEG_RE.search(after)))
        out.append([finding, side, negated, severity, term, before, (offset + start, offset + end)])
    # "Consolidation, effusion or pneumothorax is not seen": the post-cue after the
    # last item negates every item coordinated with it.
    for i in range(len(out) - 1, -1, -1):
        if post_neg[i]:
            out[i][2] = True
            j = i
            while j > 0 and _COORDINATED_RE.match(out[j][5]):
                j -= 1
                out[j][2] = True
    return [Mention(f, s, n, sev, sent_idx, t, sp) for f, s, n, sev, t, _, sp in out]


@lru_cache(maxsize=1 << 16)
def _sentence_mentions(sentence: str) -> Tuple[Mention, ...]:
    # Variants re-read the same sentences many times: cache per sentence.
    low = expand(sentence).lower()
    out: List[Mention] = []
    for a, b in _clauses(low):
        out.extend(_clause_mentions(low[a:b], 0, a))
    return tuple(out)


def extract_mentions(text: str) -> List[Mention]:
    """All finding mentions in `text`, in reading order (spans refer to each expanded sentence)."""
    out: List[Mention] = []
    sents = [s for piece in _ITEM_BREAK_RE.split(text) for s in split_sentences(piece)]
    for k, sentence in enumerate(sents):
        out.extend(replace(m, sentence=k) if k else m for m in _sentence_mentions(sentence))
    return out


def mention_keys(text: str) -> Counter:
    """Multiset of (finding, side, negated, severity) keys."""
    return Counter(m.key() for m in extract_mentions(text))


def classify_edit(before: str, after: str) -> Optional[str]:
    """How `after` differs from `before` in clinical mentions.

    Returns "equal" (same multiset), one of "laterality", "negation", "severity",
    "insertion" when exactly one mention changed in that way (or one was added),
    "subset" when mentions were only dropped, and None for anything else.
    """
    a, b = mention_keys(before), mention_keys(after)
    removed, added = a - b, b - a
    n_rem, n_add = sum(removed.values()), sum(added.values())
    if n_rem == 0 and n_add == 0:
        return "equal"
    if n_add == 0:
        return "subset"
    if n_rem == 0:
        return "insertion" if n_add == 1 else None
    if n_rem != 1 or n_add != 1:
        return None
    (f0, s0, n0, v0), = removed
    (f1, s1, n1, v1), = added
    if f0 != f1:
        return None
    if n0 != n1:
        return "negation" if s0 == s1 else None
    if s0 != s1 and v0 == v1:
        return "laterality"
    if v0 != v1 and s0 == s1:
        return "severity"
    return None
