"""The supervised contrastive loss (InfoNCE with in-batch and hard negatives), across processes.

See `training/supcon.py` for what the examples are; this module only scores them.
"""
from typing import Optional

import math

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


def _info_nce(queries, candidates, targets, blocked, temperature, bias=None):
    logits = queries @ candidates.T / temperature
    if bias is not None:    # [C] added to every query's logit of that candidate
        logits = logits + bias
    logits = logits.masked_fill(blocked, float("-inf"))
    return F.cross_entropy(logits.float(), targets)


def supcon_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor] = None,
                temperature: float = 0.05, anchor_keys: Optional[torch.Tensor] = None,
                positive_keys: Optional[torch.Tensor] = None, negative_valid: Optional[torch.Tensor] = None,
                symmetric: bool = False, negative_weight: float = 1.0) -> torch.Tensor:
    """InfoNCE of local anchors [B, D] over the gathered positives [W*B, D] + hard negatives [W*H, D].

    Anchor i's target is positive i of this process: every process must hold B anchors and H
    negative rows (pad the negatives and pass `negative_valid` [H] bool to mask the padding).
    `anchor_keys`/`positive_keys` ([B] int64, e.g. `text_key`): another pair whose anchor or
    positive is the same text as mine is not a negative (masked), since identical texts must
    embed identically. `negative_weight` w counts each hard negative w times in the softmax's
    denominator (log w added to its logits): w > 1 puts more of the gradient on the one-error
    copies without more steps on the rewrites. Embeddings are L2-normalised here."""
    if negative_weight <= 0:
        raise ValueError(f"negative_weight must be > 0, not {negative_weight}")
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
    candidates, mask, bias = all_p, blocked, None
    if negatives is not None and negatives.shape[0]:
        all_n = gather_with_grad(F.normalize(negatives.float(), dim=-1))
        valid = negative_valid if negative_valid is not None else torch.ones(
            negatives.shape[0], dtype=torch.bool, device=a.device)
        invalid = gather_keys(valid.long()) == 0   # gloo cannot gather bools
        candidates = torch.cat([all_p, all_n])
        mask = torch.cat([blocked, invalid[None].expand(b, -1)], 1)
        if negative_weight != 1.0:
            bias = torch.zeros(candidates.shape[0], device=a.device)
            bias[all_p.shape[0]:] = math.log(negative_weight)

    loss = _info_nce(a, candidates, targets, mask, temperature, bias)
    if symmetric:   # positive -> anchor, over all anchors (no hard negatives on this side)
        loss = 0.5 * (loss + _info_nce(p, all_a, targets, blocked, temperature))
    return loss


def multiview_supcon_loss(views: torch.Tensor, report_ids: torch.Tensor, negatives: Optional[torch.Tensor] = None,
                          neg_owner: Optional[torch.Tensor] = None, temperature: float = 0.05,
                          keys: Optional[torch.Tensor] = None, neg_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SupCon ("L_out", Khosla et al. 2020) of V views per report, gathered across processes.

    `views` [N, D]: this process's views; `report_ids` [N]: the local report (0 <= id < N) of each
    row, -1 for a padding row. Every valid view is a query; its positives are the other views of
    its report; its denominator is every other valid view of every process plus every valid hard
    negative (`negatives` [H, D], `neg_owner` [H]: the report a row was made from, -1 padding).
    Query i's loss is -mean over its positives p of log softmax_p(sim / temperature); the result
    is the mean over this process's queries. `keys` [N] / `neg_keys` [H] (`text_key`): a text of
    another report, or a hard negative, identical to one of my report's views is masked, not pushed
    away. Every process must hold N view rows and H negative rows (pad them)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, n = (torch.distributed.get_rank() if dist else 0), views.shape[0]
    v = F.normalize(views.float(), dim=-1)
    all_v = gather_with_grad(v)
    # report ids unique across processes: each process's ids live in their own block of N
    mine = torch.where(report_ids >= 0, report_ids + rank * n, report_ids)
    owner = gather_keys(mine)
    valid = owner >= 0
    same = (mine[:, None] == owner[None]) & (mine[:, None] >= 0)      # [N, W*N] views of my report
    me = torch.arange(n, device=v.device) + rank * n
    not_me = torch.arange(owner.shape[0], device=v.device)[None] != me[:, None]
    positive = same & not_me
    blocked = ~valid[None] | ~not_me    # padding and the query itself are never in the denominator
    if keys is not None:
        all_k = gather_keys(keys)
        # [N, W*N]: does candidate j repeat the text of any view of query i's report? Then it is
        # the same text as one of my positives and must not be pushed away (nor pulled: masked)
        repeats = (same.float() @ (all_k[:, None] == all_k[None]).float()) > 0
        blocked = blocked | (repeats & ~same)
    candidates = all_v
    if negatives is not None and negatives.shape[0]:
        all_n = gather_with_grad(F.normalize(negatives.float(), dim=-1))
        n_owner = gather_keys(neg_owner if neg_owner is not None else torch.zeros(
            negatives.shape[0], dtype=torch.long, device=v.device))
        n_blocked = (n_owner < 0)[None].expand(n, -1)
        if keys is not None and neg_keys is not None:   # an error copy that is, word for word, one of my views
            n_blocked = n_blocked | (same.float() @ (all_k[:, None] == gather_keys(neg_keys)[None]).float() > 0)
        candidates = torch.cat([all_v, all_n])
        blocked = torch.cat([blocked, n_blocked], 1)
        positive = torch.cat([positive, torch.zeros_like(n_blocked)], 1)
    n_pos = positive.sum(1)
    # a query with no other view (padding, or a report left with one view) has nothing to pull;
    # its row stays unmasked so that no row is all -inf (NaN gradients), and it is left out below
    query = (mine >= 0) & (n_pos > 0)
    logits = (v @ candidates.T / temperature).masked_fill(blocked & query[:, None], float("-inf"))
    log_p = logits.float().log_softmax(-1)
    per_query = -(log_p.masked_fill(~positive, 0.0)).sum(1) / n_pos.clamp(min=1)
    if not query.any():
        return per_query.sum() * 0.0
    return per_query[query].mean()
