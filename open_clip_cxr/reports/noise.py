"""Held-out report styles: rewrites that no training rule makes, for the style-held-out protocol.

Stage 1 trains on the "train" part of the rule tables (`style_split`); the suite's held-out
protocol asks how a tower reads reports written in ways it never saw:

- `abbreviate_heldout`: hospital shorthand, every long form of a held-out lexicon entry
  abbreviated, and acronyms written the ways people type them ("RLL", "R.L.L.", "r l l",
  "rll", "rt lower lobe");
- `paraphrase_heldout`: held-out synonym rules and negation templates;
- `typos`: one to three misspelt words (swapped, dropped, doubled or neighbouring-key letters);
- `caps_headers`: the report in capitals under another institution's headers
  ("EXAM: ... FINDINGS: ... IMPRESSION: ...");
- `numbered_list`: each section as a numbered list ("1. ... 2. ...");
- `telegraphic_impression`: the impression alone, telegraphic (no articles or copulas,
  lower case, held-out shorthand), as an on-call reader writes it;
- `hospital_mix`: held-out shorthand, acronym forms, telegraphic sentences, capital headers and a
  typo at once.

Clinical content is kept by construction: the lexical rewrites are checked with the mention
checker before the surface noise (case, dots, spacing, typos, headers) is applied, and typos
never touch negation, side or severity words. Deterministic under `seed`, like `variants`.
"""
import random
import re
from typing import Callable, Dict, List, Optional

from .clean import join_sections, split_sentences
from .lexicon import LEXICON, abbreviate
from .mentions import classify_edit
from .rewrite_common import report_sections, rng_for
from .types import Report, Variant

HELDOUT_STYLES = ("abbreviate_heldout", "paraphrase_heldout", "typos", "caps_headers", "numbered_list",
                  "telegraphic_impression", "hospital_mix")

# ---------------------------------------------------------------- acronyms as typed

_ACRONYMS = sorted({s for e in LEXICON for s in e.short if s.isalpha() and s.isupper() and len(s) >= 2},
                   key=len, reverse=True)
_ACRONYM_RE = re.compile(r"(?<![\w./-])(" + "|".join(_ACRONYMS) + r")(?![\w/-])")
_SIDE = {"R": ("rt", "R", "right"), "L": ("lt", "L", "left")}
_LOBE = {"U": "upper", "M": "middle", "L": "lower"}


def acronym_form(acronym: str, rng: random.Random) -> str:
    """One way of typing `acronym`: dotted, spaced, lower case, or (lobes) half spelt out."""
    forms = [".".join(acronym) + ".", " ".join(acronym.lower()), acronym.lower()]
    if len(acronym) == 3 and acronym[0] in _SIDE and acronym[1] in _LOBE and acronym[2] == "L":
        side = rng.choice(_SIDE[acronym[0]][:2])
        forms.append(f"{side} {_LOBE[acronym[1]]} lobe")
    return rng.choice(forms)


def acronym_forms(text: str, rng: random.Random, p: float = 0.8) -> str:
    """Rewrite each acronym of the lexicon with probability `p` (see `acronym_form`)."""
    return _ACRONYM_RE.sub(lambda m: acronym_form(m.group(1), rng) if rng.random() < p else m.group(1), text)


# ---------------------------------------------------------------- typos

# Words that carry negation, side, severity or change: typos never touch them, and stage 1's token
# dropout never hides them (`open_clip_cxr_train.text_embed.cue_token_mask`).
CUE_WORD_RE = re.compile(r"^(?:no|not|without|negative|free|absent|left|right|bilateral|mild|mildly|moderate|"
                        r"moderately|severe|severely|small|large|tiny|trace|minimal|massive|marked|markedly|"
                        r"new|old|stable|unchanged|increased|decreased|upper|lower|middle)$", re.I)
_KEYS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: Dict[str, str] = {}
for _row in _KEYS:
    for _i, _c in enumerate(_row):
        _NEIGHBOURS[_c] = _row[max(0, _i - 1):_i] + _row[_i + 1:_i + 2]


def typo(word: str, rng: random.Random) -> str:
    """One misspelling of `word` (its first letter kept, as in most real typos)."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double", "neighbour"))
    if kind == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    if kind == "neighbour" and word[i].lower() in _NEIGHBOURS:
        c = rng.choice(_NEIGHBOURS[word[i].lower()])
        return word[:i] + (c.upper() if word[i].isupper() else c) + word[i + 1:]
    return word[:i] + word[i + 1:]


def typos(text: str, rng: random.Random, n: Optional[int] = None) -> Optional[str]:
    """`text` with `n` (default 1 to 3) words of five or more letters misspelt."""
    words = [m for m in re.finditer(r"[A-Za-z]{5,}", text) if not CUE_WORD_RE.match(m.group(0))]
    if not words:
        return None
    n = n or rng.randint(1, 3)
    picked = sorted(rng.sample(words, min(n, len(words))), key=lambda m: m.start())
    out, last = [], 0
    for m in picked:
        out += [text[last:m.start()], typo(m.group(0), rng)]
        last = m.end()
    return "".join(out + [text[last:]])


# ---------------------------------------------------------------- layout

_EXAM_HEADERS = ("EXAM: CHEST 2 VIEWS", "EXAMINATION: CHEST PA AND LATERAL", "PROCEDURE: XR CHEST 2V",
                 "STUDY: RADIOGRAPH OF THE CHEST, TWO VIEWS")
_COMPARISONS = ("COMPARISON: NONE.", "COMPARISON: NONE AVAILABLE.", "PRIORS: NONE.")
_FINDINGS_HEADERS = ("FINDINGS:", "REPORT:", "DISCUSSION:")
_IMPRESSION_HEADERS = ("IMPRESSION:", "CONCLUSION:", "OPINION:", "SUMMARY:")


def caps_headers(sections: List[str], rng: random.Random, upper: bool = True) -> str:
    """The sections in capitals under another institution's headers (which carry no findings);
    `upper=False` keeps the sections' own case (to measure the header lines alone)."""
    case = str.upper if upper else str
    lines = [rng.choice(_EXAM_HEADERS), rng.choice(_COMPARISONS)]
    if len(sections) == 2:
        lines += [f"{rng.choice(_FINDINGS_HEADERS)} {case(sections[0])}",
                  f"{rng.choice(_IMPRESSION_HEADERS)} {case(sections[1])}"]
    else:
        lines.append(f"{rng.choice(_IMPRESSION_HEADERS)} {case(sections[0])}")
    return "\n".join(lines)


def numbered_list(sections: List[str], rng: random.Random) -> Optional[str]:
    """Each section as "1. ... 2. ..." (one sentence an item); None when no section has two sentences."""
    out, changed = [], False
    for sec in sections:
        sents = split_sentences(sec)
        if len(sents) > 1:
            changed = True
            sep = rng.choice(("\n", " "))
            out.append(sep.join(f"{i}. {s}" for i, s in enumerate(sents, 1)))
        else:
            out.append(sec)
    return "\n".join(out) if changed else None


_TELEGRAPH_DROP = re.compile(r"\b(?:the|a|an|there (?:is|are)|is|are|seen|noted|identified|again)\s+", re.I)


def telegraphic(text: str, drop: bool = True, join: bool = True, lower: bool = True) -> str:
    """Articles, existentials and copulas dropped, lower case, sentences joined by ", " (each part
    can be turned off, to measure which one a model fails on: `bench/bench_heldout_parts.py`)."""
    sents = [_TELEGRAPH_DROP.sub("", s).strip() if drop else s for s in split_sentences(text)]
    out = ", ".join(s.rstrip(".") for s in sents if s) if join else " ".join(s for s in sents if s)
    return out.lower() if lower else out


HOSPITAL_PARTS = ("shorthand", "acronyms", "telegraphic", "headers", "typo")


def hospital_mix(report: Report, rng: random.Random, parts=HOSPITAL_PARTS, verify: bool = True) -> str:
    """The `hospital_mix` style: held-out shorthand, typed acronyms, telegraphic sentences, capital
    headers and one typo, in that order (`parts`: a subset, to measure each one's share)."""
    sections = report_sections(report)
    base = join_sections(*sections)
    short = abbreviate(base, rng, p=1.0, part="heldout") if "shorthand" in parts else None
    if short is not None and verify and classify_edit(base, short) != "equal":
        short = None
    secs = _split_like(short or base, sections)
    if "acronyms" in parts:
        secs = [acronym_forms(x, rng) for x in secs]
    if "telegraphic" in parts:
        secs = [telegraphic(x) for x in secs]
    text = caps_headers(secs, rng) if "headers" in parts else join_sections(*secs)
    return (typos(text, rng, n=1) or text) if "typo" in parts else text


# ---------------------------------------------------------------- the held-out variants

def heldout_variants(report: Report, seed: int = 0, verify: bool = True) -> List[Variant]:
    """One equivalent variant per HELDOUT_STYLES entry that applies, made only from the held-out
    part of the rule tables and from the operations above (never from a training rule)."""
    from .variants import _rephrase
    sections = report_sections(report)
    base = join_sections(*sections)
    if not base:
        return []
    both = bool(report.findings.strip() and report.impression.strip())

    def checked(new: Optional[str], allowed=("equal",)) -> Optional[str]:
        """A lexical rewrite, kept when the mention checker reads it as the report."""
        if new is None or not verify:
            return new
        return new if classify_edit(base, new) in allowed else None

    def abbrev_heldout(r):
        short = checked(abbreviate(base, r, p=1.0, part="heldout"))
        if short is None:
            return None
        noisy = acronym_forms(short, r)
        return noisy if noisy != base else None

    def telegraphic_impression(r):
        if not both:
            return None
        imp = checked(abbreviate(report.impression.strip(), r, p=1.0, part="heldout"), ("equal", "subset"))
        return telegraphic(imp or report.impression.strip())

    makers: Dict[str, Callable[[random.Random], Optional[str]]] = {
        "abbreviate_heldout": abbrev_heldout,
        "paraphrase_heldout": lambda r: checked(_rephrase(sections, r, "heldout")),
        "typos": lambda r: typos(base, r),
        "caps_headers": lambda r: caps_headers(sections, r),
        "numbered_list": lambda r: numbered_list(sections, r),
        "telegraphic_impression": telegraphic_impression,
        "hospital_mix": lambda r: hospital_mix(report, r, verify=verify),
    }
    out = []
    for style in HELDOUT_STYLES:
        text = makers[style](rng_for(seed, "heldout", style, base))
        if text and text != base:
            out.append(Variant(text=text, style=style, equivalent=True))
    return out


def _split_like(text: str, sections: List[str]) -> List[str]:
    """`text` (the sections joined and rewritten) cut back into as many sections, by sentence count."""
    if len(sections) < 2:
        return [text]
    n_first = len(split_sentences(sections[0]))
    sents = split_sentences(text)
    if len(sents) != sum(len(split_sentences(s)) for s in sections):
        return [text]
    return [" ".join(sents[:n_first]), " ".join(sents[n_first:])]


def heldout_negatives(report: Report, seed: int = 0) -> List[Variant]:
    """Single-error rewrites from the held-out error templates."""
    from .negatives import hard_negatives
    return hard_negatives(report, seed, part="heldout")


# ---------------------------------------------------------------- input normalisation (not a rewrite)

_KEEP_CAPS = {s for e in LEXICON for s in e.short if s.isupper()}


def unshout(text: str, threshold: float = 0.6) -> str:
    """`text` lower-cased (lexicon acronyms kept) when more than `threshold` of its letters are
    capitals; other texts unchanged. An input normaliser for encoders that read case (a tower
    trained on sentence-case reports does not read an all-caps report: see the README)."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isupper() for c in letters) / len(letters) <= threshold:
        return text
    return re.sub(r"[A-Za-z]+", lambda m: m.group(0) if m.group(0) in _KEEP_CAPS else m.group(0).lower(), text)
