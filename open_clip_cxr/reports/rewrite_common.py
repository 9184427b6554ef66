"""Helpers shared by the equivalent-variant and hard-negative rewriters."""
import hashlib
import random
import re
from typing import List

from .clean import join_sections, split_sentences, terminate
from .types import Report


def rng_for(seed: int, *parts: str) -> random.Random:
    """An RNG seeded by sha256(seed, parts): stable across processes, unlike hash()."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def report_sections(report: Report) -> List[str]:
    """[findings, impression] (non-empty ones), or [text] for a report without sections."""
    secs = [s.strip() for s in (report.findings, report.impression) if s and s.strip()]
    if not secs and report.text and report.text.strip():
        secs = [report.text.strip()]
    return secs


def base_text(report: Report) -> str:
    """The text variants are derived from and compared with: findings + impression."""
    return join_sections(*report_sections(report))


def sentences(section: str) -> List[str]:
    """Sentences, each ending with a period, so that moving one cannot merge two."""
    return [terminate(s) for s in split_sentences(section)]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def decap(s: str) -> str:
    first = s.split(" ", 1)[0]
    if first.isupper() or first.endswith(".") or first.startswith("___") or first[1:2].isupper():
        return s      # acronyms ("PTX", "AP"), "Dr." and de-id marks keep their case
    return s[:1].lower() + s[1:]


# Words that show a phrase is a clause, not a plain noun phrase that can be moved into a template.
NOT_NP_RE = re.compile(r"\b(?:is|are|was|were|has|have|had|seen|identified|noted|present|since|compared|"
                       r"given|to|which|but|with|when|after|before|change|changes|changed|longer|"
                       r"evidence|there|not|no)\b|[;:()]", re.I)
LIST_RE = re.compile(r",| or | and | nor ")


def is_np(x: str) -> bool:
    """True for a plain noun phrase ("focal consolidation or effusion")."""
    return bool(x) and not NOT_NP_RE.search(x)


def plural(x: str) -> bool:
    """Whether a noun phrase takes "are" ("effusions") rather than "is" ("atelectasis")."""
    last = x.split()[-1].lower()
    return last.endswith("s") and not last.endswith(("ss", "sis", "us", "x")) and last != "is"
