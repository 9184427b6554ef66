"""Cached-text mode (as in LLM2CLIP): read every report through the frozen LLM once.

With the text tower frozen, the LLM forward is the same at every step, so it is done once
per report before training and the loop trains the vision tower and the text head only.

Where the cache is cut (decided here, used by `clip_stage`):

    tokens -> LLM (frozen, LoRA adapters included as loaded) -> pooler (frozen)
           -> [ CACHE: pooled vector, float16, hidden_size wide ]
           -> tower.norm (LayerNorm, trained) -> model.text.proj (Linear, trained) -> L2 norm

i.e. the pooler's output BEFORE `tower.norm`: the LayerNorm and the projection stay
trainable, exactly the "text head" of the uncached run, and the latent-attention pooler is
frozen (its weights would otherwise need the token states, which are not cached). The
validation pass runs the full tower, which gives the same features as the cache path.

One text per sample: the full report, as evaluation reads it (training's text-choice
augmentation - impression / findings / variants - is not applied in this mode).

Files in the cache folder: `features.npy` [N, hidden] float16, `keys.json` (sample keys in
row order), `meta.json` (what it was built from; a mismatch rebuilds it).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES, KEYS, META = "features.npy", "keys.json", "meta.json"


@contextlib.contextmanager
def _without_norm(tower):
    norm = tower.norm
    tower.norm = nn.Identity()
    try:
        yield tower
    finally:
        tower.norm = norm


@torch.no_grad()
def pooled_before_norm(model, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower's pooled vector before `tower.norm`, float32, [B, hidden]."""
    tower = model.text.transformer
    mask = (tokens != model.text.config.pad_token_id).long()
    with _without_norm(tower):
        return tower(input_ids=tokens, attention_mask=mask).pooler_output.float()


def text_head(model, pooled: torch.Tensor) -> torch.Tensor:
    """The trainable part after the cache: norm -> projection (unnormalised features)."""
    tower = model.text.transformer
    return model.text.proj(tower.norm(pooled))


def freeze_for_cached(model) -> None:
    """Everything of the text tower frozen except `tower.norm`; the projection stays trainable."""
    tower = model.text.transformer
    tower.requires_grad_(False)
    tower.norm.requires_grad_(True)
    model.text.proj.requires_grad_(True)


def iter_reports(urls) -> Iterator[Tuple[str, str]]:
    """(key, report text as evaluation reads it) for every sample, without decoding images."""
    from open_clip_cxr.data.shard_reports import iter_shard_texts
    from open_clip_cxr.data.text_choice import choose_text, normalise_choice
    probs = normalise_choice(None, train=False)
    for key, txt, meta in iter_shard_texts(urls):
        if txt is None:
            continue
        text, _ = choose_text(txt, meta, probs, random.Random(key))
        yield key, text


def build_text_cache(model, tokenizer, urls, cache_dir, *, batch_size: int = 64, device="cpu",
                     autocast=None, fingerprint: Optional[dict] = None, progress: bool = False) -> Path:
    """Encode every report of `urls` once into `cache_dir`; reused when `meta.json` matches."""
    out = Path(cache_dir)
    meta = {"urls": urls if isinstance(urls, str) else list(urls), "cut": "pooler output before tower.norm",
            **(fingerprint or {})}
    if (out / META).exists() and json.loads((out / META).read_text()) == meta and (out / FEATURES).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    keys, feats, batch = [], [], []
    seen = set()
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()

    def flush():
        tokens = tokenizer([t for _, t in batch]).to(device)
        with autocast():
            feats.append(pooled_before_norm(model, tokens).half().cpu())
        keys.extend(k for k, _ in batch)
        batch.clear()

    for key, text in iter_reports(urls):
        if key in seen:
            continue
        seen.add(key)
        batch.append((key, text))
        if len(batch) == batch_size:
            flush()
            if progress and len(keys) % (batch_size * 20) == 0:
                print(f"text cache: {len(keys)} reports", flush=True)
    if batch:
        flush()
    model.train(was_training)
    if not keys:
        raise ValueError(f"no reports found in {urls}")
    tmp = out / (FEATURES + ".tmp.npy")
    np.save(tmp, torch.cat(feats).numpy())
    os.replace(tmp, out / FEATURES)
    (out / KEYS).write_text(json.dumps(keys))
    (out / META).write_text(json.dumps(meta))
    return out


class TextFeatureCache:
    """Look up cached pooled features by sample key."""

    def __init__(self, cache_dir):
        d = Path(cache_dir)
        self.features = torch.from_numpy(np.load(d / FEATURES))
        self.keys = json.loads((d / KEYS).read_text())
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self):
        return len(self.keys)

    def __call__(self, keys: Sequence[str]) -> torch.Tensor:
        try:
            rows = [self.index[k] for k in keys]
        except KeyError as e:
            raise KeyError(f"sample {e.args[0]!r} is not in the text cache; rebuild it "
                           f"(delete the cache folder) after changing the training shards") from None
        return self.features[rows].float()


def normalized_text_features(model, pooled: torch.Tensor) -> torch.Tensor:
    return F.normalize(text_head(model, pooled), dim=-1)
