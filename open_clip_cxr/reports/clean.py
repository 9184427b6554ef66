"""Text normalisation and sentence splitting for radiology reports."""
import re
import unicodedata
from typing import List

DEID = "___"

# MIMIC writes de-identified spans as runs of underscores, Open-I as "XXXX"
# (sometimes glued to a word, e.g. "x-XXXX"); both become one token.
_DEID_RE = re.compile(r"_{2,}|(?<![A-Za-z])X{3,}(?=[AP]M\b|[^A-Za-z]|$)")
# "1." / "2)" / "(3)" list markers at the start of the text, of a line, or after a
# sentence end. A digit followed by a digit or a unit ("1.5 cm", "2. cm") is not a marker.
_NUMBERING_RE = re.compile(
    r"(^|\n|(?<=[.;:!?])[ \t]+)[ \t]*(?:\(\d{1,2}\)|\d{1,2}[.)])[ \t]+(?=[A-Za-z_(])"
)
_BULLET_RE = re.compile(r"(^|\n)[ \t]*[-*\u2022][ \t]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,.;:!?)\]])")
_SPACE_AFTER_OPEN_RE = re.compile(r"([(\[])\s+")
_MISSING_SPACE_RE = re.compile(r"([,;])(?=[A-Za-z(])|(?<=[a-z)])([.:!?])(?=[A-Z][a-z])")
_REPEATED_PUNCT_RE = re.compile(r"([,;:])\1+|\.{2,}(?!\.)")


def clean_text(s: str) -> str:
    """Return `s` on one line with normalised whitespace, de-id marks, numbering and punctuation."""
    if not s:
        return ""
    s = unicodedata.normalize("NFKC", s).replace("\r\n", "\n").replace("\r", "\n")
    s = _DEID_RE.sub(DEID, s)
    s = _BULLET_RE.sub(r"\1", s)
    s = _NUMBERING_RE.sub(r"\1", s)
    s = re.sub(r"\s+", " ", s)
    s = _REPEATED_PUNCT_RE.sub(lambda m: m.group(1) or ".", s)
    s = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", s)
    s = _SPACE_AFTER_OPEN_RE.sub(r"\1", s)
    s = _MISSING_SPACE_RE.sub(lambda m: (m.group(1) or m.group(2)) + " ", s)
    # De-id marks next to each other ("___ ___") carry no more information than one.
    s = re.sub(r"___(?:\s*___)+", DEID, s)
    return s.strip()


# Words whose trailing period never ends a sentence in a report.
_ABBREVIATIONS = {
    "e.g", "i.e", "eg", "ie", "vs", "dr", "drs", "mr", "mrs", "ms", "approx", "etc", "cf",
    "nos", "fig", "st", "incl", "resp", "mt", "al", "ca", "esp", "u.s",
}
_BOUNDARY_RE = re.compile(r"([.!?])([\"')\]]*)(\s+)")


def _last_word(text: str) -> str:
    m = re.search(r"([A-Za-z][A-Za-z.]*)$", text)
    return m.group(1).lower() if m else ""


def split_sentences(s: str) -> List[str]:
    """Split cleaned report text into sentences.

    Only a ``.``/``!``/``?`` followed by whitespace can end a sentence, so decimals
    ("1.5 cm") and slashed abbreviations ("s/p") are safe; a period after a known
    abbreviation ("e.g.", "Dr.") or a single-letter initial does not split.
    """
    s = s.strip()
    if not s:
        return []
    out, start = [], 0
    for m in _BOUNDARY_RE.finditer(s):
        end = m.end(2)
        nxt = s[m.end():m.end() + 1]
        if not nxt:
            break
        if m.group(1) == ".":
            word = _last_word(s[start:m.start(1)])
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha() and word != "x"):
                continue
            # "No." is an abbreviation only before a number ("No. 2").
            if word == "no" and nxt.isdigit():
                continue
        if not (nxt.isalnum() or nxt in "_(\"'"):
            continue
        piece = s[start:end].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = s[start:].strip()
    if tail:
        out.append(tail)
    return out


def terminate(s: str) -> str:
    """`s` with a final period when it ends without one (so that joined pieces stay sentences)."""
    s = s.strip()
    return s + "." if s and s[-1] not in ".!?" else s


def join_sections(*parts: str) -> str:
    """The text a model reads: the non-empty cleaned sections, each ending a sentence, space-separated."""
    return " ".join(terminate(p) for p in parts if p and p.strip())
