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

Anchors may carry an instruction (read, not pooled; see `open_clip_cxr.text.instructions`);
positives and negatives are documents and stay plain.
"""
import contextlib
import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from open_clip_cxr.reports.types import Report
from open_clip_cxr.reports.clean import split_sentences
from open_clip_cxr.reports.lexicon import abbreviate, expand
from open_clip_cxr.reports.rewrite_common import rng_for
from open_clip_cxr.reports.variants import base_text, equivalent_variants, hard_negatives

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


def report_texts(report: Report, seed: int = 0, max_variants: Optional[int] = None,
                 part: Optional[str] = "train", phrases: bool = False,
                 styles: Optional[Sequence[str]] = None, negative_seeds: int = 1) -> Optional[ReportTexts]:
    """The texts of one report (None without text); `seed` picks the rewrites, `max_variants`
    keeps a random subset of the rewrite styles (fewer texts per report, more reports per budget),
    `phrases` adds sentence-level abbreviation pairs (`phrase_pairs`), `styles` keeps only those
    rewrite styles (None: every style of `VARIANT_STYLES`), `negative_seeds` draws the one-error
    copies that many times (more error sentences and templates per report; recipe key
    `supcon.negative_seeds`). Rewrites come from the `part` of the style split ("train": never the
    held-out entries the held-out protocol measures with; None: both parts, for ablations only)."""
    base = base_text(report)
    if not base:
        return None
    variants = [v.text for v in equivalent_variants(report, seed, part=part)
                if v.text != base and (styles is None or v.style in styles)]
    if max_variants is not None and len(variants) > max_variants:
        variants = random.Random(seed).sample(variants, max_variants)
    negatives = _negatives(report, seed, part, negative_seeds)
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


def sample_example(texts: ReportTexts, rng: random.Random, p_sections: float = 0.3,
                   n_negatives: int = 2, p_phrases: float = 0.0) -> Optional[Example]:
    """One (anchor, positive, hard negatives) from a report's texts (None if nothing pairs)."""
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
        anchor, positive = rng.choice(texts.variants), texts.base
        if rng.random() < 0.5:   # the report as anchor: "its rewrite, not its one-error copies"
            anchor, positive = positive, anchor
        task = "variant"
        negs = texts.negatives
    negs = [n for n in negs if n not in (anchor, positive)]
    rng.shuffle(negs)
    return Example(anchor, positive, negs[:n_negatives], task)


def make_example(report: Report, rng: random.Random, seed: int = 0, p_sections: float = 0.3,
                 n_negatives: int = 2) -> Optional[Example]:
    """One example from a report (None if nothing applies). `seed` picks the variants."""
    texts = report_texts(report, seed)
    return sample_example(texts, rng, p_sections, n_negatives) if texts else None


def text_key(text: str) -> int:
    """A 63-bit id of a text after whitespace/case normalisation (identical reports share it)."""
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.sha256(norm.encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------- encoding

def length_chunks(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Indices grouped by similar length, each group at most `max_tokens` padded tokens.
    Padding is paid for in full (B x longest), so sorting first saves ~40 % on reports."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * max(lengths[i], 1) > max_tokens:
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


class Embedder(nn.Module):
    """The tower as one module whose single forward embeds a whole step's texts.

    One forward per step matters under DDP (it expects one forward per backward); inside,
    the texts run in length-sorted chunks."""

    def __init__(self, tower: nn.Module, pad_id: int, max_tokens: int = 4096):
        super().__init__()
        self.tower, self.pad_id, self.max_tokens = tower, pad_id, max_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_id
        lengths = mask.sum(1).tolist()
        out = [None] * len(lengths)
        for idx in length_chunks(lengths, self.max_tokens):
            rows = torch.tensor(idx, device=input_ids.device)
            pooled = self.tower(input_ids=input_ids[rows], attention_mask=mask[rows]).pooler_output
            for j, i in enumerate(idx):
                out[i] = pooled[j]
        return torch.stack(out)


# ---------------------------------------------------------------- cached lower layers

@contextlib.contextmanager
def layer_range(llm: nn.Module, start: int, stop: int, final_norm: bool = True):
    """Inside the block, `llm` (a transformers decoder) runs only its layers [start, stop);
    without `final_norm` it returns the raw residual stream that layer `stop` would read."""
    layers, norm = llm.layers, llm.norm
    llm.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        llm.norm = nn.Identity()
    try:
        yield llm
    finally:
        llm.layers, llm.norm = layers, norm


def _run_layers(llm, embeds, mask, start, stop, final_norm):
    """The tower's decoder call (RoPE positions count real tokens; bidirectional padding mask)."""
    from open_clip_cxr.text.bidirectional import padding_mask_4d
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)
    with layer_range(llm, start, stop, final_norm):
        return llm(inputs_embeds=embeds, attention_mask=padding_mask_4d(llm.config, embeds, mask),
                   position_ids=positions, use_cache=False).last_hidden_state


class TextStateCache:
    """Per text, the residual stream entering the top `k` decoder layers (k=0: the final token
    states), computed once. With LoRA only in those k layers everything below gives the same
    output at every step, so a step runs k layers and the pooler instead of the whole decoder,
    and the random pooler can take hundreds of cheap steps over many epochs of the cache."""

    def __init__(self, tower, tokenizer, texts: Sequence[str], k: int, max_length: int = 128,
                 max_tokens: int = 4096, dtype: torch.dtype = torch.bfloat16, log_every: float = 10.0):
        self.texts = list(dict.fromkeys(texts))
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.k, self.states, self.ids = k, [None] * len(self.texts), [None] * len(self.texts)
        llm, pad = tower.base_llm(), tower.config.pad_token_id
        n_layers = len(llm.layers)
        ids = tokenizer(self.texts, context_length=max_length)
        mask = ids != pad
        lengths = mask.sum(1).tolist()
        t0 = time.time()
        device = next(tower.parameters()).device
        bar = tqdm(total=len(self.texts), desc="caching text states", unit="text", mininterval=log_every)
        store = dtype or torch.bfloat16   # dtype None: computed in fp32, still stored in bf16 (half the memory)
        with bar, torch.no_grad(), torch.autocast(device.type, dtype=store, enabled=dtype is not None):
            for idx in length_chunks(lengths, max_tokens):
                rows = torch.tensor(idx)
                n = max(lengths[i] for i in idx)
                sub_ids, sub_mask = ids[rows, :n].to(device), mask[rows, :n].to(device)
                h = _run_layers(llm, llm.get_input_embeddings()(sub_ids), sub_mask,
                                0, n_layers - k, final_norm=k == 0)
                for j, i in enumerate(idx):
                    self.states[i] = h[j, :lengths[i]].to(store).cpu().clone()
                    self.ids[i] = ids[i, :lengths[i]].clone()
                bar.update(len(idx))
        self.seconds = time.time() - t0

    def __len__(self):
        return len(self.texts)

    def rows(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index[t] for t in texts], dtype=torch.long)


class CachedEmbedder(nn.Module):
    """Embeds cached texts by row: top k decoder layers (with their LoRA) + pooler + norm."""

    def __init__(self, tower: nn.Module, cache: TextStateCache, max_tokens: int = 4096):
        super().__init__()
        self.tower, self.cache, self.max_tokens = tower, cache, max_tokens

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        tower, cache, k = self.tower, self.cache, self.cache.k
        device = rows.device
        lengths = [cache.states[i].shape[0] for i in rows.tolist()]
        out = [None] * len(lengths)
        for idx in length_chunks(lengths, self.max_tokens):
            n = max(lengths[i] for i in idx)
            # float: autocast (when on) picks the matmul precision, as for the uncached tower
            states = torch.stack([F.pad(cache.states[int(rows[i])], (0, 0, 0, n - lengths[i])) for i in idx]).to(device).float()
            ids = torch.stack([F.pad(cache.ids[int(rows[i])], (0, n - lengths[i]),
                                     value=tower.config.pad_token_id) for i in idx]).to(device)
            mask = torch.arange(n, device=device)[None] < torch.tensor([lengths[i] for i in idx], device=device)[:, None]
            if k:
                llm = tower.base_llm()
                n_layers = len(llm.layers)
                states = _run_layers(llm, states, mask, n_layers - k, n_layers, final_norm=True)
            pooled = tower.norm(tower.pooler(states, tower.pool_mask(ids, mask)))
            for j, i in enumerate(idx):
                out[i] = pooled[j]
        return torch.stack(out)


# ---------------------------------------------------------------- loss

def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All processes' `x` concatenated; gradients flow back to each process's own part."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


def gather_keys(x: torch.Tensor) -> torch.Tensor:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)


def _info_nce(queries, candidates, targets, blocked, temperature):
    logits = queries @ candidates.T / temperature
    logits = logits.masked_fill(blocked, float("-inf"))
    return F.cross_entropy(logits.float(), targets)


def supcon_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor] = None,
                temperature: float = 0.05, anchor_keys: Optional[torch.Tensor] = None,
                positive_keys: Optional[torch.Tensor] = None, negative_valid: Optional[torch.Tensor] = None,
                symmetric: bool = False) -> torch.Tensor:
    """InfoNCE of local anchors [B, D] over the gathered positives [W*B, D] + hard negatives [W*H, D].

    Anchor i's target is positive i of this process: every process must hold B anchors and H
    negative rows (pad the negatives and pass `negative_valid` [H] bool to mask the padding).
    `anchor_keys`/`positive_keys` ([B] int64, e.g. `text_key`): another pair whose anchor or
    positive is the same text as mine is not a negative (masked), since identical texts must
    embed identically. Embeddings are L2-normalised here."""
    a, p = F.normalize(anchors.float(), dim=-1), F.normalize(positives.float(), dim=-1)
    b = a.shape[0]
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    targets = torch.arange(b, device=a.device) + (torch.distributed.get_rank() * b if dist else 0)
    all_p, all_a = gather_with_grad(p), gather_with_grad(a)

    blocked = torch.zeros(b, all_p.shape[0], dtype=torch.bool, device=a.device)
    if anchor_keys is not None and positive_keys is not None:
        ak, pk = gather_keys(anchor_keys), gather_keys(positive_keys)
        same = (anchor_keys[:, None] == ak[None]) | (positive_keys[:, None] == pk[None])
        blocked = same & (torch.arange(ak.shape[0], device=a.device)[None] != targets[:, None])
    candidates, mask = all_p, blocked
    if negatives is not None and negatives.shape[0]:
        all_n = gather_with_grad(F.normalize(negatives.float(), dim=-1))
        valid = negative_valid if negative_valid is not None else torch.ones(
            negatives.shape[0], dtype=torch.bool, device=a.device)
        invalid = gather_keys(valid.long()) == 0   # gloo cannot gather bools
        candidates = torch.cat([all_p, all_n])
        mask = torch.cat([blocked, invalid[None].expand(b, -1)], 1)

    loss = _info_nce(a, candidates, targets, mask, temperature)
    if symmetric:   # positive -> anchor, over all anchors (no hard negatives on this side)
        loss = 0.5 * (loss + _info_nce(p, all_a, targets, blocked, temperature))
    return loss
