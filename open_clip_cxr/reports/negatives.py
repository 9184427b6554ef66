"""Hard negatives: rewrites of a report with exactly one clinical error.

Error types: "laterality" (left<->right in one mention), "negation" (a present finding
said absent, or one absent finding said present), "severity" (one grade or size word
changed) and "insertion" (one new device or finding sentence). Candidates are tried in
a seeded order and the first that the mention checker reads as exactly that one error
is kept (`verify=False` keeps the first candidate unchecked).
"""
import random
import re
from typing import List, Optional, Tuple

from .clean import join_sections, split_sentences
from .lexicon import expand
from .mentions import MODIFIER_CUT_RE, SIDES_RE, classify_edit, extract_mentions
from .rewrite_common import NOT_NP_RE, cap, decap, plural, report_sections, rng_for, sentences
from .style_split import in_part
from .types import Report, Variant

ERROR_TYPES = ("laterality", "negation", "severity", "insertion")

_SIDE_WORD_RE = re.compile(r"\b(left|right)\b(?!(?:\s|-)+middle lobe)|(?-i:\b([RL])(UL|LL)\b)", re.I)
_SWAP = {"left": "right", "right": "left"}


def _match_case(src: str, repl: str) -> str:
    if src.isupper():
        return repl.upper()
    if src[:1].isupper():
        return cap(repl)
    return repl


def _laterality_candidates(sentence: str, rng: random.Random, part: Optional[str] = None) -> List[Tuple[str, str]]:
    # one operation (a side swap) with nothing to split: used by both parts
    out = []
    for m in _SIDE_WORD_RE.finditer(sentence):
        if m.group(1):
            repl = _match_case(m.group(1), _SWAP[m.group(1).lower()])
        else:
            repl = ("L" if m.group(2) == "R" else "R") + m.group(3)
        out.append((sentence[:m.start()] + repl + sentence[m.end():], "laterality_swap"))
    return out


_SEV_WORD_RE = re.compile(
    r"\b(?:mild|small|moderate|trace)(?:\s*-\s*|\s+to\s+)(?:moderate|large|severe)\b"
    r"|\b(?:trace|tiny|small|minimal|mild(?:ly)?|moderate(?:ly)?|large|severe(?:ly)?|massive|marked(?:ly)?)\b",
    re.I)
_SIZED = re.compile(r"effusion|pneumothora|nodule|mass|hernia|granuloma|PTX", re.I)


def _severity_options(word: str, sized: bool, part: Optional[str] = None) -> List[str]:
    w = re.sub(r"\s*-\s*|\s+to\s+", "-", word.lower())
    if "-" in w:     # a range ("mild to moderate"): jump to the other end of the scale
        if not in_part("severity", "range", part):
            return []
        high = w.endswith(("large", "severe")) and w.startswith("moderate")
        return [("small" if sized else "mild") if high else ("large" if sized else "severe")]
    if not in_part("severity", w, part):
        return []
    table = {
        "mild": ["moderate", "severe"], "moderate": ["small", "large"] if sized else ["mild", "severe"],
        "severe": ["mild"], "small": ["large"], "large": ["small"], "tiny": ["large"], "trace": ["large"],
        "minimal": ["moderate"], "massive": ["small"], "marked": ["mild"],
        "mildly": ["moderately", "severely"], "moderately": ["mildly", "severely"],
        "severely": ["mildly"], "markedly": ["mildly"],
    }
    return table.get(w, [])


def _severity_candidates(sentence: str, rng: random.Random, part: Optional[str] = None) -> List[Tuple[str, str]]:
    out = []
    sized = bool(_SIZED.search(sentence))
    for m in _SEV_WORD_RE.finditer(sentence):
        opts = _severity_options(m.group(0), sized, part)
        if opts:
            repl = _match_case(m.group(0), rng.choice(opts))
            out.append((sentence[:m.start()] + repl + sentence[m.end():], "severity_change"))
    return out


_ITEM_START_RE = re.compile(r"(?:,\s*(?:(?:and|or|nor)\s+)?|\s(?:and|or|nor)\s|\b(?:no|without|of|for)\s)")
_JOINER_RE = re.compile(r"\s*(?:,\s*(?:(?:and|or|nor)\s+)?|\s(?:and|or|nor)\s)")
# Words in front of a finding that say when or how much, not what: dropped when negating.
_STATUS_RE = re.compile(r"^(?:(?:there (?:is|are)|again seen is|a|an|the|new|stable|persistent|unchanged|interval|"
                        r"increased|decreased|increasing|decreasing|worsening|improving|improved|redemonstrated|"
                        r"trace|tiny|small|minimal|mild|mildly|moderate|moderately|large|severe|severely|"
                        r"massive|marked|markedly|extensive|\d+(?:\.\d+)?\s*(?:x\s*\d+(?:\.\d+)?\s*)?(?:cm|mm))\s+)+",
                        re.I)
# History, not a finding that can be absent ("No status post sternotomy" is not a report).
_NOT_NEGATABLE = {"sternotomy"}


# How a negated / an affirmed finding is written; split by template between the style parts.
_NEGATE_TEMPLATES = {"no": "No {x}.", "not_seen": "{X} {be} not seen.", "negative_for": "Negative for {x}.",
                     "absent": "{X} {be} absent.", "no_evidence": "No evidence of {x}.",
                     "not_identified": "{X} {be} not identified."}
_AFFIRM_TEMPLATES = {"present": "{X} {be} present.", "there_is": "There {be} {x}.", "noted": "{X} {be} noted."}


def _fill(template: str, x: str) -> str:
    be = "are" if plural(x) else "is"
    return template.format(x=x, X=cap(x), be=be)


def _negate_positive(ex: str, m, template: str = "No {x}.") -> Optional[str]:
    """'Mild left basilar atelectasis.' -> 'No left basilar atelectasis.' (a one-finding sentence)."""
    if m.finding == "cardiomegaly":
        return _fill(template, "cardiomegaly")
    if m.finding in _NOT_NEGATABLE:
        return None
    s, e = m.span
    cut = None
    for c in MODIFIER_CUT_RE.finditer(ex.lower()[:s]):
        cut = c
    phrase = decap(_STATUS_RE.sub("", ex[cut.end() if cut else 0:e].strip()))
    if not phrase or NOT_NP_RE.search(phrase) or "status post" in phrase.lower():
        return None
    if m.side and not SIDES_RE.search(phrase.lower()):
        phrase = f"{m.side} {phrase}"
    return _fill(template, phrase)


def _affirm_one(ex: str, ms, m, template: str = "{X} {be} present.") -> Optional[str]:
    """Take `m` out of a negated list and state it as present.

    'No consolidation, effusion, or pneumothorax.' -> 'No consolidation or effusion. Pneumothorax is present.'
    """
    low = ex.lower()
    s, e = m.span
    cut = None
    for c in _ITEM_START_RE.finditer(low[:s]):
        cut = c
    if cut is None:
        if len(ms) != 1:
            return None
        rest, item = "", ex[:e].strip()          # 'Small apical pneumothorax is not seen.'
    else:
        item = ex[cut.end():e].strip()
        joiner = cut.group(0)
        if joiner.lstrip().startswith(",") or re.match(r"\s(?:and|or|nor)\s", joiner):
            rest = ex[:cut.start()] + ex[e:]     # a later item and the joiner in front of it
            conj = re.search(r"\b(and|or|nor)\b", joiner)
            if conj:                             # 'A, B, or C' lost 'or C': put the 'or' back
                head_start = ms[0].span[0]
                head = rest[head_start:cut.start()]
                k = head.rfind(", ")
                if k >= 0:
                    sep = ", " if head.count(",") > 1 else " "
                    rest = rest[:head_start + k] + sep + conj.group(1) + " " + rest[head_start + k + 2:]
        else:                                    # the first item after the cue
            nxt = _JOINER_RE.match(ex[e:])
            if nxt is None:
                if len(ms) != 1:
                    return None
                rest = ""
            else:
                after = ex[e + nxt.end():]
                if re.match(r"(?:no|without)\b", after, re.I):   # 'no effusion, no pneumothorax'
                    rest = ex[:cut.start()].rstrip() + " " + after
                else:
                    rest = ex[:cut.end()] + after
        if rest.count(",") == 1:
            rest = re.sub(r",\s+(or|and|nor)\s", r" \1 ", rest)
    if not item or NOT_NP_RE.search(item):
        return None
    side = f"{m.side} " if m.side and not SIDES_RE.search(item.lower()) else ""
    return (rest.strip() + " " + _fill(template, side + item)).strip()


def _negation_candidates(sentence: str, rng: random.Random, part: Optional[str] = None) -> List[Tuple[str, str]]:
    ex = expand(sentence)
    if len(ex.lower()) != len(ex) or len(split_sentences(ex)) != 1:
        return []
    ms = extract_mentions(ex)
    if not ms:
        return []
    out = []
    negate = [t for k, t in _NEGATE_TEMPLATES.items() if in_part("negate_template", k, part)]
    affirm = [t for k, t in _AFFIRM_TEMPLATES.items() if in_part("affirm_template", k, part)]
    if len(ms) == 1 and not ms[0].negated:
        for t in negate:
            new = _negate_positive(ex, ms[0], t)
            if new:
                out.append((new, "negate"))
    if all(m.negated for m in ms):
        for m in ms:
            for t in affirm:
                new = _affirm_one(ex, ms, m, t)
                if new:
                    out.append((new, "affirm"))
    return out


_INSERTIONS: Tuple[Tuple[str, str, str], ...] = (
    ("central_line", "Right internal jugular catheter tip in the SVC.", "insert_device"),
    ("central_line", "Left subclavian central venous catheter terminates in the SVC.", "insert_device"),
    ("endotracheal_tube", "Endotracheal tube tip is 4 cm above the carina.", "insert_device"),
    ("enteric_tube", "Nasogastric tube courses below the diaphragm into the stomach.", "insert_device"),
    ("chest_tube", "Right-sided chest tube in place.", "insert_device"),
    ("pacemaker", "Left chest wall pacemaker in place.", "insert_device"),
    ("pleural_effusion", "Small left pleural effusion.", "insert_finding"),
    ("pleural_effusion", "Moderate right pleural effusion.", "insert_finding"),
    ("pneumothorax", "Small right apical pneumothorax.", "insert_finding"),
    ("consolidation", "Right lower lobe consolidation.", "insert_finding"),
    ("edema", "Mild pulmonary edema.", "insert_finding"),
    ("cardiomegaly", "Moderate cardiomegaly.", "insert_finding"),
    ("nodule", "1.5 cm nodule in the right upper lobe.", "insert_finding"),
    ("atelectasis", "Left basilar atelectasis.", "insert_finding"),
    ("fracture", "Acute fracture of the left posterior sixth rib.", "insert_finding"),
    ("hernia", "Moderate hiatal hernia.", "insert_finding"),
)


def _apply(split: List[List[str]], i: int, j: int, new: str) -> str:
    parts = [list(s) for s in split]
    parts[i][j] = new
    return join_sections(*(" ".join(s) for s in parts))


def _insert(split: List[List[str]], i: int, j: int, sentence: str) -> str:
    """The report of `split` with `sentence` put before sentence j of section i (j = len: at its end)."""
    parts = [list(s) for s in split]
    parts[i].insert(j, sentence)
    return join_sections(*(" ".join(s) for s in parts))


def _sentence_edits(split, base, error_type, make, rng, verify, part=None):
    """One-error copies made by editing one sentence, yielded lazily in a seeded order."""
    sites = [(i, j) for i, sents in enumerate(split) for j in range(len(sents))]
    rng.shuffle(sites)
    for i, j in sites:
        cands = make(split[i][j], rng, part)
        rng.shuffle(cands)
        for new_sentence, style in cands:
            if new_sentence == split[i][j]:
                continue
            text = _apply(split, i, j, new_sentence)
            if not verify or classify_edit(base, text) == error_type:
                yield Variant(text=text, style=style, equivalent=False, error_type=error_type)


def _sentence_edit_negative(split, base, error_type, make, rng, verify, part=None) -> Optional[Variant]:
    return next(_sentence_edits(split, base, error_type, make, rng, verify, part), None)


def _insertion(split, base, rng, verify, part=None) -> Optional[Variant]:
    present = {m.finding for m in extract_mentions(base)}
    pool = [p for p in _INSERTIONS if p[0] not in present and in_part("insertion", p[1], part)]
    rng.shuffle(pool)
    sec = 0 if len(split) > 1 else len(split) - 1     # findings when there is one
    for _, sentence, style in pool:
        text = _insert(split, sec, rng.randint(0, len(split[sec])), sentence)
        if not verify or classify_edit(base, text) == "insertion":
            return Variant(text=text, style=style, equivalent=False, error_type="insertion")
    return None


def hard_negatives(report: Report, seed: int = 0, verify: bool = True, part: Optional[str] = None) -> List[Variant]:
    """At most one variant per ERROR_TYPES entry, each with exactly one clinical error, from the
    error templates of the style split's `part` ("train", "heldout"; None: all)."""
    sections = report_sections(report)
    base = join_sections(*sections)
    if not base:
        return []
    split = [sentences(s) for s in sections]
    makers = {"laterality": _laterality_candidates, "negation": _negation_candidates,
              "severity": _severity_candidates}
    out = []
    for error_type in ERROR_TYPES:
        rng = rng_for(seed, error_type, base)
        if error_type == "insertion":
            v = _insertion(split, base, rng, verify, part)
        else:
            v = _sentence_edit_negative(split, base, error_type, makers[error_type], rng, verify, part)
        if v is not None:
            out.append(v)
    return out


def laterality_copies(report: Report, k: int, seed: int = 0, verify: bool = True) -> List[Variant]:
    """Up to `k` laterality copies of `report`, each with another side word swapped.

    `hard_negatives` makes one copy per error type; a report with several side words (a left
    effusion, a right catheter) gets more here, so a step meets one-word side swaps as often as the
    other errors (recipe key `supcon.laterality_copies`). The swap has no template to hold out.
    """
    sections = report_sections(report)
    base = join_sections(*sections)
    if not base or k <= 0:
        return []
    split = [sentences(s) for s in sections]
    out: List[Variant] = []
    for v in _sentence_edits(split, base, "laterality", _laterality_candidates,
                             rng_for(seed, "laterality_copies", base), verify):
        if all(v.text != o.text for o in out):
            out.append(v)
            if len(out) == k:
                break
    return out
