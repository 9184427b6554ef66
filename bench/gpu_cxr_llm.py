"""Train-step throughput of the paper's CLIP stage on one GPU: `cxr-llm`, random weights.

    python bench/gpu_cxr_llm.py                 # H100: batch 64, 336 px, 256 report tokens
    python bench/gpu_cxr_llm.py --tiny          # cxr-llm-tiny on the CPU: checks the script works
    python bench/gpu_cxr_llm.py --profile 3     # and where the time goes, op by op

Self-contained: synthetic images (336 px) and synthetic token ids, no shards, no tokenizer,
no downloads (`pretrained_text=False, pretrained_image=False`). The step is the one
`training/clip_stage.py` trains: text base frozen + LoRA (r16, q/k/v/o), text norm + proj and
the whole EVA02-L trained, OpenCLIP's ClipLoss, AdamW, bf16 autocast over fp32 weights (what
accelerate's `mixed_precision=bf16` does). A few warm-up steps, then ~20 timed ones. On OOM
it retries with gradient checkpointing, then with half the batch.

MFU, two ways (both printed):
  measured: FLOPs of one forward+backward counted by torch's FlopCounterMode (matmuls, convs,
            attention; without gradient checkpointing, so recomputation is not counted: model
            FLOPs, not hardware FLOPs), at a batch of 2, scaled to the batch;
  6N:       vision 6 * N_vision * patches per image; text (4 N_frozen + 6 N_lora) per token,
            the frozen base paying forward + activation gradients but no weight gradients.
Peak: H100/H200 dense bf16 989 TFLOP/s (`open_clip_cxr_train.common.peak_flops`).
Writes $OUT/gpu_cxr_llm[_compiled][_frozenbf16]_b<batch>.json when OUT is set.
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import open_clip_cxr  # noqa: E402,F401  (registers the models)
from open_clip_cxr_train.clip_stage import (ContrastiveModel, build_loss, compute_loss, configure_trainable,  # noqa: E402
                                 param_groups, transformer_blocks, with_defaults)
from open_clip_cxr_train.speedups import FrozenCast, compile_blocks  # noqa: E402
from open_clip_cxr_train.common import peak_flops  # noqa: E402


class _Acc:   # what build_loss needs of an Accelerator, for one process
    num_processes, process_index = 1, 0


def build(name, device, grad_ckpt):
    t = time.perf_counter()
    with torch.device(device):   # initialise the random weights on the GPU: much faster than on the CPU
        model = open_clip_cxr.create_model(name, pretrained_text=False, pretrained_image=False, device=device)
    recipe = with_defaults({"model": name, "train": {"grad_checkpointing": grad_ckpt}})
    configure_trainable(model, recipe)
    model.to(device).train()
    print(f"built {name} in {time.perf_counter() - t:.1f}s", flush=True)
    return model, recipe


def batch(model, n, text_len, device, gen):
    size = model.visual.image_size[0]
    images = torch.randn(n, 3, size, size, device=device, generator=gen)
    vocab = min(model.text.config.vocab_size, 128000) - 8   # stay below special ids (pad, separator)
    tokens = torch.randint(8, vocab, (n, text_len), device=device, generator=gen)
    return images, tokens


def step_fn(net, loss_fn, opt, dtype, device):
    def step(images, tokens):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = compute_loss(loss_fn, net(images, tokens))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def measured_flops(net, loss_fn, model, text_len, device, dtype, gen, n=2):
    from torch.utils.flop_counter import FlopCounterMode
    images, tokens = batch(model, n, text_len, device, gen)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = compute_loss(loss_fn, net(images, tokens))
        loss.backward()
    for p in net.parameters():
        p.grad = None
    return fc.get_total_flops() / n


def estimate_flops(model, text_len):
    visual = model.visual
    n_vis = sum(p.numel() for p in visual.parameters() if p.ndim >= 2)
    patch = getattr(getattr(visual.trunk, "patch_embed", None), "patch_size", None)
    size = visual.image_size[0]
    tokens = (size // patch[0]) ** 2 + 1 if patch else 1   # convnets (tiny): counted as one "token"
    llm = model.text.transformer.llm
    mats = [p for n, p in llm.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    n_all, n_train = sum(p.numel() for p in mats), sum(p.numel() for p in mats if p.requires_grad)
    return 6 * n_vis * tokens + (4 * (n_all - n_train) + 6 * n_train) * text_len


def profile_steps(step, images, tokens, device, n_steps: int, rows: int = 30):
    """Where a step's time goes: torch.profiler over `n_steps` steps, the ops with the most self
    time (device time on a GPU), printed and written to $OUT/gpu_cxr_llm_profile.txt."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n_steps):
            step(images, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    print(table, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_cxr_llm_profile.txt"), "w") as f:
            f.write(table)


def run(args, device, dtype, bsz, grad_ckpt):
    name = "cxr-llm-tiny" if args.tiny else "cxr-llm"
    model, recipe = build(name, device, grad_ckpt)
    if args.frozen_bf16:   # what `train.frozen_low_precision` does in training (the fp32 masters wait on the CPU)
        FrozenCast(model.text.transformer, dtype, masters_device="cpu")
    net, loss_fn = ContrastiveModel(model), build_loss(recipe, _Acc())
    opt = torch.optim.AdamW(param_groups(model, recipe), betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    fl_measured = None
    if args.compile:  # count FLOPs on the eager model, then compile
        fl_measured = measured_flops(net, loss_fn, model, args.text_len, device, dtype, gen)
        t = time.perf_counter()
        print(f"compiling {compile_blocks(transformer_blocks(model), True)} blocks", flush=True)
    step = step_fn(net, loss_fn, opt, dtype, device)
    images, tokens = batch(model, bsz, args.text_len, device, gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(images, tokens)
    sync()
    if args.compile:
        print(f"compiled and warmed up in {time.perf_counter() - t:.0f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, t_start = [], time.perf_counter()
    for i in range(args.steps):
        t = time.perf_counter()
        loss = step(images, tokens)
        sync()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_start > args.budget_s:
            print(f"time budget reached after {i + 1} steps", flush=True)
            break
    ms = 1000 * sorted(times)[len(times) // 2]
    if args.profile:
        profile_steps(step, images, tokens, device, args.profile)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    if grad_ckpt:   # count model FLOPs without the recomputation
        model.visual.set_grad_checkpointing(False)
        model.text.transformer.gradient_checkpointing_disable()
    if fl_measured is None:
        fl_measured = measured_flops(net, loss_fn, model, args.text_len, device, dtype, gen)
    fl_6n = estimate_flops(model, args.text_len)
    peak = peak_flops(device, dtype)
    ips = bsz / (ms / 1000)
    from open_clip_cxr.text import count_parameters
    result = {
        "model": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "batch": bsz, "image_size": model.visual.image_size[0],
        "text_len": args.text_len, "grad_checkpointing": grad_ckpt, "steps_timed": len(times),
        "ms_per_step_median": ms, "ms_per_step_mean": 1000 * sum(times) / len(times),
        "images_per_s": ips, "tokens_per_s": ips * args.text_len, "final_loss": loss.item(),
        "peak_mem_gib": mem, "gflops_per_sample_measured": fl_measured / 1e9, "gflops_per_sample_6n": fl_6n / 1e9,
        "mfu_measured_pct": 100 * fl_measured * ips / peak, "mfu_6n_pct": 100 * fl_6n * ips / peak,
        "peak_tflops": peak / 1e12, "params": count_parameters(model),
        "torch": torch.__version__, "compiled": args.compile, "frozen_bf16": args.frozen_bf16,
    }
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="cxr-llm-tiny (CPU check of the script)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (GPU) / 8 (--tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--text-len", type=int, default=256, help="report tokens per sample (no padding)")
    p.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto",
                   help="auto: off, turned on at the first OOM")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (regional)")
    p.add_argument("--frozen-bf16", action="store_true", help="store the frozen text base in bf16")
    p.add_argument("--budget-s", type=float, default=150, help="stop the timed steps after this many seconds")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N more steps: the ops that take the time (not counted in the timing)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bsz = args.batch or (8 if args.tiny else 64)
    ckpt = args.grad_ckpt == "on"
    while True:
        failure = None
        try:
            result = run(args, device, dtype, bsz, ckpt)
            break
        except torch.OutOfMemoryError:
            failure = "OOM"
        except RuntimeError as e:   # cuDNN reports exhausted workspace memory as an internal error
            if "CUDNN_STATUS" not in str(e):
                raise
            failure = "cuDNN error"
            torch.backends.cuda.enable_cudnn_sdp(False)
        gc.collect()                # the failed attempt's model is only freed once its frames are gone
        torch.cuda.empty_cache()
        if failure == "OOM" and not ckpt and args.grad_ckpt == "auto":
            ckpt = True
        elif failure == "OOM" and bsz > 1:
            bsz //= 2
        elif failure == "OOM":
            raise SystemExit("out of memory at batch 1")
        print(f"{failure}: retrying with batch {bsz}, gradient checkpointing {ckpt}", flush=True)
    for k, v in result.items():
        print(f"{k:28s} {v}")
    print(f"\n{result['model']} on {result['device']}: {result['images_per_s']:.1f} images/s, "
          f"{result['ms_per_step_median']:.0f} ms/step at batch {result['batch']}, "
          f"MFU {result['mfu_measured_pct']:.1f}% (measured FLOPs) / {result['mfu_6n_pct']:.1f}% (6N)", flush=True)
    if os.environ.get("OUT"):
        tag = ("_compiled" if args.compile else "") + ("_frozenbf16" if args.frozen_bf16 else "")
        with open(os.path.join(os.environ["OUT"], f"gpu_cxr_llm{tag}_b{result['batch']}.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
