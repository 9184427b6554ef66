"""Which text of a sample a training step reads: the report, one section, or a rewrite.

Mixing texts teaches the text tower that an impression alone or a paraphrase still
describes the same film. A section that is empty, or a "variant" when the sample has no
clinically equivalent rewrite, falls back to the full report.
"""
from __future__ import annotations

import random
from typing import Dict, Mapping, Optional, Tuple

TEXT_KINDS = ("report", "impression", "findings", "variant")
TRAIN_TEXT_CHOICE = {"report": 0.5, "impression": 0.3, "findings": 0.1, "variant": 0.1}
EVAL_TEXT_CHOICE = {"report": 1.0}


def normalise_choice(probs: Optional[Mapping[str, float]], train: bool) -> Dict[str, float]:
    """Validate a {kind: weight} dict and scale it to sum to 1 (None: the train / eval default)."""
    if probs is None:
        probs = TRAIN_TEXT_CHOICE if train else EVAL_TEXT_CHOICE
    if isinstance(probs, str):
        probs = {probs: 1.0}
    unknown = set(probs) - set(TEXT_KINDS)
    if unknown:
        raise ValueError(f"unknown text kinds {sorted(unknown)}; use {TEXT_KINDS}")
    if any(w < 0 for w in probs.values()) or sum(probs.values()) <= 0:
        raise ValueError("text choice weights must be >= 0 and not all 0")
    total = float(sum(probs.values()))
    return {k: w / total for k, w in probs.items() if w > 0}


def choose_text(report: str, meta: dict, probs: Dict[str, float], rng: random.Random) -> Tuple[str, str]:
    """Draw a text kind by `probs`; return (text, kind actually used)."""
    kind = rng.choices(list(probs), weights=list(probs.values()))[0] if len(probs) > 1 else next(iter(probs))
    if kind in ("findings", "impression"):
        text = ((meta.get("sections") or {}).get(kind) or "").strip()
        if text:
            return text, kind
    elif kind == "variant":
        pool = [v["text"] for v in meta.get("variants") or [] if v.get("equivalent") and v.get("text", "").strip()]
        if pool:
            return rng.choice(pool), kind
    return report, "report"
