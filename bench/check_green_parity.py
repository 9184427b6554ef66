"""Does our GREEN parser give GREEN's own scores? Compare on recorded judge responses.

Stanford-AIMI/GREEN's repository has held recorded responses of its 7B judge (they are not
shipped here; fetch them yourself), for example:

    git clone https://github.com/Stanford-AIMI/GREEN /tmp/GREEN
    git -C /tmp/GREEN show 6f1b980:tests/responses_test.csv > /tmp/responses_test.csv
    git -C /tmp/GREEN show e81c6dc:results_GREEN-Mistral-7b.csv > /tmp/results_GREEN-Mistral-7b.csv
    python bench/check_green_parity.py --responses /tmp/results_GREEN-Mistral-7b.csv

A results table (columns "green" or "green_score", the six "(a) ..." category columns and
"Matched Findings") is compared with the numbers recorded in it. A table of responses alone
("generated response to prompt") carries no scores: they are computed with GREEN's own parser
from the installed `green_score` package (install GREEN from its repository),
or the script exits saying so.

Prints per item: the exact-match rate of the score, of the six significant-error counts and of
the matched-findings count, and max |our score - theirs|; and the summary (mean, std, per
category fraction without an error) side by side. `--out FILE` writes it all as JSON.
"""
import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from open_clip_cxr.eval import green as G   # noqa: E402

RESPONSE_COLUMNS = ("green_analysis", "evaluation", "generated response to prompt")
SCORE_COLUMNS = ("green_score", "green")


class UsageError(Exception):
    """A problem with the input the user can fix; main prints it on one line and exits 2."""


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def _num(x):
    if x is None or str(x).strip() == "" or str(x).strip().lower() == "nan":
        return None
    return float(x)


def read_table(path, column=None):
    """(responses, recorded rows or None); recorded rows hold score, counts (a)-(f), matched."""
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UsageError(f"{path}: no rows")
    cols = list(rows[0].keys())
    column = column or next((c for c in RESPONSE_COLUMNS if c in cols), None)
    if column is None or column not in cols:
        raise UsageError(f"{path}: no response column (have {cols}); name it with --column")
    responses = [r[column] or "" for r in rows]
    score_col = next((c for c in SCORE_COLUMNS if c in cols), None)
    if score_col is None:
        return responses, None
    recorded = []
    for r in rows:
        recorded.append({"score": _num(r[score_col]),
                         "significant": {c: _num(r.get(G.CATEGORY_COLUMNS[c])) for c in G.CATEGORIES},
                         "matched": _num(r.get("Matched Findings"))})
    return responses, recorded


def scores_from_green_package(responses):
    """GREEN's own parser on the responses (needs GREEN's `green_score` package importable)."""
    try:
        from green_score import GREEN
    except ImportError as e:
        raise UsageError(f"{e}: this table records no scores and GREEN's own package is not importable; install "
                         "GREEN (pip install git+https://github.com/Stanford-AIMI/GREEN) or pass a results table with a green column")
    ref = GREEN(model_name=None, compute_summary_stats=False)   # no model: only its parser is used
    out = []
    for resp in responses:
        counts = ref.compute_error_count(resp)
        out.append({"score": ref.compute_green(resp), "significant": dict(zip(G.CATEGORIES, counts[:6])),
                    "matched": counts[6]})
    return out


def summary_of(recorded):
    scores = [r["score"] for r in recorded if r["score"] is not None]
    n = len(scores)
    mean = sum(scores) / n if n else None
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n) if n else None
    acc = {}
    for c in G.CATEGORIES:
        vals = [r["significant"][c] for r in recorded if r["significant"][c] is not None]
        acc[G.CATEGORY_COLUMNS[c]] = sum(v == 0 for v in vals) / len(vals) if vals else None
    return {"green": mean, "green_std": std, "n": n, "accuracy": acc}


def compare(responses, recorded):
    ours = [G.parse_green(r) for r in responses]
    n = len(responses)
    score_eq = count_eq = matched_eq = 0
    max_diff, mismatches = 0.0, []
    for i, (p, rec) in enumerate(zip(ours, recorded)):
        s = G.green_score(p)
        theirs = rec["score"]
        same = theirs is not None and math.isclose(s, theirs, rel_tol=0, abs_tol=1e-12)
        if theirs is not None:
            max_diff = max(max_diff, abs(s - theirs))
        score_eq += same
        count_eq += all(rec["significant"][c] is not None and p.significant[c] == rec["significant"][c]
                        for c in G.CATEGORIES)
        matched_eq += rec["matched"] is not None and p.matched == rec["matched"]
        if not same:
            mismatches.append({"row": i, "ours": s, "theirs": theirs})
    ours_summary = G.summarise(ours)
    theirs_summary = summary_of(recorded)
    return {
        "n": n,
        "score_exact_match_rate": score_eq / n,
        "score_max_abs_diff": max_diff,
        "significant_counts_exact_match_rate": count_eq / n,
        "matched_findings_exact_match_rate": matched_eq / n,
        "summary": {"ours": {k: ours_summary[k] for k in ("green", "green_std", "n", "accuracy")},
                    "theirs": theirs_summary},
        "summary_max_abs_diff": max(
            [abs(ours_summary["green"] - theirs_summary["green"]), abs(ours_summary["green_std"] - theirs_summary["green_std"])]
            + [abs(ours_summary["accuracy"][k] - v) for k, v in theirs_summary["accuracy"].items() if v is not None]),
        "mismatches": mismatches[:20],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", required=True, help="CSV of GREEN judge responses (with or without scores)")
    ap.add_argument("--column", default=None, help="the response column (default: found by name)")
    ap.add_argument("--out", default=None, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    if not os.path.exists(args.responses):
        print(f"--responses {args.responses}: no such file; fetch one of GREEN's recorded tables first", file=sys.stderr)
        return 2
    try:
        responses, recorded = read_table(args.responses, args.column)
        source = "recorded in the table"
        if recorded is None:
            recorded, source = scores_from_green_package(responses), "GREEN's green_score package parser"
    except UsageError as e:
        print(f"check_green_parity: {e}", file=sys.stderr)
        return 2
    res = compare(responses, recorded)
    res.update({"responses": os.path.abspath(args.responses), "reference_scores": source, "cpu": cpu_name()})
    print(f"GREEN parity on {res['n']} responses of {args.responses} (reference: {source}; CPU: {res['cpu']})")
    print(f"  score exact-match rate        {res['score_exact_match_rate']:.4f}   max |diff| {res['score_max_abs_diff']:.3g}")
    print(f"  (a)-(f) counts exact-match    {res['significant_counts_exact_match_rate']:.4f}")
    print(f"  matched findings exact-match  {res['matched_findings_exact_match_rate']:.4f}")
    so, st = res["summary"]["ours"], res["summary"]["theirs"]
    print(f"  mean GREEN   ours {so['green']:.6f}  theirs {st['green']:.6f}")
    print(f"  std GREEN    ours {so['green_std']:.6f}  theirs {st['green_std']:.6f}")
    for k, v in st["accuracy"].items():
        print(f"  accuracy {k[:40]:40s} ours {so['accuracy'][k]:.4f}  theirs " + ("n/a" if v is None else f"{v:.4f}"))
    print(f"  summary max |diff| {res['summary_max_abs_diff']:.3g}")
    for m in res["mismatches"]:
        print(f"  mismatch row {m['row']}: ours {m['ours']} theirs {m['theirs']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
