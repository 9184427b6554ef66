"""Fixed probe embeddings of a CLIP model: the round-trip check shared by `export` (the folder
reproduces the source model) and `push` (the folder loads and embeds before upload).

It lives in the library so that `conversion/` and `hub_cards/` both import it downwards
instead of importing each other.
"""
from typing import Dict, Sequence

# Generic finding phrases (no patient text) and an empty string, which must embed too.
PROBE_TEXTS = ("no acute cardiopulmonary abnormality", "small left pleural effusion", "cardiomegaly", "")


def probe_images(model, n: int = 2, seed: int = 0):
    """`n` seeded random images at the model's input size."""
    import torch
    size = (getattr(model.visual, "preprocess_cfg", None) or {}).get("size") or model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def embeddings(model, tokenizer, texts: Sequence[str] = PROBE_TEXTS, images=None) -> Dict:
    """Unnormalised text / image embeddings of fixed probes (and the tokens, to compare tokenizers)."""
    import torch
    model.eval()
    tokens = tokenizer(list(texts))
    images = probe_images(model) if images is None else images
    with torch.no_grad():
        return {"tokens": tokens, "text": model.encode_text(tokens).float(), "image": model.encode_image(images).float(),
                "images": images, "logit_scale": model.logit_scale.detach().float()}
