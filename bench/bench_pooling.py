"""Latent-attention pooling: our batched, packed pooler against a per-sample loop.

The loop is how the authors' code pools (one sample at a time, latents projected per call).
Target: >= 10x at batch 64, SmolLM2 width (576), 512 latents, 8 heads.

    python bench/bench_pooling.py [--batch 64] [--length 128]
"""
import argparse

import torch

from bench_common import machine, table, timeit
from open_clip_cxr.text.pooling import LatentAttentionPooling


def per_sample_loop(pooler, hidden, mask):
    """One sample at a time, each with its own latent projection (the authors' way)."""
    out = []
    for h, m in zip(hidden, mask):
        out.append(pooler.attend(h[m]).mean(0))
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=576)
    args = ap.parse_args()
    torch.manual_seed(0)
    pooler = LatentAttentionPooling(args.hidden, num_latents=512, heads=8).eval()
    hidden = torch.randn(args.batch, args.length, args.hidden)
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch,))  # reports vary in length
    mask = torch.arange(args.length)[None] < lengths[:, None]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        p, h = pooler.to(dtype), hidden.to(dtype)
        with torch.no_grad():
            batched = timeit(lambda: p(h, mask))
            loop = timeit(lambda: per_sample_loop(p, h, mask), repeat=3)
            diff = (p(h, mask).float() - per_sample_loop(p, h, mask).float()).abs().max().item()
        rows.append([str(dtype).replace("torch.", ""), f"{loop * 1e3:.1f}", f"{batched * 1e3:.1f}",
                     f"{loop / batched:.1f}x", f"{diff:.1e}"])
    print(f"latent attention pooling, batch {args.batch}, length <= {args.length}, hidden {args.hidden}, "
          f"512 latents, 8 heads; {machine()}")
    print(table(rows, ["dtype", "per-sample loop ms", "batched ms", "speed-up", "max |diff|"]))


if __name__ == "__main__":
    main()
