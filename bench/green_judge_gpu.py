"""GREEN of a report-gen output with GREEN's 7B judge on a GPU (prepared command; needs the weights).

    python bench/green_judge_gpu.py --generated runs/rg/generated.jsonl \\
        --judge StanfordAIMI/GREEN-radllama2-7b --out runs/rg/green

reads the (generated, reference) pairs that `open-clip-cxr eval --task report-gen` wrote,
runs the judge as GREEN's code does (its prompt and chat text, greedy, max_length 2048, batches
of 8 in input order, float16 unless --dtype says otherwise), and writes OUT/green.json (GREEN's
summary numbers, per-report scores and counts) and OUT/green_cache.jsonl (resumable: a rerun
generates only what is missing). Prints the GPU, the seconds per report and the summary.
`--judge` is a hub id (in the local cache; set HF_HUB_OFFLINE=1 to forbid downloads) or a folder.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generated", required=True, help="generated.jsonl from eval --task report-gen")
    ap.add_argument("--judge", default="StanfordAIMI/GREEN-radllama2-7b", help="judge model id or folder")
    ap.add_argument("--out", required=True, help="folder for green.json and the judge cache")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                    help="judge dtype (GREEN's own: float16)")
    ap.add_argument("--batch-size", type=int, default=8, help="GREEN's own: 8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=None, help="first N reports only")
    args = ap.parse_args(argv)
    if not os.path.exists(args.generated):
        print(f"--generated {args.generated}: no such file; run eval --task report-gen first", file=sys.stderr)
        return 2
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; pass --device cpu to run the 7B judge on CPU (very slow)", file=sys.stderr)
        return 2
    from open_clip_cxr.eval.green import GreenJudge
    with open(args.generated, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:args.limit] if args.limit else rows
    refs, cands = [r["reference"] for r in rows], [r["generated"] for r in rows]
    os.makedirs(args.out, exist_ok=True)
    try:
        judge = GreenJudge.from_pretrained(args.judge, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                           cache_path=os.path.join(args.out, "green_cache.jsonl"), progress=True)
    except OSError as e:
        print(f"cannot load the judge {args.judge!r} ({str(e).splitlines()[0]}); download it first "
              f"(huggingface-cli download {args.judge}) or pass its folder", file=sys.stderr)
        return 2
    t = time.time()
    res = judge(refs, cands)
    sec = time.time() - t
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    res["run"] = {"judge": args.judge, "dtype": args.dtype, "batch_size": args.batch_size, "device": device,
                  "seconds": round(sec, 1), "reports": len(rows), "generated": os.path.abspath(args.generated)}
    with open(os.path.join(args.out, "green.json"), "w") as f:
        json.dump(res, f, indent=2)
    s = res["summary"]
    print(f"GREEN {s['green']:.4f} (std {s['green_std']:.4f}) over {s['n']} reports; {s['n_unparsed']} outputs "
          f"without GREEN's sections (scored 0); {sec / max(1, len(rows)):.2f} s/report on {device}, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
