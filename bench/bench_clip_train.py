"""CPU training throughput of the CLIP stage on `cxr-llm-small`: LoRA text tower vs full
fine-tuning vs cached text, fp32 vs bf16 autocast, and the peak memory of each.

    python bench/bench_clip_train.py                       # all 6 runs, a few minutes
    python bench/bench_clip_train.py --modes lora --dtypes bf16 --steps 8
    python bench/bench_clip_train.py --modes lora --dtypes bf16 bf16-frozen   # train.frozen_low_precision
    python bench/bench_clip_train.py --modes lora --dtypes bf16-frozen --compile   # train.compile (inductor)

`cxr-llm-small` = SmolLM2-135M (real weights, converted from the GGUF into a cache on the
first build, ~30 s) read bidirectionally + EfficientNet-Lite0 (ImageNet weights) at 224 px.
Each (mode, dtype) runs in a fresh subprocess so its `ru_maxrss` is its own peak. The step
is `training/clip_stage.py`'s (ContrastiveModel, ClipLoss, AdamW over its param groups) on one
in-memory batch of synthetic 224 px images and short hand-written reports; data loading is
not timed (see bench_loader.py for that).

Modes:
  lora    text base frozen, LoRA r16 q/k/v/o + norm + proj trained; vision fully trained
  full    the whole text tower trained (LoRA merged away first); vision fully trained
  cached  text features precomputed once (pooled, before tower.norm); vision + norm + proj
          trained, no LLM in the step (the one-off encoding time is reported separately)
Dtypes: fp32; bf16 (autocast over fp32 weights); bf16-frozen (the same, with the frozen text
base stored in bf16: `train.frozen_low_precision`). `--compile`: each transformer block
compiled (`train.compile`); its one-off compile time is the first steps', reported apart.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REPORTS = ["Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax.",
           "Patchy opacity in the right lower lobe, concerning for pneumonia. No effusion.",
           "Moderate left pleural effusion with adjacent atelectasis. Mild cardiomegaly.",
           "Diffuse interstitial markings, suggestive of mild pulmonary edema.",
           "Endotracheal tube 4 cm above the carina. Lungs are clear.",
           "Small right apical pneumothorax. No mediastinal shift.",
           "Left upper lobe nodule measuring 9 mm. Recommend CT follow-up.",
           "Bibasilar atelectasis. Stable cardiomediastinal silhouette."]


def child(mode: str, dtype: str, batch: int, steps: int, warmup: int, threads: int, compile_: bool) -> dict:
    import torch
    torch.set_num_threads(threads)
    import open_clip_cxr  # noqa: F401
    from open_clip_cxr_train import cached_text
    from open_clip_cxr_train.clip_stage import (ContrastiveModel, build_loss, build_model, compute_loss, param_groups,
                                     transformer_blocks, with_defaults)
    from open_clip_cxr_train.speedups import FrozenCast, compile_blocks
    from open_clip_cxr.text import count_parameters
    from open_clip_cxr_train.common import peak_flops

    class Acc:
        num_processes, process_index = 1, 0

    t = time.perf_counter()
    recipe = with_defaults({"model": "cxr-llm-small", "text": {"cached": mode == "cached"}})
    model, _, _, tokenizer, _ = build_model(recipe)
    tower = model.text.transformer
    if mode == "full":
        tower.merge_lora()
        tower.requires_grad_(True)
    build_s = time.perf_counter() - t
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224)
    texts = [REPORTS[i % len(REPORTS)] for i in range(batch)]
    tokens = tokenizer(texts)
    n_tokens = int((tokens != model.text.config.pad_token_id).sum())
    amp = dtype in ("bf16", "bf16-frozen")
    if dtype == "bf16-frozen":
        FrozenCast(tower, torch.bfloat16)
    if compile_:
        compile_blocks(transformer_blocks(model, cached=mode == "cached"), True)
    encode_s = None
    if mode == "cached":   # the one-off LLM pass that the cached mode saves in every step
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            text_in = cached_text.pooled_before_norm(model, tokens)
        encode_s = time.perf_counter() - t
    else:
        text_in = tokens
    model.train()
    net, loss_fn = ContrastiveModel(model, cached=mode == "cached"), build_loss(recipe, Acc())
    opt = torch.optim.AdamW(param_groups(model, recipe), lr=1e-5)
    times, t_first, warmup_s = [], time.perf_counter(), 0.0
    for i in range(warmup + steps):
        if i == warmup:
            warmup_s = time.perf_counter() - t_first
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = compute_loss(loss_fn, net(images, text_in))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    counts = count_parameters(model)
    return {"mode": mode, "dtype": dtype, "compiled": compile_, "warmup_s": warmup_s,
            "batch": batch, "tokens_per_sample": n_tokens / batch,
            "build_s": build_s, "ms_per_step": 1000 * step, "samples_per_s": batch / step,
            "tokens_per_s": 0 if mode == "cached" else n_tokens / step, "cache_encode_s": encode_s,
            "trainable_M": counts["trainable"] / 1e6, "total_M": counts["total"] / 1e6,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": loss.item(),
            "cpu_peak_gflops": peak_flops("cpu", torch.bfloat16 if amp else torch.float32) / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["lora", "full", "cached"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "bf16-frozen"])
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 on a shared CPU (2 threads on 2 busy cores ran 25x slower here)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        row = child(*args.child, args.batch, args.steps, args.warmup, args.threads, args.compile)
        print("RESULT " + json.dumps(row), flush=True)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", mode, dtype, "--batch", str(args.batch),
                                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                                   "--threads", str(args.threads)] + (["--compile"] if args.compile else []),
                                  env=env, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{mode}/{dtype} failed")
            rows.append(json.loads(line[7:]))
            print(f"{mode}/{dtype}: done in {time.perf_counter() - t:.0f}s", flush=True)
    head = (f"| mode | dtype | samples/s | ms/step | tokens/s | trainable M / total M | peak RSS MiB | "
            f"one-off text encode s | warm-up s |")
    print(f"\ncxr-llm-small, batch {args.batch}, 224 px, ~{rows[0]['tokens_per_sample']:.0f} tokens/report, "
          f"{args.threads} threads, median of {args.steps} steps\n")
    print(head)
    print("|" + "---|" * 9)
    for r in rows:
        enc = f"{r['cache_encode_s']:.2f} ({args.batch} reports)" if r["cache_encode_s"] is not None else "-"
        dtype = r["dtype"] + (", compiled" if r["compiled"] else "")
        print(f"| {r['mode']} | {dtype} | {r['samples_per_s']:.2f} | {r['ms_per_step']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['trainable_M']:.1f} / {r['total_M']:.1f} | {r['peak_rss_mib']:.0f} | {enc} | "
              f"{r['warmup_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
