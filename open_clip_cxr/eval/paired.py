"""Two models on the same items, compared item by item: with 403 reports a row's gap between two
models is often one to four items, and only the items one model gets and the other misses (the
discordant ones) say whether that gap is more than chance."""
import math
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

MISSES_VERSION = 2   # 1: every repeated query listed; 2: a (query, target) pair repeated word for word once


def sign_test_p(only_a: int, only_b: int) -> float:
    """Exact two-sided sign test on the discordant items: the chance of a split at least this
    uneven if each side were equally likely to win an item (McNemar's exact test)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def holm(pvalues: Mapping[str, float]) -> Dict[str, float]:
    """Holm's step-down adjusted p values (family-wise error over every row read at once): a run
    reads some twenty rows, so one of them under 0.05 is about what chance alone gives. Valid
    however the rows depend on each other (the error types are subsets of discrimination)."""
    order = sorted(pvalues, key=pvalues.get)
    m, out, running = len(order), {}, 0.0
    for k, row in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[row]))   # never below a smaller p's
        out[row] = running
    return out


def format_p(p: float) -> str:
    """A p value as the tables print it (three places; smaller ones as < 0.001)."""
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}"


def row_misses(res: Mapping) -> Dict[str, Optional[list]]:
    """{table row: item indices the model missed} of a `run_robustness` result (rows named as in
    `robustness.format_table`; None where the result predates recorded misses)."""
    rows: Dict[str, Optional[list]] = {}
    for style, v in res.get("variant_to_original", {}).items():
        rows[f"variant->original R@1 [{style}]"] = v.get("misses")
    for style, v in res.get("error_copy_gallery", {}).items():
        rows[f"error-copy gallery R@1 [{style}]"] = v.get("misses")
    for key, row in (("impression_to_findings", "impression->findings R@1"),
                     ("findings_to_impression", "findings->impression R@1")):
        if res.get(f"{key}_R@1") is not None:      # None: no report has both sections
            rows[row] = res.get(f"{key}_misses")
    ed = res.get("error_discrimination", {})
    rows["error discrimination (all types)"] = ed.get("misses")
    for t, v in ed.get("per_error_type", {}).items():
        rows[f"error discrimination [{t}]"] = v.get("misses")
    return rows


def _discordant(res_a: Mapping, res_b: Mapping) -> Dict[str, Tuple[set, set]]:
    """Per row both results recorded: (items only A gets right, items only B gets right)."""
    b = row_misses(res_b)
    return {row: (set(b[row]) - set(miss_a), set(miss_a) - set(b[row]))
            for row, miss_a in row_misses(res_a).items() if miss_a is not None and b.get(row) is not None}


def paired_rows(res_a: Mapping, res_b: Mapping) -> Dict[str, Tuple[int, int, float]]:
    """Per row both results recorded: (items only A gets right, items only B gets right, sign
    test p). Both must come from the same protocol (same reports, seed and rewrites)."""
    return {row: (len(a), len(b), sign_test_p(len(a), len(b))) for row, (a, b) in _discordant(res_a, res_b).items()}


def pooled_paired(draws: Sequence[Tuple[Mapping, Mapping, Mapping[str, List[int]]]]
                  ) -> Dict[str, Tuple[int, int, float, int, int]]:
    """Two models over several draws of one protocol (suite seeds: new rewrites of the same
    reports). `draws`: one (result A, result B, `robustness.row_reports`) per draw. Per row: the
    reports A gets right on more draws than B, those B gets right on more, the sign test p on those
    reports, and the discordant items behind them (only A / only B). A report is one trial however
    many draws it holds, because its rewrites share its words and its near-duplicates in the gallery:
    counting each draw's item alone would overstate the evidence."""
    score: Dict[str, Dict[int, int]] = {}   # row -> report -> draws A won minus draws B won
    items: Dict[str, List[int]] = {}
    for res_a, res_b, where in draws:
        for row, (won_a, won_b) in _discordant(res_a, res_b).items():
            report_of = where.get(row)        # None: the row's items are reports
            per_report = score.setdefault(row, {})
            counts = items.setdefault(row, [0, 0])
            counts[0] += len(won_a)
            counts[1] += len(won_b)
            for side, won in ((1, won_a), (-1, won_b)):
                for i in won:
                    r = report_of[i] if report_of is not None else i
                    per_report[r] = per_report.get(r, 0) + side
    out = {}
    for row, per_report in score.items():
        only_a = sum(v > 0 for v in per_report.values())
        only_b = sum(v < 0 for v in per_report.values())
        out[row] = (only_a, only_b, sign_test_p(only_a, only_b), *items[row])
    return out


class OffsetReports(dict):
    """`robustness.row_reports` of one split with every report id moved up by `offset`, so that draws
    of several splits (validation and test) pool in `pooled_paired` / `reachable` without two
    different reports sharing an id; rows it does not list (items are reports) shift the same way."""
    def __init__(self, where: Mapping[str, List[int]], offset: int):
        super().__init__({row: [offset + r for r in reps] for row, reps in where.items()})
        self.offset = offset

    def get(self, row, default=None):
        # a row whose items are reports themselves (not listed): item i is report offset + i
        reps = super().get(row)
        return range(self.offset, sys.maxsize) if reps is None else reps


def reachable(draws: Sequence[Tuple[Mapping, Mapping[str, List[int]]]]) -> Dict[str, Tuple[int, float]]:
    """Per row of one model over the draws of a protocol (`draws`: one (result, `row_reports`) per
    draw): the reports it misses on at least one draw, and the sign test p of an encoder right on
    every item against it (those reports won, none lost). The best split any model can reach: a
    baseline that misses five reports or fewer cannot be beaten at p < 0.05 on that row, however
    good the model (6 / 0 is the least split under 0.05)."""
    missed: Dict[str, set] = {}
    for res, where in draws:
        for row, misses in row_misses(res).items():
            if misses is None:
                continue
            report_of = where.get(row)
            missed.setdefault(row, set()).update(report_of[i] if report_of is not None else i for i in misses)
    return {row: (len(m), sign_test_p(len(m), 0)) for row, m in missed.items()}


def format_reachable(draws: Sequence[Tuple[Mapping[str, Mapping], Mapping[str, List[int]]]],
                     baselines=("bow", "minilm"), alpha: float = 0.05) -> str:
    """The rows on which no model could beat a baseline at p < `alpha` over these draws (`reachable`)."""
    lines = []
    for b in baselines:
        if all(b in res for res, _ in draws):
            for row, (n, p) in reachable([(res[b], where) for res, where in draws]).items():
                if p >= alpha:
                    lines.append(f"  {row}: {b} misses {n} report(s) on any draw; a model right on every item "
                                 f"splits {n} / 0 ({format_p(p)})")
    head = f"rows where no model can beat a baseline at p < {alpha} over {len(draws)} draw(s) (too few baseline misses)"
    return head + (":\n" + "\n".join(lines) if lines else ": none")


def _layout(title: str, head: List[str], cells: Mapping[str, List[str]]) -> str:
    """A plain-text table: `title`, then one line per row name of `cells`, its cells right-aligned
    under `head`."""
    w0 = max(len(r) for r in cells)
    widths = [max(len(h), *(len(c[k]) for c in cells.values())) for k, h in enumerate(head)]
    lines = [title, "  ".join(["row".ljust(w0)] + [h.rjust(w) for h, w in zip(head, widths)])]
    lines += ["  ".join([r.ljust(w0)] + [c.rjust(w) for c, w in zip(cs, widths)]) for r, cs in cells.items()]
    return "\n".join(lines)


def format_pooled(draws: Sequence[Tuple[Mapping[str, Mapping], Mapping[str, List[int]]]], column: str,
                  baselines=("bow", "minilm")) -> str:
    """A plain-text table over the draws of a protocol (`draws`: one ({column: result},
    `robustness.row_reports`) per draw): per row, the mean score of `column` and of each baseline,
    and the reports `column` wins / loses against each (`pooled_paired`)."""
    from open_clip_cxr.eval.robustness import _flatten
    bases = [b for b in baselines if b != column and all(b in res for res, _ in draws)]
    if not bases:
        return f"{column}: none of {', '.join(baselines)} measured on every draw to pair with"
    cols = [column] + bases
    flats = [{c: _flatten(res[c]) for c in cols} for res, _ in draws]
    pairs = {b: pooled_paired([(res[column], res[b], where) for res, where in draws]) for b in bases}
    rows = [r for r in flats[0][column] if any(r in p for p in pairs.values())]

    def mean(c, r):
        vals = [f[c].get(r) for f in flats]
        return "-" if any(v is None for v in vals) else f"{sum(vals) / len(vals):.3f}"
    cells = {r: [mean(c, r) for c in cols]
             + [(f"{pairs[b][r][0]} / {pairs[b][r][1]} ({format_p(pairs[b][r][2])}; "
                 f"items {pairs[b][r][3]} / {pairs[b][r][4]})") if r in pairs[b] else "-" for b in bases]
             for r in rows}
    table = _layout(f"{column} over {len(draws)} draws of the protocol: mean score, and reports right on more "
                    f"draws here / in the baseline (exact sign test p; discordant items behind them)",
                    ["mean " + c for c in cols] + [f"reports vs {b}" for b in bases], cells)
    return table + "\n" + _holm_lines(pairs)


def _holm_lines(pairs: Mapping[str, Mapping[str, tuple]]) -> str:
    """Per baseline of `pairs` ({baseline: {row: (only here, only there, p, ...)}}), the rows still
    under p 0.05 once corrected for reading them all (`holm`)."""
    lines = []
    for base, pair in pairs.items():
        adj = holm({r: v[2] for r, v in pair.items()})
        hits = [f"{r} ({v[0]} / {v[1]}, {format_p(adj[r])})" for r, v in pair.items() if adj[r] < 0.05]
        lines.append(f"vs {base}, Holm-corrected over {len(pair)} rows: "
                     + ("; ".join(hits) if hits else "no row under p 0.05"))
    return "\n".join(lines)


def has_misses(res: Mapping) -> bool:
    """Whether a cached suite result recorded its misses the current way (`run_robustness` stamps
    `MISSES_VERSION`; results before 2026-12-06 have no misses and no stamp)."""
    return res.get("misses_version") == MISSES_VERSION


def format_paired(results: Mapping[str, Mapping], column: str, baselines=("bow", "minilm")) -> str:
    """A plain-text table: per row of `column`'s suite, against each baseline, the items only
    `column` gets right / only the baseline gets right (exact sign test p)."""
    bases = [b for b in baselines if b in results and b != column]
    if not bases:
        return f"{column}: none of {', '.join(baselines)} measured here to pair with"
    pairs = {b: paired_rows(results[column], results[b]) for b in bases}
    rows = [r for r in row_misses(results[column]) if any(r in p for p in pairs.values())]
    if not rows:
        return f"{column}: no recorded misses to pair (rerun the column)"
    cells = {r: [(f"{pairs[b][r][0]} / {pairs[b][r][1]} ({format_p(pairs[b][r][2])})" if r in pairs[b] else "-")
                 for b in bases] for r in rows}
    table = _layout(f"{column} paired with the baselines, item by item: right only here / right only in the "
                    f"baseline (exact sign test p)", [f"vs {b}" for b in bases], cells)
    return table + "\n" + _holm_lines(pairs)
