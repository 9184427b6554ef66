"""Tiny models for the conversion / export / Hub tests (random weights, built offline)."""
import torch

import open_clip
import open_clip_cxr
from open_clip_cxr.openclip_hooks import PACKAGE_DIR

BYTE_TOKENIZER = str(PACKAGE_DIR / "text" / "tokenizers" / "byte")
PROBE_IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 2, 0, 0],
                          [1, 50, 51, 2, 0, 0, 0, 0, 0],
                          [1, 60, 61, 62, 63, 64, 65, 66, 2]])


@torch.no_grad()
def randomize(module: torch.nn.Module, names=("lora_B",), seed: int = 0, std: float = 0.05):
    """Give zero-initialised tensors (LoRA B, biases) random values so they matter in comparisons."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if any(n in name for n in names):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_clip(seed: int = 0):
    """`cxr-llm-tiny` with trained-looking LoRA (non-zero B), in eval mode, and its tokenizer."""
    torch.manual_seed(seed)
    model = open_clip_cxr.create_model("cxr-llm-tiny")
    randomize(model, ("lora_B",), seed)
    return model.eval(), open_clip.get_tokenizer("cxr-llm-tiny")


@torch.no_grad()
def encode(model, tokenizer, texts=("small left pleural effusion", "no pneumothorax", ""), image_size=64, seed=0):
    model.eval()
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return model.encode_text(tokenizer(list(texts))), model.encode_image(images)
