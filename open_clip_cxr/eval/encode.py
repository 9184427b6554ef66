"""Embed evaluation shards with any OpenCLIP model: images per image, reports once per study.

Errors say what is wrong and how to fix it: shards whose samples lack a study id, no
report to embed, or a tokenizer that does not belong to the model (token ids beyond the
model's vocabulary, or sequences longer than its positional table).
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

SAMPLE_FIELDS = "(key, study_id, image, text, meta)"


@dataclass
class ShardEmbeddings:
    """What `embed_shards` returns: images one row each; reports one row per study."""
    image_emb: torch.Tensor                 # [N_images, D] float32, L2-normalised
    image_keys: List[str]
    image_study_ids: List[str]
    text_emb: Optional[torch.Tensor]        # [N_studies, D] (None when texts were not embedded)
    text_study_ids: List[str]
    texts: List[str]                        # the report of each study, aligned with text_study_ids
    meta: Dict[str, dict] = field(default_factory=dict)   # study_id -> json meta of its first image
    skipped: int = 0                        # samples the shard reader skipped (corrupt, or lost in a damaged tar)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _first_attr(objs, names):
    for o in objs:
        for n in names:
            v = getattr(o, n, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def text_limits(model: torch.nn.Module):
    """(vocab_size, context_length) of the model's text tower, None where it does not say."""
    text = getattr(model, "text", None)
    objs = [model, text, getattr(text, "config", None), getattr(getattr(text, "transformer", None), "config", None)]
    objs = [o for o in objs if o is not None]
    vocab = _first_attr(objs, ["vocab_size"])
    if vocab is None:
        for o in objs:
            emb = getattr(o, "token_embedding", None)
            if emb is None and hasattr(o, "get_input_embeddings"):
                try:
                    emb = o.get_input_embeddings()
                except (NotImplementedError, AttributeError):
                    emb = None
            if isinstance(emb, torch.nn.Embedding):
                vocab = emb.num_embeddings
                break
    ctx = _first_attr(objs, ["context_length", "max_position_embeddings"])
    pos = getattr(model, "positional_embedding", None)
    if ctx is None and isinstance(pos, torch.Tensor) and pos.dim() == 2:
        ctx = pos.shape[0]
    return vocab, ctx


SIMILARITIES = ("clip", "cosine", "dot")


def similarity_of(model) -> str:
    """The similarity the model was trained with (its text tower's config `similarity`; OpenCLIP's
    cosine otherwise): "cosine" (L2-normalised dot), "clip" (`logit_scale.exp() * I @ T^T`, no
    normalisation: the authors' LLM2CLIP4CXR) or "dot"."""
    for obj in (getattr(getattr(model, "text", None), "transformer", None), getattr(model, "text", None)):
        sim = getattr(getattr(obj, "config", None), "similarity", None)
        if sim in SIMILARITIES:
            return sim
    return "cosine"


def logit_scale_of(model) -> float:
    ls = getattr(model, "logit_scale", None)
    return float(ls.detach().float().exp().reshape(-1)[0]) if isinstance(ls, torch.Tensor) else 1.0


def check_tokens(model: torch.nn.Module, tokens: torch.Tensor, tokenizer=None) -> None:
    """Raise ValueError when `tokens` cannot have come from the model's own tokenizer."""
    vocab, ctx = text_limits(model)
    hint = "the tokenizer does not match the model: use open_clip.get_tokenizer(<the same model name>)"
    tok_ctx = getattr(tokenizer, "context_length", None)
    if ctx is not None and isinstance(tok_ctx, int) and tok_ctx > ctx:
        raise ValueError(f"tokenizer context length {tok_ctx} exceeds the model's {ctx}; {hint}")
    if ctx is not None and tokens.dim() == 2 and tokens.shape[1] > ctx:
        raise ValueError(f"token sequences of length {tokens.shape[1]} exceed the model's context length {ctx}; {hint}")
    if vocab is not None and tokens.numel() and int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab}; {hint}")


def model_precision(value: str = "auto", device="cpu") -> str:
    """OpenCLIP's `precision` for encoding. "auto" (the default; `OPEN_CLIP_CXR_PRECISION`
    overrides) becomes bf16 where `open_clip_cxr.precision` measures it faster on this CPU (or
    the GPU supports it), else fp32; OpenCLIP's own values (fp32, bf16, pure_bf16, ...) pass."""
    from open_clip_cxr import precision
    if value in ("auto", None) or os.environ.get(precision.ENV, "").strip():
        choice = precision.choose(value if value in precision.VALUES else "auto", device)
        print(choice.line(), file=sys.stderr)
        return choice.precision
    return value


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 64,
                 device="cpu", progress: bool = False, normalize: bool = True) -> torch.Tensor:
    """Text embeddings [N, D] (float32, CPU; L2-normalised unless `normalize=False`), `batch_size`
    texts at a time, batched by length (the LLM towers drop the padding a whole batch shares), in input order."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode: the report bank is empty (check the shards' split and --limit)")
    if any(not isinstance(t, str) for t in texts):
        raise TypeError("encode_texts takes a list of strings")
    model.eval()
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="reports", unit="batch")
    for s in starts:
        tokens = tokenizer([texts[i] for i in order[s:s + batch_size]])
        check_tokens(model, tokens, tokenizer)   # cheap, and a bad id would index out of range
        out.append(model.encode_text(tokens.to(device), normalize=normalize).float().cpu())
    emb = torch.cat(out)
    return emb.index_copy(0, torch.tensor(order), emb.clone())   # back to input order


@dataclass
class ImageEmbeddings:
    """What `encode_images` returns: one row per image; texts and meta keyed by study."""
    emb: torch.Tensor
    keys: List[str]
    study_ids: List[str]
    texts: Dict[str, str]          # study_id -> report text (first seen)
    meta: Dict[str, dict]          # study_id -> meta (first seen)


@torch.no_grad()
def encode_images(model: torch.nn.Module, source: Iterable, batch_size: int = 64, device="cpu",
                  limit: Optional[int] = None, progress: bool = False,
                  require_study_id: bool = True, normalize: bool = True) -> ImageEmbeddings:
    """Embed every image a `SampleSource` (or any iterable of (key, study_id, image, text, meta)) yields."""
    model.eval()
    dtype = _model_dtype(model)
    embs, keys, studies, texts, metas = [], [], [], {}, {}
    batch: List[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="images", unit="img", total=limit)

    def flush():
        x = torch.stack(batch).to(device=device, dtype=dtype)
        embs.append(model.encode_image(x, normalize=normalize).float().cpu())
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    for n, sample in enumerate(source):
        if limit is not None and n >= limit:
            break
        if not isinstance(sample, (tuple, list)) or len(sample) != 5:
            raise ValueError(f"a sample source must yield {SAMPLE_FIELDS} tuples, got {type(sample).__name__}")
        key, study_id, image, text, meta = sample
        meta = meta or {}
        if require_study_id and "study_id" not in meta:
            raise ValueError(f"sample {key!r} has no study_id in its json metadata: study-level evaluation "
                             "needs shards written by `open-clip-cxr shards` (json with study_id, image_id, sections)")
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"sample {key!r}: image is a {type(image).__name__}, not a tensor; "
                            "pass the model's preprocess transform to the sample source")
        study_id = str(study_id)
        keys.append(str(key))
        studies.append(study_id)
        texts.setdefault(study_id, text)
        metas.setdefault(study_id, meta)
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if bar is not None:
        bar.close()
    if not keys:
        skipped = getattr(getattr(source, "skipped", None), "value", 0)
        urls = getattr(source, "urls", None)
        raise ValueError(f"no samples were read{f' from {urls[:3]}...' if urls else ''}"
                         f"{f' ({skipped} skipped as corrupt or lacking an image/txt member)' if skipped else ''}")
    return ImageEmbeddings(torch.cat(embs), keys, studies, texts, metas)


class _Counted:
    """A sample source that counts what it yields; `skipped` and `urls` are the wrapped reader's."""

    def __init__(self, source):
        self.source, self.read = source, 0
        self.skipped, self.urls = getattr(source, "skipped", None), getattr(source, "urls", None)

    def __iter__(self):
        for sample in self.source:
            self.read += 1
            yield sample


def skipped_samples(reader, read: int, finished: bool) -> int:
    """Samples lost while reading: the shards' manifest count minus what was read, when the reader
    went through all shards and their manifests are known (a damaged tar loses many samples in
    one error); else the reader's count of skip events."""
    events = getattr(getattr(reader, "skipped", None), "value", 0)
    urls = getattr(reader, "urls", None)
    if finished and urls:
        from open_clip_cxr.data.manifest import count_samples
        expected = count_samples(urls)
        if expected is not None:
            return max(expected - read, 0)
    return events


def embed_shards(model: torch.nn.Module, preprocess: Callable, tokenizer: Optional[Callable], urls,
                 batch_size: int = 64, device="cpu", limit: Optional[int] = None, progress: bool = True,
                 splits: Optional[Sequence[str]] = None, source=None, num_workers: int = 0,
                 similarity: str = "cosine") -> ShardEmbeddings:
    """Images and reports of WebDataset shards -> embeddings, study ids and report texts.

    `splits` keeps only samples whose meta "split" is listed (e.g. ["train"] for a report bank).
    `tokenizer=None` embeds images only. `source` overrides the shard reader (tests, other data).
    `similarity` (see `similarity_of`) shapes the embeddings so that a plain dot product of image
    and text rows is that similarity.
    """
    normalize = similarity == "cosine"
    if source is None:
        from open_clip_cxr.data.loader import SampleSource
        source = SampleSource(urls, preprocess=preprocess, num_workers=num_workers)
    reader = source = _Counted(source)  # counts the samples read, before the split filter
    if splits is not None:
        wanted = set(splits)
        source = (s for s in reader if (s[4] or {}).get("split") in wanted)
    try:
        imgs = encode_images(model, source, batch_size, device, limit=limit, progress=progress, normalize=normalize)
    except ValueError as e:
        if splits is not None and str(e).startswith("no samples"):
            raise ValueError(f"{e}; none of the samples read had split in {list(splits)}") from None
        raise
    study_ids = list(imgs.texts)
    texts = [imgs.texts[s] for s in study_ids]
    text_emb = None
    if tokenizer is not None:
        empty = [s for s, t in zip(study_ids, texts) if not (t or "").strip()]
        if empty:
            raise ValueError(f"{len(empty)} studies have an empty report (e.g. {empty[0]!r})")
        text_emb = encode_texts(model, tokenizer, texts, batch_size, device, progress=progress, normalize=normalize)
    if similarity == "clip":
        imgs.emb = imgs.emb * logit_scale_of(model)
    skipped = skipped_samples(reader, reader.read, finished=limit is None or len(imgs.keys) < limit)
    return ShardEmbeddings(imgs.emb, imgs.keys, imgs.study_ids, text_emb, study_ids, texts, imgs.meta, skipped)
