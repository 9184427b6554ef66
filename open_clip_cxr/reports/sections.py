"""Split a free-text radiology report (MIMIC-CXR style) into its sections."""
import re
from typing import Dict, List, Tuple

from .admin_lines import ADMIN_LABELS
from .clean import clean_text

SECTION_KEYS = ("findings", "impression", "indication", "comparison", "technique", "history")

# Header name (lower case) -> section. "other" sections (notification, wet read, ...)
# are recognised only so that they end the section before them.
_HEADERS: Dict[str, Tuple[str, ...]] = {
    "findings": ("findings", "finding", "chest findings", "radiographic findings", "findings and impression",
                 "impression and findings", "description", "report"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "final impression", "summary",
                   "opinion", "interpretation", "diagnosis"),
    # indication, history, comparison, technique, examination: frozen there (the tokenizer's
    # drop_admin_lines reads them); a label only this parser needs goes in an entry of its own
    **ADMIN_LABELS,
    "preamble": ("final report",),    # a banner, not a section: what follows is unlabelled text
    "other": ("wet read", "addendum", "notification", "notifications", "recommendation",
              "recommendations", "recommendation(s)", "attending", "electronically signed by", "signed by",
              "dictated by", "reference exam", "provisional findings impression (pfi)", "pfi",
              "critical result", "critical results", "communication", "dictated", "transcribed"),
}
_HEADER_OF = {name: key for key, names in _HEADERS.items() for name in names}
# Organ sub-headings inside FINDINGS ("LUNGS: clear."): content, not a new section.
_SUBHEADINGS = {"lungs", "lung", "heart", "pleura", "pleural", "pleural spaces", "mediastinum", "hila", "hilum",
                "bones", "osseous structures", "soft tissues", "lines", "tubes", "lines and tubes",
                "tubes and lines", "lines/tubes", "support devices", "devices", "cardiac", "cardiomediastinal",
                "heart and mediastinum", "lungs and pleura", "upper abdomen", "abdomen", "airways",
                "musculoskeletal", "other", "cardiovascular", "mediastinum and hila"}
# "PA AND LATERAL VIEWS OF THE CHEST:" names the examination; older MIMIC reports
# write the findings right after it instead of under FINDINGS.
_EXAM_TITLE_RE = re.compile(r"\bchest\b.*\b(?:views?|radiographs?|films?|x-?rays?|pa|ap|lat(?:eral)?|portable|"
                            r"supine|upright)\b|\b(?:views?|radiographs?|films?|pa|ap|portable|supine|upright)"
                            r"\b.*\bchest\b", re.I)
_HEADER_LINE_RE = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z0-9 /&(),'\-]{0,80}?)\s*:(?!\d)\s*(?P<rest>.*)$")
_KNOWN_ALT = "|".join(sorted((re.escape(n) for n in _HEADER_OF if n not in ("report", "reason", "prior", "view",
                                                                               "views", "study", "exam")),
                            key=len, reverse=True))
# A known header in the middle of a line ("... normal. IMPRESSION: ...") starts a new line.
_INLINE_HEADER_RE = re.compile(rf"(?:(?<=[.;!?])|(?<=\S\s\s))\s*(?=(?:{_KNOWN_ALT})\s*:(?!\d))", re.I)


_RULE_RE = re.compile(r"^[_\-=*~]{10,}$")   # separator lines ("_____...")


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower()).strip(" .")


def _classify_header(name: str, has_colon: bool):
    """Section key for a header line, or None when the line is content."""
    norm = _norm(name)
    if norm in _HEADER_OF:
        return _HEADER_OF[norm]
    if norm in _SUBHEADINGS or len(norm.split()) > 9:
        return None
    letters = [c for c in name if c.isalpha()]
    upper = bool(letters) and all(c.isupper() for c in letters)
    if _EXAM_TITLE_RE.search(name) and (upper or has_colon):
        return "title"
    if upper and has_colon:
        return "other"
    return None


def _split(text: str) -> Dict[str, List[str]]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INLINE_HEADER_RE.sub("\n", text)
    parts: Dict[str, List[str]] = {}
    current = "preamble"
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or _RULE_RE.match(stripped):
            continue
        m = _HEADER_LINE_RE.match(stripped)
        key = _classify_header(m.group("name"), True) if m else None
        if key is not None:
            current, rest = key, m.group("rest")
            if key == "title":
                parts.setdefault("examination", []).append(m.group("name"))
        else:
            key = _classify_header(stripped, False) if len(stripped) < 90 else None
            if key is not None:
                current, rest = key, ""
                if key == "title":
                    parts.setdefault("examination", []).append(stripped)
            else:
                rest = stripped
        if rest:
            parts.setdefault(current, []).append(rest)
    return parts


def split_all_sections(text: str) -> Dict[str, str]:
    """Every section found, cleaned, including "examination", "title" (text after an
    exam-title header), "preamble" (before any header) and "other"."""
    return {k: clean_text("\n".join(v)) for k, v in _split(text or "").items()}


def parse_sections(text: str) -> Dict[str, str]:
    """Findings, impression, indication, comparison, technique and history of a free-text
    report, each cleaned ("" when absent)."""
    found = split_all_sections(text)
    return {k: found.get(k, "") for k in SECTION_KEYS}


def report_fields(text: str) -> Dict[str, str]:
    """Sections with the fallbacks a dataset reader wants.

    Findings written after an exam-title header count as findings; a report with
    neither findings nor impression is all impression (the whole text, headers of
    "other" sections excluded), as in impression-only hospital exports.
    """
    found = split_all_sections(text)
    out = {k: found.get(k, "") for k in SECTION_KEYS}
    out["examination"] = found.get("examination", "")
    if not out["findings"] and found.get("title"):
        out["findings"] = found["title"]
    if not out["findings"] and not out["impression"]:
        out["impression"] = found.get("preamble", "")
    for k in ("findings", "impression"):
        out[k] = out[k][:1].upper() + out[k][1:]
    return out
