"""The supervised contrastive loss (InfoNCE with in-batch and hard negatives), across processes.

See `training/supcon.py` for what the examples are; this module only scores them.
"""
from typing import Optional

import torch
import torch.nn.functional as F


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
