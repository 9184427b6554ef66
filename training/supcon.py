"""Supervised contrastive learning (LLM2Vec step 2, specialised to CXR reports).

Each training example is (anchor, positive, hard negatives):

- "variant": a clinically equivalent rewrite of a report and the report itself (either way
  round); hard negatives are single-error rewrites of the report (laterality swap, negation
  flip, severity change, inserted finding), so the encoder must keep a rewrite close and a
  one-word clinical change far;
- "sections": the impression and the findings of the same report (either way round); hard
  negatives are single-error rewrites of the positive section;
- "phrase" (`p_phrases`): one sentence of the report with its abbreviations (training part of the
  lexicon) and the same sentence written out, so that a short form and its expansion meet at the
  phrase level, where they are most of the text; hard negatives are single-error rewrites of the
  sentence.

The loss is InfoNCE: each anchor against the positives of ALL anchors (in-batch negatives,
gathered across processes) plus every hard negative, at temperature 0.05. Candidates that are
the same text as the target (Open-I has many identical normal reports) are masked out rather
than pushed away. `symmetric=True` adds the positive -> anchor direction, so both directions of
each pair (impression -> findings and findings -> impression) are learned.

`supcon.views` V > 2 draws several texts per report instead of a pair (`sample_views`: the report
and V-1 rewrites, or the two sections) and scores them with the multi-positive SupCon loss of
Khosla et al. 2020 (`multiview_supcon_loss`): every text is a query, the other texts of its report
are its positives; V = 2 is the pair above, unchanged.

Anchors may carry an instruction (read, not pooled; see `open_clip_cxr.text.instructions`);
positives and negatives are documents and stay plain.

The texts are embedded by `training/text_embed.py` and scored by `training/supcon_loss.py`
(both re-exported here).
"""
import hashlib
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from open_clip_cxr.reports.types import Report
from open_clip_cxr.reports.clean import split_sentences
from open_clip_cxr.reports.lexicon import abbreviate, expand
from open_clip_cxr.reports.rewrite_common import rng_for
from open_clip_cxr.reports.negatives import laterality_copies as side_swaps
from open_clip_cxr.reports.variants import base_text, equivalent_variants, hard_negatives, with_context_lines

INSTRUCTIONS = {
    "variant": "Given a chest X-ray report, retrieve reports with the same findings",
    "impression->findings": "Given the impression of a chest X-ray report, retrieve its findings",
    "findings->impression": "Given the findings of a chest X-ray report, retrieve its impression",
    "phrase": "Given a sentence of a chest X-ray report, retrieve sentences with the same findings",
}


# ---------------------------------------------------------------- examples

@dataclass
class Example:
    anchor: str
    positive: str
    negatives: List[str] = field(default_factory=list)
    task: str = "variant"


@dataclass
class ReportTexts:
    """Every text one report can contribute: the report, its rewrites, its one-error copies,
    and its two sections with one-error copies of each."""
    base: str
    variants: List[str]
    negatives: List[str]
    sections: Dict[str, List[str]]    # findings / impression text -> its one-error copies
    phrases: List[Tuple[str, str, List[str]]] = field(default_factory=list)  # (short, long, one-error copies)
    llm_variants: List[str] = field(default_factory=list)   # the checked LLM rewrites among `variants`

    def all_texts(self) -> List[str]:
        out = [self.base, *self.variants, *self.negatives]
        for text, negs in self.sections.items():
            out += [text, *negs]
        for short, long, negs in self.phrases:
            out += [short, long, *negs]
        return out


def phrase_pairs(text: str, seed: int = 0, part: Optional[str] = "train", max_pairs: int = 3,
                 n_negatives: int = 2) -> List[Tuple[str, str, List[str]]]:
    """(sentence with abbreviations, the sentence written out, its one-error copies) for up to
    `max_pairs` sentences of `text` that hold a lexicon term of `part` (in either form)."""
    out = []
    for s in split_sentences(text):
        rng = rng_for(seed, "phrase", s)
        long = expand(s, part=part)
        short = abbreviate(long, rng, p=1.0, part=part)
        if short == long:
            continue
        negs = [v.text for v in hard_negatives(Report(study_id="", source="", findings=long), seed, part=part)]
        out.append((short, long, negs[:n_negatives]))
        if len(out) >= max_pairs:
            break
    return out


def _negatives(report: Report, seed: int, part: Optional[str], negative_seeds: int) -> List[str]:
    """One-error copies of `report` drawn with `negative_seeds` seeds (each seed: at most one per
    error type, on another sentence / template), duplicates dropped."""
    out: List[str] = []
    for k in range(max(1, negative_seeds)):
        for v in hard_negatives(report, seed + 7_919 * k, part=part):
            if v.text not in out:
                out.append(v.text)
    return out


def _maybe_context_lines(text: str, seed: int, p: float) -> str:
    """`text` between lines that say no finding with probability `p` (an RNG of its own, seeded by
    `seed` and the text: the same rewrite is wrapped alike on every rank)."""
    rng = rng_for(seed, "context_lines_p", text)
    return with_context_lines(text, rng) if rng.random() < p else text


def report_texts(report: Report, seed: int = 0, max_variants: Optional[int] = None,
                 part: Optional[str] = "train", phrases: bool = False,
                 styles: Optional[Sequence[str]] = None, negative_seeds: int = 1,
                 borrowed=None, laterality_copies: int = 0,
                 context_lines_p: float = 0.0) -> Optional[ReportTexts]:
    """The texts of one report (None without text); `seed` picks the rewrites, `max_variants`
    keeps a random subset of the rewrite styles (fewer texts per report, more reports per budget),
    `phrases` adds sentence-level abbreviation pairs (`phrase_pairs`), `styles` keeps only those
    rewrite styles (None: every style of `VARIANT_STYLES`), `negative_seeds` draws the one-error
    copies that many times (more error sentences and templates per report; recipe key
    `supcon.negative_seeds`), `borrowed` (a `reports.borrowed.SentencePool`) adds its one-error
    copies made with sentences of other training reports (recipe keys `supcon.borrowed_insertions`,
    `supcon.borrowed_negations`, `supcon.borrowed_absent_swaps`) and its rewrites that word a
    negation as another training report does (`supcon.borrowed_rewordings`), `laterality_copies`
    adds up to that many more one-word side swaps (`supcon.laterality_copies`), `context_lines_p` puts that share of the rewrites between lines
    that say no finding (`with_context_lines`; `supcon.context_lines_p`: in place, so the mix of
    styles stays as it was). Rewrites come from the `part` of the style split ("train": never the
    held-out entries the held-out protocol measures with; None: both parts, for ablations only)."""
    base = base_text(report)
    if not base:
        return None
    variants = [v.text for v in equivalent_variants(report, seed, part=part)
                if v.text != base and (styles is None or v.style in styles)]
    if borrowed is not None:    # its positives (supcon.borrowed_rewordings) join the rewrites
        variants += [v.text for v in borrowed.positives(report, seed) if v.text != base and v.text not in variants]
    if max_variants is not None and len(variants) > max_variants:
        variants = random.Random(seed).sample(variants, max_variants)
    if context_lines_p:
        variants = [_maybe_context_lines(v, seed, context_lines_p) for v in variants]
    negatives = _negatives(report, seed, part, negative_seeds)
    if borrowed is not None:
        negatives += [v.text for v in borrowed.copies(report, seed) if v.text not in negatives]
    if laterality_copies:
        negatives += [v.text for v in side_swaps(report, laterality_copies + 1, seed) if v.text not in negatives][:laterality_copies]
    sections = {}
    findings, impression = report.findings.strip(), report.impression.strip()
    if findings and impression:
        for text in (findings, impression):   # errors of the section alone, read as a one-section report
            sections[text] = _negatives(Report(study_id=report.study_id, source=report.source, findings=text),
                                        seed, part, negative_seeds)
    return ReportTexts(base, variants, negatives, sections, phrase_pairs(base, seed, part) if phrases else [])


# Splits stage 1 never trains on: the official test split of each dataset (the `split` a source
# defines, else the hash split of the study id).
HELD_OUT_SPLITS = ("test",)


def training_split(recipe: dict) -> str:
    """The split stage 1 reads (`data.split`), refused when it is a test split, empty (every
    split, test included) or the split the run evaluates on (`eval.split`)."""
    split = (recipe.get("data") or {}).get("split", "train")
    if not split:
        raise ValueError("data.split is empty, which reads every split including the official test split: "
                         "set data.split: train")
    if split in HELD_OUT_SPLITS:
        raise ValueError(f"data.split: {split} is the official test split and is never training data: "
                         "set data.split: train")
    ecfg = recipe.get("eval") or {}
    if ecfg.get("enabled", True) and ecfg.get("split", "validate") == split:
        raise ValueError(f"data.split and eval.split are both {split}: never evaluate on training data")
    return split


def section_negatives(texts: ReportTexts, section: str) -> List[str]:
    """The hard negatives a one-section rewrite (the impression or the findings alone) can tell
    from its report: the whole report's one-error copies whose error lies in that section, then
    the section's own one-error copies. Why: a copy that changes only the other section reads,
    from this section alone, like the report (93 % of an impression-only pair's copies, first 800
    Open-I training reports). Off by default: with the report as the anchor such a copy is still
    report-against-copy discrimination, and dropping it cost held-out discrimination (issue 19,
    thirty-third round)."""
    first = section == next(iter(texts.sections))     # findings come first in the report text
    key = section.strip().rstrip(".")
    kept = [n for n in texts.negatives
            if not (n.startswith(key) if first else n.rstrip(". ").endswith(key))]
    return kept + [n for n in texts.sections[section] if n not in kept]


def sample_example(texts: ReportTexts, rng: random.Random, p_sections: float = 0.3,
                   n_negatives: int = 2, p_phrases: float = 0.0, p_llm: float = 0.0,
                   one_section_negatives: bool = False) -> Optional[Example]:
    """One (anchor, positive, hard negatives) from a report's texts (None if nothing pairs).
    `p_llm`: a rewrite pair uses one of the report's LLM rewrites (if it has any) with this
    probability, else any rewrite, LLM ones included (`supcon.llm_variant_p`).
    `one_section_negatives`: a rewrite that is one section of the report alone draws its hard
    negatives from `section_negatives` (`supcon.section_negatives`; off: the whole report's copies)."""
    if texts.phrases and p_phrases and rng.random() < p_phrases:
        short, long, negs = rng.choice(texts.phrases)
        anchor, positive = (short, long) if rng.random() < 0.5 else (long, short)
        negs = list(negs) if positive == long else []    # the error copies are of the long form
        task = "phrase"
    elif len(texts.sections) == 2 and rng.random() < p_sections:
        findings, impression = texts.sections
        anchor, positive = (impression, findings) if rng.random() < 0.5 else (findings, impression)
        task = "impression->findings" if anchor == impression else "findings->impression"
        negs = texts.sections[positive]
    else:
        if not texts.variants:
            return None
        # p_llm 0 draws nothing extra, so the recipes without it sample exactly as before
        pick_llm = bool(texts.llm_variants) and p_llm > 0 and rng.random() < p_llm
        rewrite = rng.choice(texts.llm_variants if pick_llm else texts.variants)
        anchor, positive = rewrite, texts.base
        if rng.random() < 0.5:   # the report as anchor: "its rewrite, not its one-error copies"
            anchor, positive = positive, anchor
        task = "variant"
        negs = texts.negatives
        if one_section_negatives and rewrite in texts.sections:
            negs = section_negatives(texts, rewrite)
    negs = [n for n in negs if n not in (anchor, positive)]
    rng.shuffle(negs)
    return Example(anchor, positive, negs[:n_negatives], task)


@dataclass
class Views:
    """Several texts of one study (`supcon.views` > 2: each is a query, the others its positives)."""
    texts: List[str]
    negatives: List[str] = field(default_factory=list)
    task: str = "variant"


def sample_views(texts: ReportTexts, rng: random.Random, views: int = 3, p_sections: float = 0.3,
                 n_negatives: int = 2, p_phrases: float = 0.0) -> Optional[Views]:
    """Up to `views` texts of one report (None when fewer than two) and its hard negatives: the
    report and `views - 1` of its rewrites (fewer when it has fewer), or (`p_sections`) its findings
    and impression, or (`p_phrases`) a sentence short and long. Rewrites that equal the report or
    each other after `text_key` normalisation are one view, not two (a trivial positive)."""
    if texts.phrases and p_phrases and rng.random() < p_phrases:
        short, long, negs = rng.choice(texts.phrases)
        out, negs, task = [short, long], list(negs), "phrase"
    elif len(texts.sections) == 2 and rng.random() < p_sections:
        out, task = list(texts.sections), "sections"
        negs = [n for s in out for n in texts.sections[s]]    # errors of either section
    else:
        seen, distinct = {text_key(texts.base)}, []
        for t in texts.variants:
            if text_key(t) not in seen:
                seen.add(text_key(t))
                distinct.append(t)
        if not distinct:
            return None
        out = [texts.base, *rng.sample(distinct, min(views - 1, len(distinct)))]
        negs, task = list(texts.negatives), "variant"
    negs = [n for n in dict.fromkeys(negs) if n not in out]
    rng.shuffle(negs)
    return Views(out, negs[:n_negatives], task)


def make_example(report: Report, rng: random.Random, seed: int = 0, p_sections: float = 0.3,
                 n_negatives: int = 2) -> Optional[Example]:
    """One example from a report (None if nothing applies). `seed` picks the variants."""
    texts = report_texts(report, seed)
    return sample_example(texts, rng, p_sections, n_negatives) if texts else None


def text_key(text: str) -> int:
    """A 63-bit id of a text after whitespace/case normalisation (identical reports share it)."""
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.sha256(norm.encode()).digest()[:8], "big") >> 1


# the embedding and the loss live in their own modules; their names stay importable from here
from open_clip_cxr_train.text_embed import (CachedEmbedder, Embedder, TextStateCache, _run_layers, layer_range,  # noqa: E402,F401
                                 length_chunks)
from open_clip_cxr_train.supcon_loss import (_info_nce, gather_keys, gather_with_grad,  # noqa: E402,F401
                                             multiview_supcon_loss, supcon_loss)
