"""Where the time of one cached contrastive step goes: the adapter recipes' step on `cxr-llm-small-l2`.

The cached step of `text-cxr-llm-small-cpu-rewrites-lora*.yaml`: the top decoder layer with LoRA
(r 16, q/k/v/o, dropout as given) and the latent-attention pooler, forward and backward, over
a step's texts (default 192: 48 anchors, their positives and two one-error copies each) of
report-like lengths, through stage 1's `CachedEmbedder` (length-sorted chunks of at most 2048 padded
tokens). Random states stand in for the cached ones (the time does not depend on their values).

    python bench/bench_stage1_step.py                         # ms per step, bf16 where auto picks it
    python bench/bench_stage1_step.py --lora-dropout 0        # what the adapter's dropout costs
    python bench/bench_stage1_step.py --profile               # + torch.profiler's top operators

Prints the CPU, the precision, seconds per step, the FLOPs the step lines count
(`training/stage1_model.py: contrastive_flops_per_token`) and their share of the measured
`F.linear` peak.
"""
import argparse
import random
import time
from types import SimpleNamespace

import torch

from bench_common import machine
from open_clip_cxr.precision import choose, peak_flops
from open_clip_cxr_train.speedups import FrozenCast
from open_clip_cxr_train.stage1_model import build_model, contrastive_flops_per_token, set_lora
from open_clip_cxr_train.text_embed import CachedEmbedder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=192)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = choose("auto").dtype
    model, *_ = build_model("cxr-llm-small-l2")
    tower = model.text.transformer
    tower.requires_grad_(False)
    set_lora(tower, {"r": 16, "alpha": 32, "dropout": args.lora_dropout, "layers": 1,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    for m in (tower.pooler, tower.norm):
        m.requires_grad_(True)
    FrozenCast(tower, dtype)
    rng = random.Random(0)   # Open-I reports: median about 53 tokens, long tail
    lengths = [min(128, max(8, int(rng.lognormvariate(3.9, 0.5)))) for _ in range(args.texts)]
    # the cache the step reads, filled with random states and ordinary token ids (no padding, no
    # instruction separator), so the step below is stage 1's own `CachedEmbedder`
    cache = SimpleNamespace(k=1, states=[torch.randn(n, tower.config.hidden_size).to(torch.bfloat16) for n in lengths],
                            ids=[torch.randint(100, tower.config.vocab_size, (n,)) for n in lengths])
    embed = CachedEmbedder(tower, cache, max_tokens=2048).train()
    rows = torch.arange(len(lengths))

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pooled = embed(rows)
        pooled.float().pow(2).sum().backward()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    secs = (time.perf_counter() - t0) / args.steps
    flops = contrastive_flops_per_token(tower, 1, 1) * sum(lengths)
    peak = peak_flops("cpu", dtype or torch.float32)
    print(f"{machine()}; precision {'fp32' if dtype is None else 'bf16'}, LoRA dropout {args.lora_dropout}")
    print(f"{args.texts} texts, {sum(lengths)} tokens: {secs:.3f} s per step, {flops / secs / 1e9:.1f} GFLOP/s counted, "
          f"{flops / secs / peak:.1%} of the measured F.linear peak ({peak / 1e9:.0f} GFLOP/s)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
