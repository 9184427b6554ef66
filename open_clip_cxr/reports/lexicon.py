"""Chest X-ray abbreviation lexicon, with `abbreviate` and `expand` rewrites.

Each entry pairs the abbreviation(s) a radiologist writes with the long form. The
first abbreviation is the one `expand` recognises first; `abbreviate` picks any.
Ambiguous short forms carry a `context` lookahead so that, e.g., "PA" is only read
as "posteroanterior" in "PA and lateral" and not in "PA catheter" (pulmonary artery).
"""
import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .style_split import in_part

_VIEW_CONTEXT = (r"(?=(?i:\s*(?:and|/|&)?\s*(?:lat(?:eral)?|views?|projections?|radiographs?|chest"
                 r"|upright|supine|semi-upright|portable|films?|images?|ap|pa)\b))")


@dataclass(frozen=True)
class Abbrev:
    short: Tuple[str, ...]      # abbreviated forms, as written
    long: str                   # expansion, lower case
    note: str                   # what it is / why it is here
    case_sensitive: bool = True  # all-caps acronyms only match in capitals ("ETT", not "ett")
    context: str = ""           # lookaround the short form must satisfy (for ambiguous acronyms)
    long_context: Optional[str] = None  # same for the long form; None: same as `context`


LEXICON: Tuple[Abbrev, ...] = (
    # -- findings and diseases
    Abbrev(("PTX",), "pneumothorax", "air in the pleural space"),
    Abbrev(("CHF",), "congestive heart failure", "clinical diagnosis, often in the indication"),
    Abbrev(("COPD",), "chronic obstructive pulmonary disease", "emphysema / chronic bronchitis"),
    Abbrev(("ILD",), "interstitial lung disease", "fibrosing lung disease"),
    Abbrev(("ARDS",), "acute respiratory distress syndrome", "diffuse alveolar damage"),
    Abbrev(("PNA",), "pneumonia", "common in indications"),
    # -- anatomy: lobes (laterality lives inside the acronym)
    Abbrev(("RUL",), "right upper lobe", "lobe"),
    Abbrev(("RML",), "right middle lobe", "lobe (no left counterpart: the lingula)"),
    Abbrev(("RLL",), "right lower lobe", "lobe"),
    Abbrev(("LUL",), "left upper lobe", "lobe"),
    Abbrev(("LLL",), "left lower lobe", "lobe"),
    # -- anatomy: vessels and junctions
    Abbrev(("SVC",), "superior vena cava", "usual target of a central venous catheter tip"),
    Abbrev(("IVC",), "inferior vena cava", "vessel"),
    Abbrev(("IJ",), "internal jugular", "vein used for central lines ('right IJ catheter')"),
    Abbrev(("GEJ", "GE junction"), "gastroesophageal junction", "landmark for enteric tubes"),
    Abbrev(("CP angles",), "costophrenic angles", "blunting suggests effusion", case_sensitive=False),
    Abbrev(("CP angle",), "costophrenic angle", "singular", case_sensitive=False),
    # -- tubes, lines and devices
    Abbrev(("ETT", "ET tube"), "endotracheal tube", "breathing tube; tip is measured from the carina"),
    Abbrev(("NGT", "NG tube"), "nasogastric tube", "enteric tube through the nose"),
    Abbrev(("OGT", "OG tube"), "orogastric tube", "enteric tube through the mouth"),
    Abbrev(("PICC",), "peripherally inserted central catheter", "arm-inserted central line"),
    Abbrev(("CVC",), "central venous catheter", "central line"),
    Abbrev(("AICD",), "automatic implantable cardioverter-defibrillator", "device; listed before ICD"),
    Abbrev(("ICD",), "implantable cardioverter-defibrillator", "device with a shock coil"),
    Abbrev(("IABP",), "intra-aortic balloon pump", "device in the descending aorta"),
    Abbrev(("PA catheter",), "pulmonary artery catheter", "Swan-Ganz; NOT posteroanterior"),
    # -- procedures and history
    Abbrev(("CABG",), "coronary artery bypass graft", "explains sternotomy wires and clips"),
    Abbrev(("AVR",), "aortic valve replacement", "prosthetic valve"),
    Abbrev(("s/p",), "status post", "after a procedure", case_sensitive=False),
    Abbrev(("b/l", "bilat"), "bilateral", "both sides", case_sensitive=False),
    Abbrev(("w/o",), "without", "negation cue: must expand to a word the negation rules know",
           case_sensitive=False),
    Abbrev(("c/w",), "consistent with", "interpretive phrase", case_sensitive=False),
    Abbrev(("r/o",), "rule out", "indication phrase", case_sensitive=False),
    Abbrev(("f/u",), "follow-up", "recommendation phrase", case_sensitive=False),
    Abbrev(("hx",), "history", "indication phrase", case_sensitive=False),
    # -- the examination itself
    Abbrev(("CXR",), "chest radiograph", "the study; 'chest x-ray' is also common"),
    Abbrev(("PA",), "posteroanterior", "projection; only next to view words", context=_VIEW_CONTEXT),
    Abbrev(("AP",), "anteroposterior", "projection; 'AP window' is aortopulmonary, so context-bound",
           context=_VIEW_CONTEXT),
    Abbrev(("lat",), "lateral", "projection, only in 'PA and lat' ('lat' is not a side)",
           case_sensitive=False, context=r"(?<=and lat)", long_context=r"(?<=and lateral)"),
    # -- shorthand words (hospital style: "sm lt eff", "nl heart size")
    Abbrev(("eff",), "effusion", "pleural effusion shorthand", case_sensitive=False),
    Abbrev(("atx", "atel"), "atelectasis", "shorthand", case_sensitive=False),
    Abbrev(("consol",), "consolidation", "shorthand", case_sensitive=False),
    Abbrev(("nl",), "normal", "shorthand", case_sensitive=False),
    Abbrev(("WNL",), "within normal limits", "shorthand"),
    Abbrev(("NAD",), "no acute disease", "impression shorthand"),
    Abbrev(("rt",), "right", "side shorthand ('rt lower lobe')", case_sensitive=False),
    Abbrev(("lt",), "left", "side shorthand", case_sensitive=False),
    Abbrev(("pulm",), "pulmonary", "shorthand", case_sensitive=False),
    Abbrev(("vasc",), "vascular", "shorthand", case_sensitive=False),
    Abbrev(("sm",), "small", "size shorthand", case_sensitive=False),
    Abbrev(("lg",), "large", "size shorthand", case_sensitive=False),
    Abbrev(("mod",), "moderate", "grade shorthand", case_sensitive=False),
    Abbrev(("dz",), "disease", "shorthand", case_sensitive=False),
    Abbrev(("fx",), "fracture", "shorthand", case_sensitive=False),
    Abbrev(("LAD",), "lymphadenopathy", "'hilar LAD' (not the coronary artery here)"),
    Abbrev(("degen",), "degenerative", "'degen changes of the spine'", case_sensitive=False),
    Abbrev(("calc",), "calcified", "'calc granuloma'", case_sensitive=False),
    Abbrev(("T-spine",), "thoracic spine", "spine segment", case_sensitive=False),
    Abbrev(("incr",), "increased", "shorthand", case_sensitive=False),
    Abbrev(("decr",), "decreased", "shorthand", case_sensitive=False),
    Abbrev(("w/",), "with", "shorthand", case_sensitive=False),
    Abbrev(("approx",), "approximately", "shorthand", case_sensitive=False),
    Abbrev(("pt",), "patient", "shorthand", case_sensitive=False),
    Abbrev(("HTN",), "hypertension", "indication"),
    Abbrev(("CAD",), "coronary artery disease", "indication"),
    Abbrev(("SOB",), "shortness of breath", "indication"),
    Abbrev(("ant",), "anterior", "shorthand", case_sensitive=False),
    Abbrev(("hemidiaph",), "hemidiaphragm", "shorthand", case_sensitive=False),
    Abbrev(("mediast",), "mediastinal", "shorthand", case_sensitive=False),
    Abbrev(("CTA",), "clear to auscultation", "clinical; rare in reports"),
    Abbrev(("XR",), "x-ray", "the study", case_sensitive=False),
)

# Word boundaries that also treat "/" and "-" as part of a word, so that "s/p"
# never matches inside "s/p/x" and "IJ" never inside "IJ-2".
_L = r"(?<![\w/-])"
_R = r"(?![\w/-])"


def _pattern(form: str) -> str:
    return r"\s+".join(re.escape(w) for w in form.split())


def _compile(forms, case_sensitive: bool, context: str) -> "re.Pattern":
    alts = "|".join(_pattern(f) for f in sorted(forms, key=len, reverse=True))
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(_L + "(?:" + alts + ")" + _R + context, flags)


_SHORT_RE = [(e, _compile(e.short, e.case_sensitive, e.context), tuple(f.split()[0].lower() for f in e.short))
             for e in LEXICON]
# Long forms are matched case-insensitively ("Pneumothorax", "PNEUMOTHORAX").
_LONG_RE = [(e, _compile((e.long,), False, e.context if e.long_context is None else e.long_context),
             (e.long.split()[0],)) for e in LEXICON]


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip()
    return not before or before[-1] in ".!?:"


def _replace_spans(text: str, spans) -> str:
    out, last = [], 0
    for start, end, repl in sorted(spans):
        out.append(text[last:start])
        out.append(repl)
        last = end
    out.append(text[last:])
    return "".join(out)


def entry_part_key(entry: Abbrev) -> str:
    """The key the style split hashes for a lexicon entry (its long form)."""
    return entry.long


def _find(text: str, table, part: Optional[str] = None) -> list:
    """Non-overlapping matches over all entries (of `part`), longer spans first."""
    hits = []
    low = text.lower()
    for entry, rx, first_words in table:
        if part is not None and not in_part("lexicon", entry_part_key(entry), part):
            continue
        if not any(w in low for w in first_words):
            continue     # cheap substring test first: most entries are absent from a given text
        for m in rx.finditer(text):
            hits.append((m.start(), m.end(), entry, m.group(0)))
    hits.sort(key=lambda h: (-(h[1] - h[0]), h[0]))
    taken, chosen = [], []
    for h in hits:
        if all(h[1] <= s or h[0] >= e for s, e in taken):
            taken.append((h[0], h[1]))
            chosen.append(h)
    return sorted(chosen, key=lambda h: h[0])


def expand(text: str, part: Optional[str] = None) -> str:
    """Replace every known abbreviation (of the style split's `part`; None: all) with its long form."""
    spans = []
    for start, end, entry, src in _find(text, _SHORT_RE, part):
        at_start = _sentence_start(text, start)
        repl = entry.long
        if at_start or (src[:1].isupper() and not src.isupper()):
            repl = repl[:1].upper() + repl[1:]
        spans.append((start, end, repl))
    return _replace_spans(text, spans)


def abbreviate(text: str, rng: Optional[random.Random] = None, p: float = 0.7,
               part: Optional[str] = None) -> str:
    """Abbreviate each long form with probability `p` (at least one when any is present),
    using only the lexicon entries of the style split's `part` (None: all)."""
    rng = rng or random.Random(0)
    hits = _find(text, _LONG_RE, part)
    if not hits:
        return text
    keep = [rng.random() < p for _ in hits]
    if not any(keep):
        keep[rng.randrange(len(hits))] = True
    spans = []
    for (start, end, entry, src), k in zip(hits, keep):
        if not k:
            continue
        short = rng.choice(entry.short)
        if not entry.case_sensitive and src[:1].isupper():
            short = short[:1].upper() + short[1:]   # "Status post" -> "S/p"
        spans.append((start, end, short))
    return _replace_spans(text, spans)


def known_abbreviations(part: Optional[str] = None) -> Sequence[str]:
    """All abbreviated forms in the lexicon, or in one part of the style split."""
    return [s for e in entries(part) for s in e.short]


def entries(part: Optional[str] = None) -> Tuple[Abbrev, ...]:
    """The lexicon entries of one part of the style split (None: all)."""
    return tuple(e for e in LEXICON if part is None or in_part("lexicon", entry_part_key(e), part))
