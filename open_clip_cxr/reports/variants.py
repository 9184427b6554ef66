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
from .style_split import in_part
from .truncate import truncate_words
from .types import Report, Variant

__all__ = ["VARIANT_STYLES", "ERROR_TYPES", "equivalent_variants", "hard_negatives", "make_variants", "base_text",
           "with_context_lines"]

VARIANT_STYLES = ("abbreviate", "expand", "impression_only", "findings_only", "reorder", "rephrase", "terse",
                  "lowercase", "line_list", "section_headers", "compose", "separators", "bullets",
                  "context_lines", "truncate")
# Layout and composition families (training side only; the held-out protocol has its own, in `noise`):
# lower case (held out: capitals), a sentence a line (held out: numbered lists), our own section headers
# (held out: another institution's) and train rules composed
# (abbreviate + rephrase + terse at once; held out: `hospital_mix`), sentences joined by other marks
# (held out: ", ", as in `noise.telegraphic`), bulleted items (held out: numbered items) and
# lines that say no finding around the report: exam, comparison, sign-off (held out: another
# institution's exam and comparison lines, `noise.caps_headers`); long words cut to their first
# letters, never a held-out entry's word (held out: that entry's shorthand, `reports.truncate`).


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


def _negation_rephrasings(sentence: str, part: Optional[str] = None) -> List[str]:
    """Other ways to write a purely negative sentence, with the same negated findings
    (output templates of the style split's `part`; None: all)."""
    # "\.+$": a report typed "No acute findings.." must not become "Acute findings. is absent."
    forms = [
        (r"^No (?P<x>.+?)\.+$", "no"),
        (r"^There (?:is|are) no evidence of (?P<x>.+?)\.+$", "there_no_evidence"),
        (r"^No evidence of (?P<x>.+?)\.+$", "no_evidence"),
        (r"^There (?:is|are) no (?P<x>.+?)\.+$", "there_no"),
        (r"^(?P<x>.+?) (?:is|are) (?:absent|not seen|not identified)\.+$", "absent"),
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
            "negative_for": f"Negative for {x}.",
            "no_radiographic_evidence": f"No radiographic evidence of {x}.",
            "not_seen": f"{cap(x)} {be} not seen." if single else None,
            "free_of": f"Free of {x}.",
        }
        options.pop(kind if kind != "no_evidence" else "no")
        return [o for k, o in options.items() if o and o != sentence and in_part("negation_template", k, part)]
    return []


_SEV_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_SEV_ADJ = {v: k for k, v in _SEV_ADVERB.items()}
# (pattern, replacement function); both directions are listed, each keeps meaning exactly.
_SYNONYMS: Tuple[Tuple[str, "re.Pattern", Callable[["re.Match"], str]], ...] = (
    ("cardiomegaly->enlarged silhouette", re.compile(r"\b(?:(mild|moderate|severe) )?cardiomegaly\b", re.I),
     lambda m: (_SEV_ADVERB[m.group(1).lower()] + " " if m.group(1) else "") + "enlarged cardiac silhouette"),
    ("enlarged silhouette->cardiomegaly",
     re.compile(r"\b(?:(mildly|moderately|severely) )?enlarged cardiac silhouette\b", re.I),
     lambda m: (_SEV_ADJ[m.group(1).lower()] + " " if m.group(1) else "") + "cardiomegaly"),
    ("heart size normal", re.compile(r"\b(?:the )?heart size is normal\b", re.I),
     lambda m: "the heart is normal in size"),
    ("heart normal in size", re.compile(r"\bthe heart is normal in size\b", re.I), lambda m: "heart size is normal"),
    ("silhouette normal", re.compile(r"\bcardiomediastinal silhouette is normal\b", re.I),
     lambda m: "cardiomediastinal silhouette is within normal limits"),
    ("silhouette wnl", re.compile(r"\bcardiomediastinal silhouette is within normal limits\b", re.I),
     lambda m: "cardiomediastinal silhouette is normal"),
    ("process->abnormality", re.compile(r"\bacute cardiopulmonary process\b", re.I),
     lambda m: "acute cardiopulmonary abnormality"),
    ("abnormality->process", re.compile(r"\bacute cardiopulmonary abnormality\b", re.I),
     lambda m: "acute cardiopulmonary process"),
    ("adenopathy", re.compile(r"\bhilar adenopathy\b", re.I), lambda m: "hilar lymphadenopathy"),
    ("osseous->bony", re.compile(r"\bosseous structures\b", re.I), lambda m: "bony structures"),
    ("bony->osseous", re.compile(r"\bbony structures\b", re.I), lambda m: "osseous structures"),
    # more pairs, each exact in meaning (the mention checker verifies every rewrite)
    ("lungs clear", re.compile(r"\bthe lungs are clear\b", re.I), lambda m: "the lungs are without focal abnormality"),
    ("clear lungs", re.compile(r"\blungs are clear\b", re.I), lambda m: "lung fields are clear"),
    ("vascularity", re.compile(r"\bpulmonary vascularity\b", re.I), lambda m: "pulmonary vasculature"),
    ("vasculature", re.compile(r"\bpulmonary vasculature\b", re.I), lambda m: "pulmonary vascularity"),
    ("within normal limits->normal", re.compile(r"\b(is|are) within normal limits\b", re.I),
     lambda m: m.group(1) + " normal"),
    ("unremarkable->normal", re.compile(r"\b(is|are) unremarkable\b", re.I), lambda m: m.group(1) + " normal"),
    ("stable->unchanged", re.compile(r"\b(is|are) stable\b", re.I), lambda m: m.group(1) + " unchanged"),
    ("unchanged->stable", re.compile(r"\b(is|are) unchanged\b", re.I), lambda m: m.group(1) + " stable"),
    ("hyperinflated", re.compile(r"\bhyperinflated\b", re.I), lambda m: "hyperexpanded"),
    ("hyperexpanded", re.compile(r"\bhyperexpanded\b", re.I), lambda m: "hyperinflated"),
    ("hyperinflation", re.compile(r"\bhyperinflation\b", re.I), lambda m: "hyperexpansion"),
    ("degenerative changes", re.compile(r"\bdegenerative changes\b", re.I), lambda m: "degenerative change"),
    ("acute abnormality->disease", re.compile(r"\bacute (?:cardiopulmonary )?(?:abnormality|process)\b", re.I),
     lambda m: "acute disease"),
    ("is seen->is noted", re.compile(r"\b(is|are) seen\b", re.I), lambda m: m.group(1) + " noted"),
    ("is noted->is seen", re.compile(r"\b(is|are) noted\b", re.I), lambda m: m.group(1) + " seen"),
    ("heart and lungs", re.compile(r"\bheart and lungs\b", re.I), lambda m: "lungs and heart"),
    ("no acute findings", re.compile(r"\bno acute findings\b", re.I), lambda m: "no acute abnormality"),
)


def synonym_names(part: Optional[str] = None) -> List[str]:
    """Names of the synonym rules of one part of the style split (None: all)."""
    return [n for n, _, _ in _SYNONYMS if in_part("synonym", n, part)]


_RANGE_BEFORE_RE = re.compile(r"(?:\bto\s+|-)(?:\w+\s+)?$")


def _synonym_rewrite(sentence: str, rng: random.Random, part: Optional[str] = None) -> Optional[str]:
    rules = [(rx, fn) for name, rx, fn in _SYNONYMS if in_part("synonym", name, part)]
    rng.shuffle(rules)    # several rules may apply: any one of them
    for rx, fn in rules:
        m = rx.search(sentence)
        # "mild to moderate cardiomegaly": the severity is a range, leave it alone
        if m and not _RANGE_BEFORE_RE.search(sentence[:m.start()]):
            repl = fn(m)
            if m.group(0)[:1].isupper():
                repl = cap(repl)
            return sentence[:m.start()] + repl + sentence[m.end():]
    return None


def _rephrase(sections: List[str], rng: random.Random, part: Optional[str] = None) -> Optional[str]:
    # Collect every sentence that has a rewrite, then apply each with p=0.5 (at least one).
    split = [sentences(s) for s in sections]
    options = []
    for i, sents in enumerate(split):
        for j, s in enumerate(sents):
            alts = _negation_rephrasings(s, part)
            syn = _synonym_rewrite(s, rng, part)
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


def _lowercase(text: str) -> str:
    """Lower case, acronyms kept ("PTX", "RLL": lower-cased they are the held-out typed forms)."""
    return re.sub(r"\b\w+\b", lambda m: m.group(0) if m.group(0).isupper() and len(m.group(0)) > 1
                  else m.group(0).lower(), text)


def _line_list(sections: List[str], rng: random.Random) -> Optional[str]:
    """One sentence a line, a blank line between sections (no item markers: the held-out side numbers)."""
    out = ["\n".join(split_sentences(sec)) for sec in sections]
    text = "\n\n".join(out)
    return text if "\n" in text else None


# Sentence joins the training side writes. ", " is left out on purpose: the held-out telegraphic
# style joins with it, so the protocol asks whether separator-invariance transfers to a new mark.
# No bare space either: "No effusion heart normal" is ambiguous to a reader too.
_TRAIN_SEPARATORS = ("; ", " - ", " / ", " | ", "\n")
_BULLETS = ("- ", "* ", "\u2022 ", "> ")     # held out: "1. ", "2. " (`noise.numbered_list`)


def _separators(sections: List[str], rng: random.Random) -> Optional[str]:
    """Each section's sentences joined by another mark, final periods dropped, a sentence's first
    letter lower-cased half the time; None for one-sentence reports."""
    out, changed = [], False
    for sec in sections:
        sents = [s.rstrip(".") for s in split_sentences(sec)]
        changed |= len(sents) > 1
        sep = rng.choice(_TRAIN_SEPARATORS)
        lower = rng.random() < 0.5
        out.append(sep.join([sents[0]] + [decap(s) if lower else s for s in sents[1:]]))
    return "\n".join(out) if changed else None


def _bullets(sections: List[str], rng: random.Random) -> Optional[str]:
    """Each sentence a bulleted item (one mark a report), on its own line or inline."""
    mark, sep = rng.choice(_BULLETS), rng.choice(("\n", " "))
    items = [mark + s for sec in sections for s in split_sentences(sec)]
    return sep.join(items) if len(items) > 1 else None


def _section_headers(sections: List[str], rng: random.Random) -> str:
    if len(sections) == 2:
        f, i = rng.choice((("Findings:", "Impression:"), ("FINDINGS:", "IMPRESSION:"), ("Findings -", "Impression -")))
        return f"{f} {sections[0]}\n{i} {sections[1]}"
    return f"{rng.choice(('Findings:', 'Impression:', 'FINDINGS:'))} {sections[0]}"


# Lines a report arrives with that carry no finding. None of them is a held-out line of
# `noise` (a test checks): the tower must learn to skip such lines, not to know these ones.
# Short forms only from the lexicon's training part (PA, AP, lat; CXR and XR are held out).
_TRAIN_EXAM_LINES = ("Chest radiograph, frontal and lateral views.", "Chest PA/lat", "Portable AP chest.",
                     "Technique: PA and lateral views of the chest.", "Views: frontal and lateral.",
                     "Chest x-ray, 2 views", "Exam type: chest, PA and lateral", "Radiographs of the chest.")
_TRAIN_COMPARISON_LINES = ("Comparison: prior radiograph.", "No prior studies for comparison.",
                           "Compared with the previous examination.", "Prior: none", "Comparison: outside film.",
                           "Comparison: chest x-ray from last year.")
_TRAIN_SIGNOFF_LINES = ("Electronically signed.", "Dictated and reviewed by the attending radiologist.",
                        "Final report.", "Report approved.")


def _head_lines(rng: random.Random) -> List[str]:
    head = [rng.choice(_TRAIN_EXAM_LINES)] if rng.random() < 0.8 else []
    if rng.random() < 0.7 or not head:
        head.append(rng.choice(_TRAIN_COMPARISON_LINES))
    return head


def _tail_lines(rng: random.Random) -> List[str]:
    return [rng.choice(_TRAIN_SIGNOFF_LINES)] if rng.random() < 0.3 else []


def with_context_lines(text: str, rng: random.Random) -> str:
    """`text` between lines that say no finding: an exam line and/or a comparison line before it,
    sometimes a sign-off after it (training-part lines only; `supcon.context_lines_p`)."""
    head = _head_lines(rng)
    return "\n".join(head + [text] + _tail_lines(rng))


def _context_lines(sections: List[str], rng: random.Random) -> str:
    """The report between lines that say no finding (as `with_context_lines`), its sections
    sometimes under our section headers."""
    head = _head_lines(rng)
    body = _section_headers(sections, rng) if rng.random() < 0.5 else join_sections(*sections)
    return "\n".join(head + [body] + _tail_lines(rng))


def _compose(sections: List[str], rng: random.Random, part: Optional[str]) -> Optional[str]:
    """Train rules at once: rephrase, then terse, then abbreviate (each when it applies)."""
    text = _rephrase(sections, rng, part) or join_sections(*sections)
    secs = [text] if len(sections) < 2 else _resplit(text, sections)
    text = _terse(secs, rng) or text
    return abbreviate(text, rng, p=0.9, part=part)


def _resplit(text: str, sections: List[str]) -> List[str]:
    n_first = len(split_sentences(sections[0]))
    sents = split_sentences(text)
    return [" ".join(sents[:n_first]), " ".join(sents[n_first:])] if len(sents) > n_first else [text]


def equivalent_variants(report: Report, seed: int = 0, verify: bool = True,
                        part: Optional[str] = None) -> List[Variant]:
    """Rewrites with the same clinical content, one per style that applies (see VARIANT_STYLES),
    drawn from the rule entries of the style split's `part` ("train", "heldout"; None: all)."""
    sections = report_sections(report)
    base = join_sections(*sections)
    if not base:
        return []
    both = bool(report.findings.strip() and report.impression.strip())
    makers = {
        "abbreviate": lambda r: abbreviate(base, r, part=part),
        "expand": lambda r: expand(base, part=part),
        "impression_only": lambda r: report.impression.strip() if both else None,
        "findings_only": lambda r: report.findings.strip() if both else None,
        "reorder": lambda r: _reorder(sections, r),
        "rephrase": lambda r: _rephrase(sections, r, part),
        "terse": lambda r: _terse(sections, r),
        "lowercase": lambda r: _lowercase(base),
        "line_list": lambda r: _line_list(sections, r),
        "section_headers": lambda r: _section_headers(sections, r),
        "compose": lambda r: _compose(sections, r, part),
        "separators": lambda r: _separators(sections, r),
        "bullets": lambda r: _bullets(sections, r),
        "context_lines": lambda r: _context_lines(sections, r),
        "truncate": lambda r: truncate_words(base, r, part=part),
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


def make_variants(report: Report, seed: int = 0, part: Optional[str] = None) -> List[Variant]:
    """Equivalent variants followed by hard negatives (of the style split's `part`; None: all)."""
    return equivalent_variants(report, seed, part=part) + hard_negatives(report, seed, part=part)
