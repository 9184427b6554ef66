"""What bf16 does on this machine, and what `auto` picks: the numbers behind `open_clip_cxr/precision.py`.

    python bench/bench_precision.py                      # probe table + tower forward (~2 min)
    python bench/bench_precision.py --stage1             # + short stage-1 runs per precision (~10 min)
    python bench/bench_precision.py --json runs/bench/precision.json

Prints, with the CPU model, its bf16/AMX flags and the load average (other work on a shared
machine slows every number down; each rate is the best of several timed windows):

1. The probe table: `torch.matmul` 1024^3 and `F.linear` 512x576 @ 576x1536 (SmolLM2-135M's
   MLP width) in fp32, bf16 (both operands bf16), bf16 weights under autocast (what a run with
   `frozen_low_precision` does), and fp32 weights under autocast (re-cast every call), at 1
   thread and at every usable core; then what `precision.choose("auto")` and
   `choose_threads("auto")` pick.
2. Text encoding, texts/s: the `cxr-llm-small-l4` tower (`tower_encode_fn`: length-sorted
   chunks, padding trimmed) against a plain transformers `AutoModel` forward of the same 4
   layers and the same chunks in the same dtype, and stage 1's text-state caching (the same 4
   layers, no pooler); model GFLOP/s count the 4 layers' matmuls per real token only (the
   tower's latent-attention pooler adds ~17 % more FLOPs, uncounted), against the measured
   F.linear peak of that dtype and the fp32 one (the issue's target: >= 60 %).
3. (--stage1) Stage 1 on Open-I (`text-cxr-llm-small-cpu.yaml`, a few MNTP and contrastive
   steps, a small text cache) per precision: ms/step per stage and caching texts/s.

Open-I reports are read at run time from the torchxrayvision wheel (nothing is stored).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_common import table, timeit_interleaved  # noqa: E402
from open_clip_cxr import precision  # noqa: E402


def cpu_info() -> str:
    name, flags = "?", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("Flags"):
                fl = line.split(":", 1)[1].split()
                flags = " ".join(f for f in fl if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    except OSError:
        pass
    return (f"{name} [{flags or 'no avx512/amx flags'}], {precision.usable_cores()} usable cores, "
            f"torch {torch.__version__}")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_rate(dtype, threads: int, n: int = 1024, seconds: float = 0.15, repeats: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a @ b
        best = 0.0
        for _ in range(repeats):
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                a @ b
                k += 1
            best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old)
    return best


LINEAR_MODES = [("fp32", "fp32"), ("bf16_pure", "bf16 (both bf16)"),
                ("bf16", "bf16 weights + autocast (the run's path)"),
                ("autocast", "fp32 weights + autocast (re-cast per call)")]


def probe_table(cores: int) -> dict:
    threads = sorted({1, cores})
    rows, out = [], {}
    mm = {t: {"fp32": matmul_rate(torch.float32, t), "bf16": matmul_rate(torch.bfloat16, t)} for t in threads}
    lin = {t: precision.linear_rates([m for m, _ in LINEAR_MODES], precision.MODEL_SHAPE, "cpu", t,
                                     seconds=0.15, repeats=5) for t in threads}   # modes in turn, best window
    for key, label in (("fp32", "fp32"), ("bf16", "bf16 (both bf16)")):
        rates = {t: mm[t][key] / 1e9 for t in threads}
        out[f"matmul 1024^3 | {label}"] = rates
        rows.append(["matmul 1024^3", label] + [f"{rates[t]:.1f}" for t in threads])
    for mode, label in LINEAR_MODES:
        rates = {t: lin[t][mode] / 1e9 for t in threads}
        out[f"F.linear 512x576 @ 576x1536 | {label}"] = rates
        rows.append(["F.linear 512x576 @ 576x1536", label] + [f"{rates[t]:.1f}" for t in threads])
    print(table(rows, ["op", "dtype"] + [f"GFLOP/s {t} thr" for t in threads]))
    return out


def choice_lines(cores: int) -> dict:
    choice = precision.choose("auto", "cpu", threads=1)
    n, why = precision.choose_threads("auto", choice.precision)
    print(f"auto at 1 thread: {choice.line()}")
    print(f"auto threads: {n} ({why})")
    return {"choice_1_thread": choice.record(), "threads": n, "threads_reason": why}


# ---------------------------------------------------------------- text encoding

def report_texts(n: int):
    from open_clip_cxr.eval.robustness import openi_reports
    from open_clip_cxr.reports.variants import base_text
    return [base_text(r) for r in openi_reports("validate", limit=n)]


def encode_rates(texts, threads: int, max_tokens: int = 2048, repeats: int = 3) -> dict:
    import open_clip
    from transformers import AutoModel
    import open_clip_cxr  # noqa: F401
    from open_clip_cxr_train.speedups import FrozenCast
    from open_clip_cxr_train.supcon import TextStateCache, length_chunks
    from open_clip_cxr_train.text_stage import tower_encode_fn
    torch.set_num_threads(threads)
    model = open_clip.create_model("cxr-llm-small-l4", pretrained_image=False).eval()
    tower = model.text.transformer.merge_lora().requires_grad_(False)   # FrozenCast casts frozen weights
    tok = open_clip.get_tokenizer("cxr-llm-small-l4")
    llm = tower.base_llm()
    cfg = llm.config
    plain = AutoModel.from_config(cfg).eval().requires_grad_(False)   # transformers' own (causal) Llama, same 4 layers
    missing = plain.load_state_dict(llm.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    ids = tok(texts, context_length=128)
    mask = ids != tower.config.pad_token_id
    lengths = mask.sum(1).tolist()
    tokens = sum(lengths)
    per_token = 2.0 * sum(p.numel() for p in llm.layers.parameters() if p.dim() > 1)
    chunks = length_chunks(lengths, max_tokens)
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    out = {"texts": len(texts), "tokens": tokens, "padded_tokens_in_chunks": padded, "threads": threads}
    rows = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        enc = tower_encode_fn(tower, tok, max_length=128, max_tokens=max_tokens, dtype=dtype)

        @torch.no_grad()
        def run_plain():
            for c in chunks:
                n = max(lengths[i] for i in c)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    plain(input_ids=ids[c, :n], attention_mask=mask[c, :n].long())

        def run_cache():
            TextStateCache(tower, tok, texts, 0, 128, max_tokens, dtype=dtype, log_every=1e9)

        casts = [FrozenCast(tower, dtype), FrozenCast(plain_wrap(plain), dtype)]
        try:   # round-robin, so a change of load hits the three alike; median of `repeats`
            t = timeit_interleaved({"tower": lambda: enc(texts), "cache": run_cache, "plain": run_plain},
                                   repeat=repeats, warmup=0)
            t_tower, t_cache, t_plain = t["tower"], t["cache"], t["plain"]
        finally:
            for c in casts:
                c.restore()
        peak = precision.peak_flops("cpu", dtype or torch.float32, threads=threads)
        peak32 = precision.peak_flops("cpu", torch.float32, threads=threads)
        for label, t in (("cxr-llm-small-l4 tower (+ pooler)", t_tower),
                         ("stage-1 caching (TextStateCache, 4 layers)", t_cache),
                         ("AutoModel (LlamaModel, 4 layers)", t_plain)):
            gf = per_token * tokens / t / 1e9
            rows.append([label, name, f"{len(texts) / t:.1f}", f"{gf:.1f}", f"{100 * gf * 1e9 / peak:.0f}%",
                         f"{100 * gf * 1e9 / peak32:.0f}%"])
            out[f"{label} | {name}"] = {"texts_per_s": len(texts) / t, "gflops": gf, "peak_gflops": peak / 1e9,
                                        "fp32_peak_gflops": peak32 / 1e9}
    print(f"{len(texts)} Open-I validation reports, {tokens} tokens ({padded} in length-sorted chunks of "
          f"<= {max_tokens} padded tokens: {100 * (padded / tokens - 1):.1f}% padding), {threads} thread(s)")
    print(table(rows, ["encoder", "dtype", "texts/s", "GFLOP/s", "of its dtype's F.linear peak", "of fp32 peak"]))
    return out


class plain_wrap:
    """FrozenCast reads `.llm`: let it cast a plain transformers model too."""

    def __init__(self, model):
        self.llm = model


# ---------------------------------------------------------------- stage 1

def stage1_runs(threads: int, mntp_steps: int, supcon_steps: int, cache_reports: int) -> dict:
    out = {}
    rows = []
    for forced in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, precision.ENV: forced, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "open_clip_cxr_train.text_stage", "--out", f"{tmp}/run",
                   "--set", f"train.num_threads={threads}", "--set", f"mntp.steps={mntp_steps}",
                   "--set", f"supcon.steps={supcon_steps}", "--set", f"supcon.cache_reports={cache_reports}",
                   "--set", "supcon.warmup_steps=1", "--set", "eval.enabled=false", "--set", "train.log_with=none",
                   "--set", "train.log_every=1", "--set", "train.checkpoint_every=0"]
            t0 = time.time()
            run = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if run.returncode:
                raise SystemExit(f"stage-1 run ({forced}) failed:\n{run.stderr[-3000:]}")
            wall = time.time() - t0
            logged = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
            summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
        res = {"wall_s": round(wall, 1), "cache": summary.get("cache")}
        for stage in ("mntp", "supcon"):
            ms = sorted(r["ms_per_step"] for r in logged if r.get("stage") == stage and "ms_per_step" in r)
            ms = ms[:-1] if len(ms) > 1 else ms      # the slowest (the first step's warm-up) left out
            mfu = [r["mfu"] for r in logged if r.get("stage") == stage and "mfu" in r]
            res[stage] = {"ms_per_step_median": ms[len(ms) // 2] if ms else None, "mfu_max": max(mfu) if mfu else None}
        out[forced] = res
        c = res["cache"] or {}
        rows.append([forced, f"{res['mntp']['ms_per_step_median'] or 0:.0f}",
                     f"{res['supcon']['ms_per_step_median'] or 0:.0f}",
                     f"{c.get('texts_per_s', 0):.1f}", f"{100 * c.get('of_peak', 0):.0f}%",
                     f"{max(res['mntp']['mfu_max'] or 0, res['supcon']['mfu_max'] or 0):.1f}%", f"{wall:.0f}"])
    print(f"stage 1, cxr-llm-small-l4, {mntp_steps} MNTP + {supcon_steps} contrastive steps, "
          f"{cache_reports} reports cached, {threads} thread(s)")
    print(table(rows, ["precision", "MNTP ms/step", "supcon ms/step", "caching texts/s", "of linear peak",
                       "max logged MFU", "wall s"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=256, help="Open-I validation reports to encode")
    p.add_argument("--threads", type=int, default=1, help="threads for the encoding and stage-1 runs")
    p.add_argument("--stage1", action="store_true", help="also time short stage-1 runs per precision")
    p.add_argument("--mntp-steps", type=int, default=4)
    p.add_argument("--supcon-steps", type=int, default=6)
    p.add_argument("--cache-reports", type=int, default=48)
    p.add_argument("--no-encode", action="store_true", help="skip the tower forward")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cores = precision.usable_cores()
    res = {"cpu": cpu_info(), "load_before": load()}
    print(f"CPU: {res['cpu']}\n{res['load_before']} (other work on the machine lowers every rate)\n")
    res["probe"] = probe_table(cores)
    res.update(choice_lines(cores))
    if not a.no_encode:
        print()
        res["encode"] = encode_rates(report_texts(a.texts), a.threads)
    if a.stage1:
        print()
        res["stage1"] = stage1_runs(a.threads, a.mntp_steps, a.supcon_steps, a.cache_reports)
    res["load_after"] = load()
    print(f"\n{res['load_after']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
