"""Masked next-token prediction (MNTP, LLM2Vec step 1) on the bidirectional decoder.

A decoder trained causally was never asked to read to the right; MNTP teaches it to. Mask a
fraction of the tokens, run the decoder with bidirectional attention, and predict the token
at a masked position i from the output at position i-1, through the LM head. i-1, not i:
that is where the pretrained LM head expects "the next token" to be read, so the head needs
no re-learning and the loss starts low enough for a short, cheap run.

The mask token: Llama-family tokenizers (SmolLM2 included) have no mask token, so an
existing token stands in for it. LLM2Vec uses "_" for Llama; we do the same by default
(`resolve_mask_token_id`), falling back to the tokenizer's own mask token, then unk.

The LM head is the tied input embedding (`logits = hidden @ E.T`): SmolLM2 ties them, and our
tower keeps no separate head. Logits are computed for the masked positions only, which keeps
the 49k-wide vocabulary projection off the other 80 % of tokens.
"""
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE = -100   # label of a position that is not predicted (CrossEntropy's ignore_index)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve_mask_token_id(tokenizer, mask_token: Optional[str] = "_") -> int:
    """Id of the token that replaces masked tokens: `mask_token` if the vocabulary has it as
    one token, else the tokenizer's mask token, else its unk token."""
    hf = getattr(tokenizer, "tokenizer", tokenizer)
    unk = getattr(hf, "unk_token_id", None)
    if mask_token is not None:
        tid = hf.convert_tokens_to_ids(mask_token)
        if tid is not None and tid != unk:
            return int(tid)
    for tid in (getattr(hf, "mask_token_id", None), unk):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither the requested mask token, a mask token, nor an unk token")


def special_token_ids(tokenizer, extra: Iterable[Optional[int]] = ()) -> torch.Tensor:
    """Ids never masked nor predicted: the tokenizer's specials and e.g. the instruction separator."""
    hf = getattr(tokenizer, "tokenizer", tokenizer)
    ids = set(getattr(hf, "all_special_ids", []) or []) | {i for i in extra if i is not None}
    return torch.tensor(sorted(ids), dtype=torch.long)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int,
                special_ids: Optional[torch.Tensor] = None, prob: float = 0.2,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels). In each row, round(prob * n) of its n maskable tokens (at least
    one) are replaced by `mask_id`; labels hold the original id there and IGNORE elsewhere.

    Maskable: real (attention_mask), not special, and not the first real token, which has
    no position i-1 to be predicted from. An exact count per row (not a coin per token)
    keeps short reports from going unmasked and makes the fraction testable.
    """
    mask = attention_mask.bool()
    first = torch.zeros_like(mask)
    first[torch.arange(mask.shape[0]), mask.long().argmax(1)] = True    # first real token (left padding too)
    maskable = mask & ~first
    if special_ids is not None and special_ids.numel():
        maskable &= ~torch.isin(input_ids, special_ids.to(input_ids.device))
    n = maskable.sum(1)
    k = torch.where(n > 0, (n.float() * prob).round().long().clamp_min(1), n)
    # Rank maskable positions by a random score; the k best of each row are masked.
    score = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    score = score.masked_fill(~maskable, 2.0)
    rank = score.argsort(1).argsort(1)
    chosen = maskable & (rank < k.unsqueeze(1))
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return input_ids.masked_fill(chosen, mask_id), labels


def shift_for_next_token(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pair the output at i-1 with the label at i: (states [M, D], targets [M]) for the M
    predicted positions."""
    h, y = hidden[:, :-1], labels[:, 1:]
    keep = y != IGNORE
    return h[keep], y[keep]


def mntp_loss(tower, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked tokens, read from the position before each (tied LM head)."""
    out = tower(input_ids=input_ids, attention_mask=attention_mask)
    states, targets = shift_for_next_token(out.last_hidden_state, labels)
    embed = tower.base_llm().get_input_embeddings().weight
    logits = states @ embed.to(states.dtype).T
    return F.cross_entropy(logits.float(), targets)
