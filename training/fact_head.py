"""An auxiliary objective for stage 1: the clinical facts of a text, read off its embedding.

Why: the contrastive loss sees a negation, a side or a severity change only in the one-error
copies our templates write, so the tower learns those templates (in-distribution discrimination
0.96-0.99) and not the facts (held-out templates 0.70-0.80). Here a linear head on the
normalised embedding predicts, for every text of a step, which facts the rule-based mention
reader (`reports.mentions`) finds in it: a finding present or absent, its side, its severity.
The reader reads the phrasings of real reports ("is not seen", "free of", "tiny"), not only
ours, so the embedding is asked to place the same fact on one direction whatever its wording.
The head is dropped after training; the tower keeps what it learned.
"""
import math
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from open_clip_cxr.reports.mentions import FINDINGS, extract_mentions

SIDES = ("left", "right", "bilateral")
# Severity words and ranges in three steps, one label each: coarse enough that every step has
# examples for the common findings.
_SEVERITY_STEP = {"trace": 0, "tiny": 0, "minimal": 0, "small": 0, "mild": 0,
                  "moderate": 1, "large": 2, "severe": 2, "massive": 2, "extensive": 2, "marked": 2}


def _labels() -> Dict[Tuple, int]:
    names = [f for f, _ in FINDINGS]
    keys = [(f, "present") for f in names] + [(f, "absent") for f in names]
    keys += [(f, s) for f in names for s in SIDES] + [(f, "severity", k) for f in names for k in range(3)]
    return {k: i for i, k in enumerate(keys)}


LABELS = _labels()


def severity_step(severity: str) -> int:
    """0 (trace..mild), 1 (moderate) or 2 (large..marked); a range counts as its upper end."""
    return _SEVERITY_STEP[severity.split("-")[-1]]


@lru_cache(maxsize=1 << 17)
def fact_ids(text: str) -> Tuple[int, ...]:
    """The label indices (`LABELS`) the mention reader finds in `text`."""
    out = set()
    for m in extract_mentions(text):
        if m.negated:
            out.add(LABELS[(m.finding, "absent")])
            continue
        out.add(LABELS[(m.finding, "present")])
        if m.side:
            out.add(LABELS[(m.finding, m.side)])
        if m.severity:
            out.add(LABELS[(m.finding, "severity", severity_step(m.severity))])
    return tuple(sorted(out))


def fact_targets(texts: Sequence[str]) -> torch.Tensor:
    """[N, len(LABELS)] multi-hot float targets of `texts`."""
    y = torch.zeros(len(texts), len(LABELS))
    for i, t in enumerate(texts):
        y[i, list(fact_ids(t))] = 1.0
    return y


class WithFactHead(torch.nn.Module):
    """`embedder` whose forward also returns the fact logits of its (normalised) embeddings, so
    one wrapped module carries both through accelerate and into the checkpoints."""

    def __init__(self, embedder: torch.nn.Module, dim: int, cosine_scale: float = 0.0):
        super().__init__()
        self.embedder = embedder
        self.head = torch.nn.Linear(dim, len(LABELS))
        self.scale = math.sqrt(dim)
        # cosine_scale > 0: each label's weight row is normalised and the logit is scale x cos + bias.
        # Why: a free linear head can read a fact off a direction too small to move the cosine
        # similarity that retrieval uses (its weights grow instead); with the scale fixed, a
        # confident label needs the embedding itself to lean towards the fact's direction.
        self.cosine_scale = float(cosine_scale)
        # Most labels are off in most texts: start the bias at a 1 % prior, or the first hundreds of
        # steps go to learning that (224 labels x log 2 = 155 nats a text) instead of the facts.
        torch.nn.init.constant_(self.head.bias, -math.log(99.0))

    def forward(self, inputs):
        emb = self.embedder(inputs)
        unit = F.normalize(emb.float(), dim=-1)
        if self.cosine_scale:
            return emb, self.cosine_scale * unit @ F.normalize(self.head.weight, dim=-1).T + self.head.bias
        # the direction is what retrieval reads; sqrt(dim) gives it unit-variance entries, so the
        # head's logits reach the labels' range within tens of steps, not hundreds
        return emb, self.head(unit * self.scale)


def fact_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over the labels, averaged over the texts: one text's facts
    weigh about as much as one contrastive query."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.to(logits.device), reduction="sum") \
        / max(logits.shape[0], 1)


__all__: List[str] = ["LABELS", "WithFactHead", "fact_ids", "fact_loss", "fact_targets", "severity_step"]
