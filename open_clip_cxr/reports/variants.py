"""Clinically equivalent rewrites of a report (positives), plus `make_variants`.

Everything is deterministic under `seed`: each style draws from its own RNG seeded
by sha256(seed, style, text). Every candidate is checked with the mention checker
(`mentions.classify_edit`): an equivalent variant must read as the same findings
(or a subset, for the one-section styles); candidates that fail are dropped
(`verify=False` turns the check off, which the tests use to test the rules themselves).
Hard negatives live in `negatives.py` and are re-exported here.
"""
import random
import re
from typing import Callable, List, Optional, Sequence, Tuple

from .clean import join_sections, split_sentences
from .lexicon import abbreviate, expand
from .mentions import classify_edit
from .negatives import ERROR_TYPES, hard_negatives
from .rewrite_common import LIST_RE, base_text, cap, decap, is_np, plural, report_sections, rng_for, sentences
from .types import Report, Variant

__all__ = ["VARIANT_STYLES", "ERROR_TYPES", "equivalent_variants", "hard_negatives", "make_variants", "base_text"]

VARIANT_STYLES = ("abbreviate", "expand", "impression_only", "findings_only", "reorder", "rephrase", "terse")


# ---------------------------------------------------------------- equivalent styles

_ANAPHORA_RE = re.compile(r"^(?:it|this|these|they|that|those|which|again|otherwise|however|also|"
                          r"additionally|findings|the findings|there has been no change)\b", re.I)


def _blocks(sents: Sequence[str]) -> List[List[str]]:
    """Sentences grouped so that one that refers back ("It is unchanged.") stays with its antecedent."""
    blocks: List[List[str]] = []
    for s in sents:
        if blocks and _ANAPHORA_RE.match(s):
            blocks[-1].append(s)
        else:
            blocks.append([s])
    return blocks


def _reorder(sections: List[str], rng: random.Random) -> Optional[str]:
    out, changed = [], False
    for sec in sections:
        blocks = _blocks(sentences(sec))
        if len(blocks) > 1:
            order = list(range(len(blocks)))
            rng.shuffle(order)
            if order == sorted(order):
                order = order[1:] + order[:1]
            blocks = [blocks[i] for i in order]
            changed = True
        out.append(" ".join(s for b in blocks for s in b))
    if not changed and len(sections) == 2:
        out, changed = out[::-1], True     # impression first is still the same report
    return join_sections(*out) if changed else None


def _negation_rephrasings(sentence: str) -> List[str]:
    """Other ways to write a purely negative sentence, with the same negated findings."""
    forms = [
        (r"^No (?P<x>.+)\.$", "no"),
        (r"^There (?:is|are) no evidence of (?P<x>.+)\.$", "there_no_evidence"),
        (r"^No evidence of (?P<x>.+)\.$", "no_evidence"),
        (r"^There (?:is|are) no (?P<x>.+)\.$", "there_no"),
        (r"^(?P<x>.+?) (?:is|are) (?:absent|not seen|not identified)\.$", "absent"),
    ]
    for rx, kind in forms:
        m = re.match(rx, sentence, re.I)
        if not m:
            continue
        x = m.group("x")
        if kind == "absent":
            x = decap(x)
        if not is_np(x):
            return []
        single = not LIST_RE.search(x)
        be = "are" if plural(x) else "is"
        options = {
            "no": f"No {x}.",
            "there_no_evidence": f"There is no evidence of {x}.",
            "there_no": f"There {be} no {x}.",
            "absent": f"{cap(x)} {be} absent." if single else None,
        }
        options.pop(kind if kind != "no_evidence" else "no")
        return [o for o in options.values() if o and o != sentence]
    return []


_SEV_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_SEV_ADJ = {v: k for k, v in _SEV_ADVERB.items()}
# (pattern, replacement function); both directions are listed, each keeps meaning exactly.
_SYNONYMS: Tuple[Tuple["re.Pattern", Callable[["re.Match"], str]], ...] = (
    (re.compile(r"\b(?:(mild|moderate|severe) )?cardiomegaly\b", re.I),
     lambda m: (_SEV_ADVERB[m.group(1).lower()] + " " if m.group(1) else "") + "enlarged cardiac silhouette"),
    (re.compile(r"\b(?:(mildly|moderately|severely) )?enlarged cardiac silhouette\b", re.I),
     lambda m: (_SEV_ADJ[m.group(1).lower()] + " " if m.group(1) else "") + "cardiomegaly"),
    (re.compile(r"\b(?:the )?heart size is normal\b", re.I), lambda m: "the heart is normal in size"),
    (re.compile(r"\bthe heart is normal in size\b", re.I), lambda m: "heart size is normal"),
    (re.compile(r"\bcardiomediastinal silhouette is normal\b", re.I),
     lambda m: "cardiomediastinal silhouette is within normal limits"),
    (re.compile(r"\bcardiomediastinal silhouette is within normal limits\b", re.I),
     lambda m: "cardiomediastinal silhouette is normal"),
    (re.compile(r"\bacute cardiopulmonary process\b", re.I), lambda m: "acute cardiopulmonary abnormality"),
    (re.compile(r"\bacute cardiopulmonary abnormality\b", re.I), lambda m: "acute cardiopulmonary process"),
    (re.compile(r"\bhilar adenopathy\b", re.I), lambda m: "hilar lymphadenopathy"),
    (re.compile(r"\bosseous structures\b", re.I), lambda m: "bony structures"),
    (re.compile(r"\bbony structures\b", re.I), lambda m: "osseous structures"),
)


_RANGE_BEFORE_RE = re.compile(r"(?:\bto\s+|-)(?:\w+\s+)?$")


def _synonym_rewrite(sentence: str, rng: random.Random) -> Optional[str]:
    for rx, fn in _SYNONYMS:
        m = rx.search(sentence)
        # "mild to moderate cardiomegaly": the severity is a range, leave it alone
        if m and not _RANGE_BEFORE_RE.search(sentence[:m.start()]):
            repl = fn(m)
            if m.group(0)[:1].isupper():
                repl = cap(repl)
            return sentence[:m.start()] + repl + sentence[m.end():]
    return None


def _rephrase(sections: List[str], rng: random.Random) -> Optional[str]:
    # Collect every sentence that has a rewrite, then apply each with p=0.5 (at least one).
    split = [sentences(s) for s in sections]
    options = []
    for i, sents in enumerate(split):
        for j, s in enumerate(sents):
            alts = _negation_rephrasings(s)
            syn = _synonym_rewrite(s, rng)
            if syn:
                alts.append(syn)
            if alts:
                options.append((i, j, alts))
    if not options:
        return None
    chosen = [rng.random() < 0.5 for _ in options]
    if not any(chosen):
        chosen[rng.randrange(len(options))] = True
    for (i, j, alts), use in zip(options, chosen):
        if use:
            split[i][j] = rng.choice(alts)
    return join_sections(*(" ".join(s) for s in split))


_COPULA_DROP_RE = re.compile(
    r"\s+(?:is|are)\s+(?=(?:normal|clear|unremarkable|stable|unchanged|intact|absent|present|seen|noted|"
    r"identified|within|not|mildly|moderately|severely|enlarged|again|likely|probably|grossly|"
    r"top-normal|similar|in|at|well|slightly|increased|decreased|improved|worse|new)\b)", re.I)
_ARTICLE_RE = re.compile(r"\b(?:the|a|an)\s+(?=\S)", re.I)


def _terse_sentence(s: str) -> str:
    s = re.sub(r"^There (?:is|are)\s+(?:(?:a|an|the)\s+)?", "", s, flags=re.I)
    s = _ARTICLE_RE.sub("", s)
    s = _COPULA_DROP_RE.sub(" ", s)
    return cap(s.strip())


def _terse(sections: List[str], rng: random.Random) -> Optional[str]:
    out = []
    for sec in sections:
        sents = [_terse_sentence(s).rstrip(".") for s in split_sentences(sec)]
        sents = [s for s in sents if s]
        if not sents:
            continue
        out.append("; ".join([sents[0]] + [decap(s) for s in sents[1:]]) + ".")
    return join_sections(*out)


def equivalent_variants(report: Report, seed: int = 0, verify: bool = True) -> List[Variant]:
    """Rewrites with the same clinical content, one per style that applies (see VARIANT_STYLES)."""
    sections = report_sections(report)
    base = join_sections(*sections)
    if not base:
        return []
    both = bool(report.findings.strip() and report.impression.strip())
    makers = {
        "abbreviate": lambda r: abbreviate(base, r),
        "expand": lambda r: expand(base),
        "impression_only": lambda r: report.impression.strip() if both else None,
        "findings_only": lambda r: report.findings.strip() if both else None,
        "reorder": lambda r: _reorder(sections, r),
        "rephrase": lambda r: _rephrase(sections, r),
        "terse": lambda r: _terse(sections, r),
    }
    out = []
    for style in VARIANT_STYLES:
        text = makers[style](rng_for(seed, style, base))
        if not text or text == base:
            continue    # the style does not apply: no copies
        if verify:
            allowed = ("equal", "subset") if style.endswith("_only") else ("equal",)
            if classify_edit(base, text) not in allowed:
                continue
        out.append(Variant(text=text, style=style, equivalent=True))
    return out


def make_variants(report: Report, seed: int = 0) -> List[Variant]:
    """Equivalent variants followed by hard negatives."""
    return equivalent_variants(report, seed) + hard_negatives(report, seed)
