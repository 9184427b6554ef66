"""Which one-error copies beat the held-out positive, per model, and which failures models share.

The held-out protocol's error discrimination (`eval.robustness`) passes a report when its held-out
rewrite (`paraphrase_heldout` first) is nearer to it than every one-error copy made from the
held-out error templates. This prints, per model, the reports it fails, by the error type of each
copy that came nearer and by the style of the positive, and then how many failures the `--after`
models share: a failure every recipe shares points at the probe's hardest reports, not at one recipe.

    python bench/bench_discrimination_failures.py --after runs/a --after runs/b [--columns bow] [--limit 200]

Only counts are printed (the Open-I text stays out of logs one might share).
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_text_stage import _cpu_name, column_encode_fn  # noqa: E402
from open_clip_cxr.eval.robustness import HELDOUT_POSITIVE_STYLES, _Embedder, openi_reports, original_text  # noqa: E402
from open_clip_cxr.reports import noise  # noqa: E402


def probe_items(reports, seed=0):
    """[(original, positive Variant, [negative Variant])] for the reports the probe scores."""
    items = []
    for r in reports:
        equiv = [v for v in noise.heldout_variants(r, seed=seed) if v.equivalent]
        negs = [v for v in noise.heldout_negatives(r, seed=seed) if not v.equivalent]
        pos = next((v for s in HELDOUT_POSITIVE_STYLES for v in equiv if v.style == s), None)
        if pos is not None and negs:
            items.append((original_text(r), pos, negs))
    return items


def failures(emb, items):
    """{item index: (positive style, [error types of the copies at least as near as the positive])};
    1 - len(failures) / len(items) is the suite's discrimination accuracy (ties fail, as there)."""
    out = {}
    for i, (orig, pos, negs) in enumerate(items):
        a = emb([orig])[0]
        s_pos = float(emb([pos.text])[0] @ a)
        s_neg = (emb([n.text for n in negs]) @ a).tolist()
        beat = [n.error_type or n.style for n, s in zip(negs, s_neg) if s >= s_pos]
        if beat:
            out[i] = (pos.style, beat)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", action="append", default=[], help="a model folder (repeatable)")
    ap.add_argument("--columns", default="", help="reference columns: bow, minilm, built-in model names")
    ap.add_argument("--limit", type=int, default=None, help="first N validation reports (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    columns = [c for c in args.columns.split(",") if c] + args.after
    if not columns:
        ap.error("name at least one model: --after RUN or --columns bow")
    torch.set_num_threads(args.threads)
    from open_clip_cxr.precision import choose
    choice = choose("auto", "cpu", threads=args.threads)
    items = probe_items([r for r in openi_reports(split="validate", limit=args.limit) if original_text(r)])
    texts = [o for o, _, _ in items] + [t.text for _, p, ns in items for t in [p] + ns]
    print(f"held-out error discrimination, {len(items)} validation reports; CPU: {_cpu_name()}; "
          f"towers in {choice.precision}, {args.threads} thread(s)")
    failed = {}
    for col in columns:
        failed[col] = failures(_Embedder(column_encode_fn(col, 0, 4096, dtype=choice.dtype), texts), items)
        types = Counter(t for _, beat in failed[col].values() for t in beat)
        styles = Counter(style for style, _ in failed[col].values())
        print(f"{col}: accuracy {1 - len(failed[col]) / len(items):.3f}, {len(failed[col])} failed; "
              f"copies nearer than the positive by error type {dict(types.most_common())}; "
              f"failed reports by positive style {dict(styles.most_common())}")
    if len(args.after) > 1:     # the trained models only: a reference column fails most reports
        sets = [set(failed[col]) for col in args.after]
        print(f"failed by every --after model: {len(set.intersection(*sets))}; by any: {len(set.union(*sets))}")


if __name__ == "__main__":
    main()
