"""Text-robustness suite for any text encoder `encode_fn(list[str]) -> Tensor[N, D]`.

Four probes, on any list of `Report`s (Open-I's, read at run time, by default):

- variant -> original R@1, per rewrite style: the query is a clinically equivalent rewrite
  (abbreviated, reordered, ...), the gallery every original report; correct when the rewrite's
  own original ranks first (originals identical up to doubled punctuation or spacing count as
  one item; ties count against the encoder, see `retrieval`).
- impression -> findings and findings -> impression R@1, over reports that have both.
- error discrimination: with the original as anchor, a report passes when its equivalent
  rewrite is more similar to the original than EVERY one of its single-error rewrites
  (laterality swap, negation flip, severity change, inserted finding); also per error type.
- error-copy gallery R@1, per rewrite style: the variant -> original probe with every
  report's single-error rewrites added to the gallery, so a hit needs the rewrite's own original
  above the same report with one finding changed. Where a rewrite changes the words (paraphrase,
  shorthand, telegraphic style) sharing words with the original is no longer enough to find it;
  where it keeps them (typos, capitals, layout) a bag of words stays near 1.0 here too, and an
  encoder that a new layout moves off its content falls under it.

Two protocols (`styles`): "train" builds the variants from the training part of the rule tables
(what stage 1 learns from: the in-distribution suite), "heldout" (`run_heldout`) only from the
held-out part plus rewrite operations no training rule makes (`reports.noise`: shorthand and
typed acronyms, typos, capitals under other headers, numbered lists, telegraphic impressions).
The held-out protocol is the model-selection metric of stage 1 (see `reports.style_split`).
"""
import re
import zlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from open_clip_cxr.eval.paired import MISSES_VERSION
from open_clip_cxr.eval.retrieval import rank_of_targets
from open_clip_cxr.reports.types import Report, Variant

EncodeFn = Callable[[List[str]], torch.Tensor]
# which equivalent rewrite is the positive in error discrimination, first available wins;
# the *_only styles drop a section, which no single-error negative does, so they are not used
POSITIVE_STYLES = ("rephrase", "reorder", "expand", "abbreviate", "terse")
# the same for the held-out protocol: the light rewrites first, the whole-report restyles last
HELDOUT_POSITIVE_STYLES = ("paraphrase_heldout", "abbreviate_heldout", "typos", "numbered_list", "caps_headers")
STYLE_PROTOCOLS = ("train", "heldout", "all")
# the scoring's version, hashed into `protocol_fingerprint`: raise it when a probe is scored differently
# (2: originals identical up to doubled punctuation are one gallery item; 3: the error-copy gallery)
SCORING_VERSION = 3


# ------------------------------------------------------------------ encoders

def openclip_encode_fn(model, tokenizer, device="cpu", batch_size: int = 64) -> EncodeFn:
    """Text tower of an OpenCLIP model, L2-normalised."""
    from open_clip_cxr.eval.encode import encode_texts
    return lambda texts: encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device)


def hf_mean_pool_encode_fn(model_dir: Optional[str] = None, model=None, tokenizer=None, device="cpu",
                           batch_size: int = 64, max_length: int = 256) -> EncodeFn:
    """Mean-pooled last hidden states of a plain transformers encoder (default: the shipped MiniLM)."""
    if model is None:
        from transformers import AutoModel, AutoTokenizer
        from open_clip_cxr.eval.text_metrics import minilm_dir
        model_dir = model_dir or minilm_dir()
        model = AutoModel.from_pretrained(model_dir, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = model.to(device).eval()

    @torch.no_grad()
    def encode(texts: List[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)
    return encode


def bow_encode_fn(dim: int = 4096) -> EncodeFn:
    """Bag of words, no model: word counts hashed into `dim` buckets, L2-normalised (cosine)."""
    def encode(texts: List[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), dim)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                out[i, zlib.crc32(w.encode()) % dim] += 1   # crc32: stable across runs, unlike hash()
        return torch.nn.functional.normalize(out, dim=-1)
    return encode


# ------------------------------------------------------------------ reports

def original_text(report: Report) -> str:
    """The text variants are derived from (findings + impression), else the report text."""
    try:
        from open_clip_cxr.reports.variants import base_text
        return base_text(report)
    except ImportError:
        parts = [s.strip() for s in (report.findings, report.impression) if s and s.strip()]
        return "\n".join(parts) if parts else (report.text or "").strip()


def load_reports(spec: Optional[dict] = None, split: Optional[str] = "test", limit: Optional[int] = None) -> List[Report]:
    """Reports with text of one split from any registered source (`open_clip_cxr.data.registry`;
    `spec` as a recipe's `data:`, default Open-I read at run time from the torchxrayvision wheel)."""
    from open_clip_cxr.data.registry import iter_reports
    out = []
    for r in iter_reports(spec or {"source": "openi"}, split):
        if original_text(r):
            out.append(r)
            if limit is not None and len(out) >= limit:
                break
    return out


def openi_reports(split: Optional[str] = "test", limit: Optional[int] = None, path=None) -> List[Report]:
    """Open-I reports (read at run time from the torchxrayvision wheel) of one hash split."""
    return load_reports({"source": "openi", "path": path}, split, limit)


# ------------------------------------------------------------------ the suite

class _Embedder:
    """Encodes each distinct text once."""

    def __init__(self, encode_fn: EncodeFn, texts: Sequence[str], progress: Optional[str] = None,
                 chunk: int = 512):
        uniq = list(dict.fromkeys(texts))
        self.row = {t: i for i, t in enumerate(uniq)}
        if not uniq:
            self.emb = torch.zeros(0, 1)
            return
        # chunks of similar length (encoders pad each batch to its longest text), for a progress bar
        order = sorted(range(len(uniq)), key=lambda i: len(uniq[i]))
        emb = None
        with tqdm(total=len(uniq), desc=progress, unit="text", disable=progress is None) as bar:
            for s in range(0, len(order), chunk):
                idx = order[s:s + chunk]
                part = encode_fn([uniq[i] for i in idx]).float()
                if emb is None:
                    emb = torch.zeros(len(uniq), part.shape[-1])
                emb[idx] = part
                bar.update(len(idx))
        self.emb = torch.nn.functional.normalize(emb, dim=-1)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.emb[[self.row[t] for t in texts]]


def same_report_key(text: str) -> str:
    """Texts typed alike up to doubled punctuation or spacing ("No acute findings.." and "No acute
    findings.") are one report: no encoder can tell which of the two a rewrite came from."""
    return re.sub(r"\s+", " ", re.sub(r"([.,;:])\1+", r"\1", text)).strip()


def _r1(emb: _Embedder, queries: Sequence[str], targets: Sequence[str], gallery: Sequence[str],
        **kw) -> Tuple[float, List[int]]:
    """(R@1 of each query retrieving its target text among `gallery`, indices of the distinct
    queries that missed; texts with the same `same_report_key` are one item, the first of them).
    The misses let two models be paired query by query (`eval.paired`); a (query, target) pair
    repeated word for word (Open-I's commonest normal report comes many times) is one trial, listed
    once under its first index, so a pairing does not count the same miss several times."""
    first: Dict[str, str] = {}
    for t in gallery:
        first.setdefault(same_report_key(t), t)
    gallery = list(first.values())
    targets = [first.get(same_report_key(t), t) for t in targets]
    r = rank_of_targets(emb(queries), emb(gallery), list(targets), gallery, k=1, **kw)
    hit = r.ranks == 0
    seen = set()
    misses = []
    for i, (q, t, h) in enumerate(zip(queries, targets, hit.tolist())):
        if (q, t) not in seen:
            seen.add((q, t))
            if not h:
                misses.append(i)
    return float(hit.float().mean()), misses


def run_heldout(reports: Sequence[Report], encode_fn: EncodeFn, seed: int = 0, **kw) -> dict:
    """The suite on held-out styles only (`reports.noise.heldout_variants`/`heldout_negatives`)."""
    return run_robustness(reports, encode_fn, seed=seed, styles="heldout", **kw)


def run_suites(reports: Sequence[Report], encoders: Dict[str, EncodeFn], seed: int = 0,
               styles: str = "train") -> Dict[str, Dict[str, dict]]:
    """{protocol: {encoder name: suite result}} (`open-clip-cxr eval --styles`): "train" or
    "heldout" runs that protocol, "both" the training-part suite and then the held-out one."""
    if styles not in ("train", "heldout", "both"):
        raise ValueError(f"styles must be train, heldout or both, got {styles!r}")
    protocols = ("train", "heldout") if styles == "both" else (styles,)
    return {st: {name: run_robustness(reports, fn, seed=seed, styles=st) for name, fn in encoders.items()}
            for st in protocols}


def _rewriters(styles: str, seed: int, variants_fn, negatives_fn):
    """(variants_fn, negatives_fn) of a protocol, the given ones kept."""
    if styles not in STYLE_PROTOCOLS:
        raise ValueError(f"styles must be one of {STYLE_PROTOCOLS}, got {styles!r}")
    if variants_fn is None or negatives_fn is None:
        if styles == "heldout":
            from open_clip_cxr.reports import noise
            variants_fn = variants_fn or (lambda r: noise.heldout_variants(r, seed=seed))
            negatives_fn = negatives_fn or (lambda r: noise.heldout_negatives(r, seed=seed))
        else:
            from open_clip_cxr.reports import variants as V
            part = None if styles == "all" else styles
            variants_fn = variants_fn or (lambda r: V.equivalent_variants(r, seed=seed, part=part))
            negatives_fn = negatives_fn or (lambda r: V.hard_negatives(r, seed=seed, part=part))
    return variants_fn, negatives_fn


def _suite(reports: Sequence[Report], variants_fn, negatives_fn):
    """(reports with text, originals, equivalent rewrites, one-error rewrites, reports with both
    sections)."""
    reports = [r for r in reports if original_text(r)]
    if not reports:
        raise ValueError("no reports with text to evaluate")
    originals = [original_text(r) for r in reports]
    equiv = [[v for v in variants_fn(r) if v.equivalent] for r in reports]
    negs = [[v for v in negatives_fn(r) if not v.equivalent] for r in reports]
    both = [r for r in reports if r.findings.strip() and r.impression.strip()]
    return reports, originals, equiv, negs, both


def _suite_texts(originals, equiv, negs, both, tag_style=False) -> List[str]:
    """Every text the suite encodes (`tag_style`: each rewrite prefixed with its style)."""
    texts = originals + [f"{v.style}\t{v.text}" if tag_style else v.text for vs in equiv + negs for v in vs]
    return texts + [r.findings.strip() for r in both] + [r.impression.strip() for r in both]


def protocol_fingerprint(reports: Sequence[Report], seed: int = 0, styles: str = "train") -> str:
    """A short hash of every text (and rewrite style) the suite of `styles` would encode and of
    `SCORING_VERSION`: cached results are reused only while both stay the same."""
    import hashlib
    texts = _suite_texts(*_suite(reports, *_rewriters(styles, seed, None, None))[1:], tag_style=True)
    return hashlib.sha256("\x00".join([f"scoring {SCORING_VERSION}"] + texts).encode()).hexdigest()[:12]


def row_reports(reports: Sequence[Report], seed: int = 0, styles: str = "train",
                variants_fn: Optional[Callable[[Report], List[Variant]]] = None) -> Dict[str, List[int]]:
    """{table row: the report (index among the reports with text) behind each item of the row}, for
    the rows whose items are not reports themselves (a style's rewrites, the section pairs; error
    discrimination's misses are report indices already). The same for every model on one protocol,
    so the draws of a protocol (suite seeds) can be paired report by report (`paired.pooled_paired`)."""
    no_negatives = lambda r: []  # noqa: E731  (the one-error copies are not needed here)
    reports, _, equiv, _, _ = _suite(reports, *_rewriters(styles, seed, variants_fn, no_negatives))
    rows: Dict[str, List[int]] = {}
    for i, vs in enumerate(equiv):       # the order `run_robustness` lists each style's queries in
        for v in vs:
            rows.setdefault(f"variant->original R@1 [{v.style}]", []).append(i)
            rows.setdefault(f"error-copy gallery R@1 [{v.style}]", []).append(i)
    both = [i for i, r in enumerate(reports) if r.findings.strip() and r.impression.strip()]
    rows["impression->findings R@1"] = rows["findings->impression R@1"] = both
    return rows


def run_robustness(reports: Sequence[Report], encode_fn: EncodeFn, seed: int = 0,
                   variants_fn: Optional[Callable[[Report], List[Variant]]] = None,
                   negatives_fn: Optional[Callable[[Report], List[Variant]]] = None,
                   positive_styles: Optional[Sequence[str]] = None, progress: Optional[str] = None,
                   styles: str = "train", **search_kw) -> dict:
    """All four probes on `reports`; a JSON-able dict. `variants_fn`/`negatives_fn` default to
    the rewriters of the `styles` protocol ("train": `reports.variants.equivalent_variants`/
    `hard_negatives` on the training part of the style split; "heldout": `reports.noise`;
    "all": both parts of the rule tables) with `seed`; `progress` names a progress bar over the
    encoding (none by default)."""
    variants_fn, negatives_fn = _rewriters(styles, seed, variants_fn, negatives_fn)
    if positive_styles is None:
        positive_styles = HELDOUT_POSITIVE_STYLES if styles == "heldout" else POSITIVE_STYLES
    reports, originals, equiv, negs, both = _suite(reports, variants_fn, negatives_fn)
    emb = _Embedder(encode_fn, _suite_texts(originals, equiv, negs, both), progress)

    out: dict = {"n_reports": len(reports), "styles": styles, "misses_version": MISSES_VERSION}
    # 1. variant -> original, per style: among the originals, then (1b) among the originals and every
    # one-error copy (the same report with one finding changed)
    by_style: Dict[str, list] = {}
    for orig, vs in zip(originals, equiv):
        for v in vs:
            by_style.setdefault(v.style, []).append((v.text, orig))
    copy_gallery = originals + [n.text for ns in negs for n in ns]
    for key, gallery in (("variant_to_original", originals), ("error_copy_gallery", copy_gallery)):
        per_style = {}
        for style, pairs in sorted(by_style.items()):
            q, t = zip(*pairs)
            r1, misses = _r1(emb, q, t, gallery, **search_kw)
            per_style[style] = {"R@1": r1, "n": len(pairs), "misses": misses}
        out[key] = per_style
        out[f"{key}_mean_R@1"] = (sum(v["R@1"] for v in per_style.values()) / len(per_style)
                                  if per_style else None)
    # 2. impression <-> findings
    imp = [r.impression.strip() for r in both]
    fnd = [r.findings.strip() for r in both]
    out["n_with_both_sections"] = len(both)
    for key, q, t in (("impression_to_findings", imp, fnd), ("findings_to_impression", fnd, imp)):
        r1, misses = _r1(emb, q, t, t, **search_kw) if both else (None, None)
        out[f"{key}_R@1"], out[f"{key}_misses"] = r1, misses
    # 3. error discrimination
    out["error_discrimination"] = _discrimination(emb, originals, equiv, negs, positive_styles)
    return out


def discrimination_scores(emb, originals, equiv, negs, positive_styles):
    """Per report the probe scores: (index, positive Variant, its similarity to the original,
    [(one-error Variant, its similarity)]). The positive is the first of `positive_styles` present;
    reports without one, or without one-error copies, are skipped."""
    for i, (orig, vs, ns) in enumerate(zip(originals, equiv, negs)):
        pos = next((v for s in positive_styles for v in vs if v.style == s), None)
        if pos is None or not ns:
            continue
        a = emb([orig])[0]
        yield i, pos, float(emb([pos.text])[0] @ a), list(zip(ns, (emb([n.text for n in ns]) @ a).tolist()))


def _discrimination(emb, originals, equiv, negs, positive_styles) -> dict:
    passed, margins = [], []
    per_type: Dict[str, List[Tuple[int, bool]]] = {}   # (report index, passed): misses pair by report
    for i, _, s_pos, scored in discrimination_scores(emb, originals, equiv, negs, positive_styles):
        passed.append((i, all(s_pos > s for _, s in scored)))
        margins.append(s_pos - max(s for _, s in scored))
        beats: Dict[str, bool] = {}
        for n, s in scored:
            t = n.error_type or n.style
            beats[t] = beats.get(t, True) and s_pos > s
        for t, ok in beats.items():
            per_type.setdefault(t, []).append((i, ok))

    def summary(oks):
        return {"accuracy": sum(ok for _, ok in oks) / len(oks), "n": len(oks),
                "misses": [i for i, ok in oks if not ok]}
    types = {t: summary(oks) for t, oks in sorted(per_type.items())}
    return {**(summary(passed) if passed else {"accuracy": None, "n": 0, "misses": []}),
            "mean_margin": sum(margins) / len(margins) if margins else None, "per_error_type": types}


# ------------------------------------------------------------------ table

def _flatten(res: Mapping) -> Dict[str, Optional[float]]:
    rows: Dict[str, Optional[float]] = {}
    for style, v in res.get("variant_to_original", {}).items():
        rows[f"variant->original R@1 [{style}]"] = v["R@1"]
    rows["variant->original R@1 (mean)"] = res.get("variant_to_original_mean_R@1")
    for style, v in res.get("error_copy_gallery", {}).items():
        rows[f"error-copy gallery R@1 [{style}]"] = v["R@1"]
    if "error_copy_gallery" in res:
        rows["error-copy gallery R@1 (mean)"] = res.get("error_copy_gallery_mean_R@1")
    rows["impression->findings R@1"] = res.get("impression_to_findings_R@1")
    rows["findings->impression R@1"] = res.get("findings_to_impression_R@1")
    ed = res.get("error_discrimination", {})
    rows["error discrimination (all types)"] = ed.get("accuracy")
    for t, v in ed.get("per_error_type", {}).items():
        rows[f"error discrimination [{t}]"] = v["accuracy"]
    return rows


def format_table(results_by_model: Mapping[str, Mapping]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    flat = {m: _flatten(r) for m, r in results_by_model.items()}
    metrics = list(dict.fromkeys(k for f in flat.values() for k in f))
    models = list(flat)
    w0 = max([len("metric")] + [len(m) for m in metrics])
    widths = [max(8, len(m)) for m in models]
    lines = ["  ".join(["metric".ljust(w0)] + [m.rjust(w) for m, w in zip(models, widths)])]
    lines.append("  ".join(["-" * w0] + ["-" * w for w in widths]))
    for k in metrics:
        cells = []
        for m, w in zip(models, widths):
            v = flat[m].get(k)
            cells.append(("-" if v is None else f"{v:.3f}").rjust(w))
        lines.append("  ".join([k.ljust(w0)] + cells))
    return "\n".join(lines)
