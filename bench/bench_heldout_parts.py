"""Which part of a held-out restyle a model fails on: `hospital_mix`, `telegraphic` and `caps_headers` taken apart.

The held-out protocol's hardest row, `hospital_mix`, is five operations at once (held-out shorthand,
typed acronyms, telegraphic sentences, capital headers, a typo; `reports.noise.hospital_mix`), and
`telegraphic` itself is three (function words dropped, sentences joined by ", ", lower case). This
prints variant -> original R@1 with each part alone and in the combinations that matter, for the
bag of words and each model given, on the Open-I validation split:

    python bench/bench_heldout_parts.py --after runs/text-small [--after runs/other] [--limit 200]

It is how the sentence-mark dependence of stage 1 was found (docs/stage1_heldout_rounds.md, "What the pooler leaned on").
`--near-duplicates` adds, per model, R@1 that also counts a retrieved original whose content words
(articles and a few function words aside) overlap the true one's by >= 0.8 (Jaccard): it tells
a miss on a near-copy in the gallery ("Heart size is normal and the lungs are clear." / "... and
lungs are clear.") from a real one.
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_text_stage import _cpu_name, column_encode_fn  # noqa: E402
from open_clip_cxr.eval.robustness import _Embedder, _r1, openi_reports, original_text  # noqa: E402
from open_clip_cxr.reports import noise  # noqa: E402
from open_clip_cxr.reports.clean import join_sections  # noqa: E402
from open_clip_cxr.reports.rewrite_common import report_sections, rng_for  # noqa: E402

HOSPITAL = [noise.HOSPITAL_PARTS, ("shorthand", "acronyms", "telegraphic"), ("shorthand", "acronyms"),
            ("telegraphic",), ("headers",), ("telegraphic", "headers"), ("shorthand", "acronyms", "headers", "typo")]
TELEGRAPHIC = {"lower case": dict(drop=False, join=False), "function words dropped": dict(join=False, lower=False),
               "joined by ', '": dict(drop=False, lower=False), "dropped + joined": dict(lower=False),
               "all three (telegraphic)": {}}


_FUNCTION_WORDS = {"the", "a", "an", "is", "are", "of", "and", "or", "in", "there", "to", "with", "for"}


def content_words(text: str) -> set:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - _FUNCTION_WORDS


def near_duplicate(a: str, b: str, threshold: float = 0.8) -> bool:
    """True when two reports share >= `threshold` of their content words (Jaccard)."""
    wa, wb = content_words(a), content_words(b)
    return len(wa & wb) >= threshold * max(1, len(wa | wb))


def r1_near(emb, pairs, gallery) -> float:
    """R@1 where the top original counts when it is the target or a near-duplicate of it."""
    gallery = list(dict.fromkeys(gallery))
    top = (emb([q for q, _ in pairs]) @ emb(gallery).T).argmax(1).tolist()
    return sum(gallery[j] == t or near_duplicate(gallery[j], t) for j, (_, t) in zip(top, pairs)) / len(pairs)


def rows(reports):
    """{row name: [(query, original)]}: the hospital_mix parts, then the telegraphic parts."""
    out = {}
    for parts in HOSPITAL:
        name = "hospital: " + " + ".join(parts)
        out[name] = [(noise.hospital_mix(r, rng_for(0, "heldout", "hospital_mix", original_text(r)), parts),
                      original_text(r)) for r in reports]
    for name, kw in TELEGRAPHIC.items():
        out["telegraphic: " + name] = [(join_sections(*(noise.telegraphic(s, **kw) for s in report_sections(r))),
                                        original_text(r)) for r in reports]
    # capitals or the header lines: which one costs the `caps_headers` row
    caps = lambda r, upper: noise.caps_headers(report_sections(r), rng_for(0, "heldout", "caps_headers", original_text(r)),  # noqa: E731
                                               upper=upper)
    out["caps_headers: both"] = [(caps(r, True), original_text(r)) for r in reports]
    out["caps_headers: capitals only"] = [(original_text(r).upper(), original_text(r)) for r in reports]
    out["caps_headers: header lines only"] = [(caps(r, False), original_text(r)) for r in reports]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", action="append", default=[], help="a model folder (repeatable)")
    ap.add_argument("--columns", default="bow", help="reference columns: bow, minilm, built-in model names")
    ap.add_argument("--limit", type=int, default=None, help="first N validation reports (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--near-duplicates", action="store_true",
                    help="also R@1 counting a retrieved near-duplicate of the original (a column per model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from open_clip_cxr.precision import choose
    choice = choose("auto", "cpu", threads=args.threads)
    reports = [r for r in openi_reports(split="validate", limit=args.limit) if original_text(r)]
    table = rows(reports)
    originals = [original_text(r) for r in reports]
    columns = [c for c in args.columns.split(",") if c] + args.after
    results = {}
    for col in columns:
        fn = column_encode_fn(col, 0, 4096, dtype=choice.dtype)
        emb = _Embedder(fn, originals + [q for pairs in table.values() for q, _ in pairs])
        results[col] = {name: _r1(emb, [q for q, _ in p], [t for _, t in p], originals)[0] for name, p in table.items()}
        if args.near_duplicates:
            results[col + " ~dup"] = {name: r1_near(emb, p, originals) for name, p in table.items()}
    print(f"variant -> original R@1, {len(reports)} validation reports; CPU: {_cpu_name()}; "
          f"towers in {choice.precision}, {args.threads} thread(s)")
    w = max(map(len, table))
    columns = [c for col in columns for c in (col, col + " ~dup") if c in results]
    names = ["/".join(Path(c).parts[-2:])[-16:] for c in columns]   # "runs/text-small", "E1/run"
    print("part".ljust(w), *(n.rjust(16) for n in names))
    for name in table:
        print(name.ljust(w), *(f"{results[c][name]:.3f}".rjust(16) for c in columns))


if __name__ == "__main__":
    main()
