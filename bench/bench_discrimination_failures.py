"""Which one-error copies beat the held-out positive, per model, and which failures models share.

The held-out protocol's error discrimination (`eval.robustness`) passes a report when its held-out
rewrite (`paraphrase_heldout` first) is nearer to it than every one-error copy made from the
held-out error templates. This prints, per model, the reports it fails, by the error type of each
copy that came nearer and by the style of the positive, and then how many failures the `--after`
models share: a failure every recipe shares points at the probe's hardest reports, not at one recipe.
`--pair BASE,CHANGE` (repeatable, e.g. one pair per seed) pairs two models report by report: the
reports the change fixes and breaks (all, then per error type), pooled over the pairs with an exact
two-sided sign test (McNemar's): is a change of a few reports more than the seed-to-seed shuffle
of which reports fail?

    python bench/bench_discrimination_failures.py --after runs/a --after runs/b [--columns bow] [--limit 200]
    python bench/bench_discrimination_failures.py --pair runs/base_s0,runs/change_s0 --pair runs/base_s1,runs/change_s1
    python bench/bench_discrimination_failures.py --after runs/a --columns bow --gallery-style numbered_list

`--gallery-style STYLE` (repeatable) looks at the error-copy gallery of the suite instead (that
style's rewrite as the query, every original and every one-error copy in the gallery): per model,
how many queries had their original outranked, and by what: one of the report's own one-error
copies (by error type), another report or another report's one-error copy (identical originals
count as one, as in the suite).

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
from open_clip_cxr.eval.robustness import (HELDOUT_POSITIVE_STYLES, _Embedder, discrimination_scores,  # noqa: E402
                                           openi_reports, original_text)
from open_clip_cxr.eval.paired import sign_test_p  # noqa: E402
from open_clip_cxr.reports import noise  # noqa: E402


def probe_inputs(reports, seed=0):
    """(originals, equivalent rewrites, one-error copies) per report, as the held-out suite makes them."""
    originals = [original_text(r) for r in reports]
    equiv = [[v for v in noise.heldout_variants(r, seed=seed) if v.equivalent] for r in reports]
    negs = [[v for v in noise.heldout_negatives(r, seed=seed) if not v.equivalent] for r in reports]
    return originals, equiv, negs


def failures(emb, inputs):
    """({report index: (positive style, [error types of the copies at least as near as the positive])},
    number of reports scored), over the reports the suite's probe scores
    (`eval.robustness.discrimination_scores`); ties fail, as there."""
    scored = list(discrimination_scores(emb, *inputs, HELDOUT_POSITIVE_STYLES))
    beaten = {i: (pos.style, [n.error_type or n.style for n, s in negs if s >= s_pos]) for i, pos, s_pos, negs in scored}
    return {i: v for i, v in beaten.items() if v[1]}, len(scored)


def gallery_outrankers(emb, inputs, style):
    """(queries of `style` scored, Counter of what came at least as near as the query's original:
    "own <error type>" for one of the report's own one-error copies, "another report" for an original
    of other text, "another report's copy" for a one-error copy of another report). A query can count
    under several kinds; ties count against the model, as in the suite."""
    from open_clip_cxr.eval.robustness import same_report_key
    originals, equiv, negs = inputs
    ids = {}      # one id per distinct original (identical originals are one item, as in the suite)
    orig_key = torch.tensor([ids.setdefault(same_report_key(o), len(ids)) for o in originals])
    copies = [n.text for ns in negs for n in ns]
    copy_owner = torch.tensor([orig_key[j].item() for j, ns in enumerate(negs) for _ in ns], dtype=torch.long)
    copy_key = torch.tensor([ids.get(same_report_key(t), -1) for t in copies], dtype=torch.long)
    orig_emb, copy_emb = emb(originals), (emb(copies) if copies else None)
    seen, kinds = 0, Counter()
    for i, vs in enumerate(equiv):
        for v in (v for v in vs if v.style == style):
            seen += 1
            q = emb([v.text])[0]
            s_orig = float(q @ orig_emb[i])
            other = orig_key != orig_key[i]
            if other.any() and float((orig_emb[other] @ q).max()) >= s_orig:
                kinds["another report"] += 1
            theirs = (copy_owner != orig_key[i]) & (copy_key != orig_key[i]) if copies else None
            if copies and theirs.any() and float((copy_emb[theirs] @ q).max()) >= s_orig:
                kinds["another report's copy"] += 1
            if negs[i]:
                sims = (emb([n.text for n in negs[i]]) @ q).tolist()
                kinds.update({f"own {n.error_type or n.style}" for n, s in zip(negs[i], sims) if s >= s_orig})
    return seen, kinds


def fixed_and_broken(failed_base, failed_change, error_type=None):
    """(reports the change passes that the base fails, reports it fails that the base passes);
    with `error_type`, a report fails when a copy of that type came at least as near as the positive."""
    def on(failed):
        return {i for i, (_, beat) in failed.items() if error_type is None or error_type in beat}
    return len(on(failed_base) - on(failed_change)), len(on(failed_change) - on(failed_base))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", action="append", default=[], help="a model folder (repeatable)")
    ap.add_argument("--pair", action="append", default=[], metavar="BASE,CHANGE",
                    help="two model folders compared report by report (repeatable; pooled)")
    ap.add_argument("--columns", default="", help="reference columns: bow, minilm, built-in model names")
    ap.add_argument("--limit", type=int, default=None, help="first N validation reports (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gallery-style", action="append", default=[], metavar="STYLE",
                    help="the error-copy gallery for this held-out style instead (repeatable): what outranks the original")
    args = ap.parse_args()
    unknown = [s for s in args.gallery_style if s not in noise.HELDOUT_STYLES]
    if unknown:
        ap.error(f"--gallery-style {unknown[0]}: not a held-out style; use one of {', '.join(noise.HELDOUT_STYLES)}")
    pairs = [tuple(p.split(",")) for p in args.pair]
    if any(len(p) != 2 or not all(p) for p in pairs):
        ap.error("--pair takes two model folders separated by a comma: --pair runs/base,runs/change")
    columns = [c for c in args.columns.split(",") if c] + args.after
    columns += [m for p in pairs for m in p if m not in columns]
    if not columns:
        ap.error("name at least one model: --after RUN, --pair BASE,CHANGE or --columns bow")
    torch.set_num_threads(args.threads)
    from open_clip_cxr.precision import choose
    choice = choose("auto", "cpu", threads=args.threads)
    inputs = probe_inputs([r for r in openi_reports(split="validate", limit=args.limit) if original_text(r)])
    originals, equiv, negs = inputs
    texts = originals + [v.text for vs in equiv + negs for v in vs]
    what = "the error-copy gallery" if args.gallery_style else "held-out error discrimination"
    print(f"{what}, {len(originals)} validation reports; CPU: {_cpu_name()}; "
          f"towers in {choice.precision}, {args.threads} thread(s)")
    failed = {}
    for col in columns:
        emb = _Embedder(column_encode_fn(col, 0, 4096, dtype=choice.dtype), texts)
        if args.gallery_style:
            for style in args.gallery_style:
                n, kinds = gallery_outrankers(emb, inputs, style)
                print(f"{col} [{style}]: {n} queries; their original outranked by {dict(kinds.most_common())}")
            continue
        failed[col], n = failures(emb, inputs)
        types = Counter(t for _, beat in failed[col].values() for t in beat)
        styles = Counter(style for style, _ in failed[col].values())
        print(f"{col}: accuracy {1 - len(failed[col]) / n:.3f} of {n}, {len(failed[col])} failed; "
              f"copies nearer than the positive by error type {dict(types.most_common())}; "
              f"failed reports by positive style {dict(styles.most_common())}")
    if args.gallery_style:
        return
    if len(args.after) > 1:     # the trained models only: a reference column fails most reports
        sets = [set(failed[col]) for col in args.after]
        print(f"failed by every --after model: {len(set.intersection(*sets))}; by any: {len(set.union(*sets))}")
    if pairs:
        print_pairs(pairs, failed)


def print_pairs(pairs, failed):
    """Fixed / broken per pair and pooled, over all failures, then per error type."""
    error_types = sorted({t for f in failed.values() for _, beat in f.values() for t in beat})
    for error_type in (None, *error_types):
        what = "failed reports" if error_type is None else f"reports failed on {error_type} copies"
        counts = [fixed_and_broken(failed[base], failed[change], error_type) for base, change in pairs]
        for (base, change), (fixed, broken) in zip(pairs, counts):
            print(f"{change} against {base}, {what}: fixes {fixed}, breaks {broken} "
                  f"(sign test p {sign_test_p(fixed, broken):.3f})")
        if len(pairs) > 1:
            fixed, broken = (sum(c[0] for c in counts), sum(c[1] for c in counts))
            print(f"  pooled over {len(pairs)} pairs: fixes {fixed}, breaks {broken} "
                  f"(sign test p {sign_test_p(fixed, broken):.3f})")


if __name__ == "__main__":
    main()
