"""Embedding a step's texts with the LLM tower, whole or from cached lower layers.

- `length_chunks`: texts grouped by length under a token budget (padding is paid in full);
- `Embedder`: the tower as one module whose single forward embeds a whole step's texts;
- `TextStateCache` + `CachedEmbedder`: the residual stream below the top k decoder layers
  computed once per text; a step then runs only those k layers and the pooler.
"""
import contextlib
import time
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


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


POOLER_TOKENS_PER_CALL = 32768   # padded tokens per pooler-only call (~0.5 GB of fp32 activations)


def drop_tokens(keep: torch.Tensor, p: float, protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`keep` (bool, texts x tokens) with each kept token hidden with probability `p`, except the
    `protected` ones; a text that would lose every token keeps them all. The states were computed
    on the whole text, so a hidden token's context is still in its neighbours: this teaches the
    pooler to read the whole text rather than a few positions (such as the sentence-final periods
    it otherwise leans on)."""
    survive = torch.rand(keep.shape, device=keep.device) >= p
    if protected is not None:
        survive |= protected
    dropped = keep & survive
    return torch.where(dropped.any(1, keepdim=True), dropped, keep)


def cue_token_mask(tokenizer) -> torch.Tensor:
    """Bool over the vocabulary: tokens that spell a negation, side, severity or change word
    ("no", "left", "mild" of "mildly"). Hiding one of them would make a positive pair of texts
    that differ in exactly what the hard negatives teach, so token dropout never hides them."""
    from open_clip_cxr.reports.noise import CUE_WORD_RE
    hf = getattr(tokenizer, "tokenizer", tokenizer)
    words = [t.lstrip("\u0120\u2581 ").lower() for t in hf.convert_ids_to_tokens(list(range(len(hf))))]
    return torch.tensor([bool(w) and CUE_WORD_RE.match(w) is not None for w in words])


class CachedEmbedder(nn.Module):
    """Embeds cached texts by row: top k decoder layers (with their LoRA) + pooler + norm."""

    def __init__(self, tower: nn.Module, cache: TextStateCache, max_tokens: int = 4096, token_dropout: float = 0.0,
                 cue_tokens: Optional[torch.Tensor] = None):
        super().__init__()
        self.tower, self.cache, self.max_tokens = tower, cache, max_tokens
        # training only: see `drop_tokens`; `cue_tokens` (`cue_token_mask`) are never hidden. A buffer,
        # so it moves with the module once instead of being copied to the device every step; not saved.
        self.token_dropout = token_dropout
        self.register_buffer("cue_tokens", cue_tokens, persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        tower, cache, k = self.tower, self.cache, self.cache.k
        device = rows.device
        lengths = [cache.states[i].shape[0] for i in rows.tolist()]
        out = [None] * len(lengths)
        # Pooler alone (k=0): it packs the real tokens, so padding costs nothing and one big
        # call beats many small ones (bf16 step 1.5x faster); the budget only caps memory.
        budget = self.max_tokens if k else POOLER_TOKENS_PER_CALL
        for idx in length_chunks(lengths, budget):
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
            keep = tower.pool_mask(ids, mask)
            if self.training and self.token_dropout:
                cue = None if self.cue_tokens is None else self.cue_tokens[ids]
                keep = drop_tokens(keep, self.token_dropout, cue)
            pooled = tower.norm(tower.pooler(states, keep))
            for j, i in enumerate(idx):
                out[i] = pooled[j]
        return torch.stack(out)
