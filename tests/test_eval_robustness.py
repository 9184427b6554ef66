"""Text-robustness suite on hand-written reports with a bag-of-words and a tiny fake encoder."""
import json

import pytest
import torch

from open_clip_cxr.eval import robustness as RB
from open_clip_cxr.reports.types import Report, Variant

REPORTS = [
    Report("r1", "test", findings="The heart is normal in size. No pleural effusion.", impression="No acute process."),
    Report("r2", "test", findings="Small left pleural effusion. Mild cardiomegaly.", impression="Left effusion."),
    Report("r3", "test", findings="Right lower lobe opacity. No pneumothorax.", impression="Right lower lobe pneumonia."),
    Report("r4", "test", findings="", impression="Endotracheal tube in standard position."),
]

# hand-built variants (independent of the variants module): a reorder, an abbreviation, two errors
EQUIV = {
    "r1": [Variant("No pleural effusion. The heart is normal in size.\nNo acute process.", "reorder", True)],
    "r2": [Variant("Small lt pleural effusion. Mild cardiomegaly.\nLeft effusion.", "abbreviate", True)],
    "r3": [Variant("No pneumothorax. Right lower lobe opacity.\nRight lower lobe pneumonia.", "reorder", True),
           Variant("Right lower lobe pneumonia.", "impression_only", True)],
    "r4": [],
}
NEG = {
    "r1": [Variant("The heart is normal in size. Large pleural effusion.\nNo acute process.", "negation", False, "negation")],
    "r2": [Variant("Small right pleural effusion. Mild cardiomegaly.\nLeft effusion.", "laterality", False, "laterality"),
           Variant("Large left pleural effusion. Mild cardiomegaly.\nLeft effusion.", "severity", False, "severity")],
    "r3": [Variant("Right lower lobe opacity. Pneumothorax.\nRight lower lobe pneumonia.", "negation", False, "negation")],
    "r4": [],
}


def run(encode_fn, **kw):
    return RB.run_robustness(REPORTS, encode_fn, variants_fn=lambda r: EQUIV[r.study_id],
                             negatives_fn=lambda r: NEG[r.study_id], **kw)


def test_bag_of_words_encoder_is_count_cosine():
    enc = RB.bow_encode_fn(dim=512)
    e = enc(["left effusion", "effusion left", "right effusion", ""])
    assert torch.allclose(e[0], e[1])                     # order-blind
    assert float(e[0] @ e[2]) == pytest.approx(0.5, abs=0.01)
    assert float(e[3].norm()) == 0.0


def test_suite_with_bag_of_words():
    res = run(RB.bow_encode_fn())
    json.dumps(res)
    assert res["n_reports"] == 4
    assert res["variant_to_original"]["reorder"] == {"R@1": 1.0, "n": 2, "misses": []}  # same words, same vector
    assert set(res["variant_to_original"]) == {"reorder", "abbreviate", "impression_only"}
    assert res["n_with_both_sections"] == 3
    assert 0.0 <= res["impression_to_findings_R@1"] <= 1.0
    ed = res["error_discrimination"]
    # r1, r2, r3 have a positive style and negatives; a reorder is identical in bag of words
    assert ed["n"] == 3
    assert set(ed["per_error_type"]) == {"negation", "laterality", "severity"}
    assert ed["per_error_type"]["laterality"]["n"] == 1


def test_perfect_and_blind_fake_encoders():
    """An encoder that knows each text's report scores 1 everywhere; a constant one scores 0."""
    owner = {}
    for r in REPORTS:
        texts = [RB.original_text(r), r.findings, r.impression] + [v.text for v in EQUIV[r.study_id]]
        for t in texts:
            owner.setdefault(t.strip(), int(r.study_id[1:]))
    neg_texts = {v.text for vs in NEG.values() for v in vs}

    def oracle(texts):
        out = torch.zeros(len(texts), 8)
        for i, t in enumerate(texts):
            if t in neg_texts:
                out[i, 7] = 1.0           # negatives point elsewhere
            else:
                out[i, owner[t.strip()]] = 1.0
        return out

    res = run(oracle)
    assert res["variant_to_original_mean_R@1"] == 1.0
    assert res["impression_to_findings_R@1"] == 1.0 and res["findings_to_impression_R@1"] == 1.0
    assert res["error_discrimination"]["accuracy"] == 1.0

    blind = run(lambda texts: torch.ones(len(texts), 8))
    # every score ties, and ties count against the encoder
    assert blind["variant_to_original_mean_R@1"] == 0.0
    assert blind["error_discrimination"]["accuracy"] == 0.0


def test_misses_pair_two_encoders_item_by_item():
    """Each row records which items an encoder missed; pairing two encoders counts the items only
    one of them gets right, and those counts account exactly for the gap between their scores."""
    from open_clip_cxr.eval import paired as P
    bow, blind = run(RB.bow_encode_fn()), run(lambda t: torch.ones(len(t), 3))
    for res in (bow, blind):
        for v in res["variant_to_original"].values():
            assert len(v["misses"]) == round((1 - v["R@1"]) * v["n"])
        ed = res["error_discrimination"]
        assert len(ed["misses"]) == round((1 - ed["accuracy"]) * ed["n"])
        assert set(ed["misses"]) <= {0, 1, 2}           # report indices: r4 has no negatives
        assert P.has_misses(res) and res["misses_version"] == P.MISSES_VERSION
    assert blind["error_discrimination"]["misses"] == [0, 1, 2]
    rows = P.paired_rows(bow, blind)
    flat_bow, flat_blind = RB._flatten(bow), RB._flatten(blind)
    assert set(rows) == set(flat_bow) - {"variant->original R@1 (mean)", "error-copy gallery R@1 (mean)"}
    for row, (only_bow, only_blind, p) in rows.items():
        items = round(len(P.row_misses(blind)[row]) / (1 - flat_blind[row])) if flat_blind[row] < 1 else None
        assert only_blind == 0                            # a constant encoder wins nothing
        if items:
            assert only_bow == round((flat_bow[row] - flat_blind[row]) * items)
        assert p == P.sign_test_p(only_bow, only_blind)
    assert all(v == (0, 0, 1.0) for v in P.paired_rows(bow, bow).values())
    table = P.format_paired({"bow": bow, "blind": blind}, "blind", baselines=("bow",))
    only_bow, _, p = rows["error discrimination (all types)"]
    line = next(l for l in table.splitlines() if l.startswith("error discrimination (all types)"))
    assert line.endswith(f"0 / {only_bow} ({P.format_p(p)})") and only_bow > 0
    adj = P.holm({r: v[2] for r, v in rows.items()})      # the last line: what survives reading every row
    survivors = [r for r in rows if adj[r] < 0.05]
    assert table.splitlines()[-1].startswith(f"vs bow, Holm-corrected over {len(rows)} rows: ")
    assert all(f"{r} (" in table.splitlines()[-1] for r in survivors)
    assert survivors or table.splitlines()[-1].endswith("no row under p 0.05")
    assert P.format_p(0.0004) == "p < 0.001" and P.format_p(0.25) == "p 0.250"
    assert "none of bow, minilm measured here" in P.format_paired({"bow": bow}, "bow")
    old = json.loads(json.dumps(bow))      # a result cached before misses were recorded
    del old["error_discrimination"]["misses"], old["misses_version"]
    assert not P.has_misses(old)


def test_row_reports_name_the_report_behind_each_item():
    """`row_reports` lists the report of each item in the order the suite scores them, so the
    misses of several draws can be paired report by report."""
    res = run(RB.bow_encode_fn())
    where = RB.row_reports(REPORTS, variants_fn=lambda r: EQUIV[r.study_id])
    assert where["variant->original R@1 [reorder]"] == [0, 2]          # r1's and r3's reorders
    assert where["variant->original R@1 [abbreviate]"] == [1]
    assert where["variant->original R@1 [impression_only]"] == [2]
    assert where["impression->findings R@1"] == where["findings->impression R@1"] == [0, 1, 2]  # r4: no findings
    for style, v in res["variant_to_original"].items():
        assert len(where[f"variant->original R@1 [{style}]"]) == v["n"]
        assert where[f"error-copy gallery R@1 [{style}]"] == where[f"variant->original R@1 [{style}]"]
    held = RB.run_heldout(REPORTS, RB.bow_encode_fn())
    held_where = RB.row_reports(REPORTS, styles="heldout")
    for style, v in held["variant_to_original"].items():
        assert len(held_where[f"variant->original R@1 [{style}]"]) == v["n"]


def _result(style_misses, discrimination_misses):
    return {"variant_to_original": {"s": {"R@1": 0.5, "n": 2, "misses": style_misses}},
            "error_discrimination": {"accuracy": 0.5, "n": 4, "misses": discrimination_misses, "per_error_type": {}}}


def test_pooled_pairing_counts_each_report_once_over_draws():
    """Over draws a report is one trial: A right on report 5 in both draws is one report won (two
    items); a report won in one draw and lost in the next is no report either way."""
    from open_clip_cxr.eval import paired as P
    row = "variant->original R@1 [s]"
    draws = [(_result([1], [2]), _result([0], []), {row: [5, 7]}),    # draw 1: item 0 is report 5
             (_result([], []), _result([1], [2]), {row: [7, 5]})]     # draw 2: item 1 is report 5
    pooled = P.pooled_paired(draws)
    assert pooled[row] == (1, 1, 1.0, 2, 1)                  # report 5 won twice, report 7 lost once
    assert pooled["error discrimination (all types)"] == (0, 0, 1.0, 1, 1)   # report 2: won once, lost once
    table = P.format_pooled([({"a": a, "bow": b}, w) for a, b, w in draws], "a", baselines=("bow", "minilm"))
    line = next(l for l in table.splitlines() if l.startswith(row))
    assert line.split()[3:5] == ["0.500", "0.500"] and line.endswith("1 / 1 (p 1.000; items 2 / 1)")
    assert "over 2 draws" in table.splitlines()[0]
    assert "none of minilm measured on every draw" in P.format_pooled(
        [({"a": draws[0][0]}, draws[0][2])], "a", baselines=("minilm",))


def test_holm_matches_closed_testing_with_bonferroni():
    """Holm's adjusted p of a row is, by its definition as a closed test, the largest Bonferroni p
    over every set of rows holding it: checked by brute force over all subsets, and on a hand-worked
    case (0.005, 0.01, 0.03, 0.04 over four rows: 0.02, 0.03, 0.06, 0.06)."""
    import itertools
    import random
    from open_clip_cxr.eval import paired as P
    assert P.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    rng = random.Random(0)
    for _ in range(20):
        ps = {f"r{i}": rng.choice([rng.random(), rng.random() / 50, 1.0]) for i in range(rng.randint(1, 6))}
        closed = {r: max(min(1.0, len(sub) * min(ps[x] for x in sub))
                         for n in range(1, len(ps) + 1) for sub in itertools.combinations(ps, n) if r in sub)
                  for r in ps}
        assert P.holm(ps) == pytest.approx(closed)


def test_pooled_table_names_the_rows_that_survive_holm():
    """Under the pooled table, one line per baseline: the rows still under p 0.05 once every row
    read is corrected for, or none. 8 / 0 reports (p 0.008) survives a handful of rows; a 1 / 1
    tie never does."""
    from open_clip_cxr.eval import paired as P
    row = "variant->original R@1 [s]"
    won = list(range(8))
    draws = [(_result([], []), _result(won, []), {row: list(range(100, 108))})]   # only bow misses them
    table = P.format_pooled([({"a": a, "bow": b}, w) for a, b, w in draws], "a", baselines=("bow",))
    last = table.splitlines()[-1]
    assert last.startswith("vs bow, Holm-corrected over ") and f"{row} (8 / 0, p " in last
    tie = [(_result([1], [2]), _result([0], []), {row: [5, 7]})]
    table = P.format_pooled([({"a": a, "bow": b}, w) for a, b, w in tie], "a", baselines=("bow",))
    assert table.splitlines()[-1].endswith("no row under p 0.05")


def test_reachable_names_rows_no_model_could_win_on():
    """A baseline that misses two reports over the draws cannot be beaten at p < 0.05 even by a
    model right on every item (2 / 0 is p 0.5); one that misses six can (6 / 0 is p 0.031)."""
    from open_clip_cxr.eval import paired as P
    row = "variant->original R@1 [s]"
    few = [(_result([0], []), {row: [5, 7]}), (_result([0, 1], []), {row: [5, 7]})]   # reports 5 and 7
    assert P.reachable(few)[row] == (2, 0.5)
    assert P.reachable(few)["error discrimination (all types)"] == (0, 1.0)
    many = [(_result(list(range(6)), list(range(6))), {row: [10, 11, 12, 13, 14, 15]})]
    assert P.reachable(many)[row] == (6, P.sign_test_p(6, 0)) and P.sign_test_p(6, 0) < 0.05
    text = P.format_reachable([({"bow": r}, w) for r, w in few], baselines=("bow", "minilm"))
    assert f"{row}: bow misses 2 report(s)" in text and "2 / 0 (p 0.500)" in text
    assert P.format_reachable([({"bow": r}, w) for r, w in many], baselines=("bow",)).endswith(": none")


def test_offset_reports_keep_two_splits_apart():
    """Report 0 of the validation split and report 0 of the test split are two reports: won in one
    and lost in the other, they are one report each way, not a wash."""
    from open_clip_cxr.eval import paired as P
    row = "variant->original R@1 [s]"
    val = (_result([], [0]), _result([0], []), P.OffsetReports({row: [0, 1]}, 0))
    test = (_result([0], []), _result([], [0]), P.OffsetReports({row: [0, 1]}, 10))
    assert P.pooled_paired([val, test])[row] == (1, 1, 1.0, 1, 1)
    assert P.pooled_paired([val, test])["error discrimination (all types)"] == (1, 1, 1.0, 1, 1)
    assert P.pooled_paired([val[:2] + ({row: [0, 1]},), test[:2] + ({row: [0, 1]},)])[row] == (0, 0, 1.0, 1, 1)
    assert P.reachable([(val[1], val[2]), (test[0], test[2])])[row][0] == 2
    assert P.OffsetReports({row: []}, 10).get(row) == []       # a listed row stays itself, even empty


def test_bench_pools_two_splits_without_merging_their_reports(monkeypatch, tmp_path, capsys):
    """`bench_text_stage.py --split validate,test`: each split measured and cached under its own key,
    then pooled with report ids kept apart (the same four reports served as both splits count twice)."""
    import importlib.util
    import pathlib
    import sys
    monkeypatch.syspath_prepend("bench")
    spec = importlib.util.spec_from_file_location(
        "bts", pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_text_stage.py")
    bts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bts)
    monkeypatch.setattr(bts, "openi_reports", lambda split=None, limit=None: REPORTS)
    monkeypatch.setattr(bts, "bow_encode_fn", lambda: RB.bow_encode_fn(dim=8))   # collisions: some misses
    seen = []
    real = bts.format_reachable
    monkeypatch.setattr(bts, "format_reachable", lambda draws, **kw: seen.append(draws) or real(draws, **kw))
    common = ["bts", "--columns", "bow", "--pair-against", "bow", "--heldout-styles", "--json", str(tmp_path / "c.json")]
    monkeypatch.setattr(sys, "argv", common + ["--split", "validate", "--draws", "2"])
    bts.main()
    monkeypatch.setattr(sys, "argv", common + ["--split", "val,test"])
    bts.main()
    from open_clip_cxr.eval import paired as P
    one, two = (P.reachable([(res["bow"], where) for res, where in d]) for d in seen)
    assert set(one) == set(two) and any(n for n, _ in one.values())
    for row, (n, _) in one.items():      # draws 0 and 1 of one split vs draw 0 of each split
        single = P.reachable([(seen[0][0][0]["bow"], seen[0][0][1])])[row][0]
        assert two[row][0] == 2 * single and n >= single
    out = capsys.readouterr().out
    assert "over 2 draws (suite seeds 0-0 on each of the validate + test splits, 8 reports)" in out
    keys = json.loads((tmp_path / "c.json").read_text())
    assert sum(k.startswith("validate:") for k in keys) == 2 and sum(k.startswith("test:") for k in keys) == 1
    monkeypatch.setattr(sys, "argv", common + ["--split", "validate,validation"])
    with pytest.raises(SystemExit) as e:
        bts.main()
    assert e.value.code == 2 and "at most once" in capsys.readouterr().err


def test_a_query_repeated_word_for_word_is_one_miss():
    """R@1 counts every query, but a (query, target) pair typed twice is one trial for the pairing:
    listing it twice would let one duplicated report look like a significant difference."""
    vec = {"a": [0, 0, 1.0], "b": [0, 1.0, 0], "x": [1.0, 0, 0], "y": [0, 1.0, 0], "z": [0, 0, 1.0]}
    emb = RB._Embedder(lambda texts: torch.tensor([vec[t] for t in texts]), list(vec))
    r1, misses = RB._r1(emb, ["a", "a", "b", "a"], ["x", "x", "y", "y"], ["x", "y", "z"])
    assert r1 == pytest.approx(1 / 4)            # a -> z: three misses of four queries
    assert misses == [0, 3]                      # the second (a, x) is the first one again


def test_sign_test_is_the_binomial_test():
    from open_clip_cxr.eval.paired import sign_test_p
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)
    stats = pytest.importorskip("scipy.stats")
    for n in range(1, 13):
        for k in range(n + 1):
            assert sign_test_p(k, n - k) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue)


def test_format_table_side_by_side():
    table = RB.format_table({"bow": run(RB.bow_encode_fn()), "const": run(lambda t: torch.ones(len(t), 3))})
    lines = table.splitlines()
    assert "bow" in lines[0] and "const" in lines[0]
    assert any(l.startswith("error discrimination [negation]") for l in lines)
    assert any("variant->original R@1 [reorder]" in l and "1.000" in l for l in lines)


def test_default_variants_module_runs_on_hand_written_reports():
    pytest.importorskip("open_clip_cxr.reports.variants")
    res = RB.run_robustness(REPORTS, RB.bow_encode_fn())
    assert res["n_reports"] == 4 and isinstance(res["variant_to_original"], dict)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no reports"):
        RB.run_robustness([Report("x", "t")], RB.bow_encode_fn(), variants_fn=lambda r: [], negatives_fn=lambda r: [])


def test_cli_text_robustness_with_baselines(tmp_path, monkeypatch, capsys):
    import argparse
    from open_clip_cxr.eval import cli
    monkeypatch.setattr(RB, "load_reports", lambda spec=None, split=None, limit=None: REPORTS)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--task", "text-robustness", "--baselines", "bow", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    res = json.load(open(tmp_path / "results.json"))["results"]
    assert res["by_model"]["bag-of-words"]["n_reports"] == 4
    assert "bag-of-words" in capsys.readouterr().out
    assert res["styles"] == "train" and list(res["by_protocol"]) == ["train"]


def test_cli_text_robustness_pairs_the_model_with_each_baseline(tmp_path, monkeypatch, capsys):
    """With --model and --baselines the task prints, per row, the items only the model gets right
    and those only each baseline gets right (a constant encoder: never the model)."""
    import argparse
    from open_clip_cxr.eval import cli
    monkeypatch.setattr(RB, "load_reports", lambda spec=None, split=None, limit=None: REPORTS)
    monkeypatch.setattr(cli, "load_model", lambda args: (object(), None, None))
    monkeypatch.setattr(RB, "openclip_encode_fn", lambda *a, **k: (lambda t: torch.ones(len(t), 3)))
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--task", "text-robustness", "--model", "const", "--baselines", "bow",
                         "--out", str(tmp_path)])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "const paired with the baselines" in out and "vs bag-of-words" in out
    res = json.load(open(tmp_path / "results.json"))["results"]["by_model"]
    from open_clip_cxr.eval.paired import format_p, sign_test_p
    ed = res["bag-of-words"]["error_discrimination"]
    n_bow_right = ed["n"] - len(ed["misses"])
    line = [l for l in out.splitlines() if l.startswith("error discrimination (all types)")][-1]   # the paired table's
    assert line.endswith(f"0 / {n_bow_right} ({format_p(sign_test_p(0, n_bow_right))})")


def test_cli_text_robustness_over_draws(tmp_path, monkeypatch, capsys):
    """--draws 2: each seed's suite is kept and printed, then the model is paired with the
    baseline over both draws report by report."""
    import argparse
    from open_clip_cxr.eval import cli
    monkeypatch.setattr(RB, "load_reports", lambda spec=None, split=None, limit=None: REPORTS)
    monkeypatch.setattr(cli, "load_model", lambda args: (object(), None, None))
    monkeypatch.setattr(RB, "openclip_encode_fn", lambda *a, **k: (lambda t: torch.ones(len(t), 3)))
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--task", "text-robustness", "--model", "const", "--baselines", "bow", "--styles",
                         "heldout", "--draws", "2", "--seed", "3", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "== heldout styles, seed 3" in out and "== heldout styles, seed 4" in out
    assert "== heldout styles over 2 draws" in out and "const over 2 draws" in out
    res = json.load(open(tmp_path / "results.json"))["results"]
    assert sorted(res["by_seed"]) == ["3", "4"] and res["by_protocol"] == res["by_seed"]["3"]
    def missed(name):
        return [set(res["by_seed"][s]["heldout"][name]["error_discrimination"]["misses"]) for s in ("3", "4")]
    # the constant model fails every probed report on both draws; bow wins those it passes on either draw
    won = set.union(*missed("const")) - set.intersection(*missed("bag-of-words"))
    line = [l for l in out.splitlines() if l.startswith("error discrimination (all types)")][-1]
    assert f"0 / {len(won)} " in line and won
    # four reports: no model could beat the bag of words at p < 0.05 on any row
    assert "rows where no model can beat a baseline at p < 0.05 over 2 draw(s)" in out
    assert "error discrimination (all types): bag-of-words misses" in out
    args.draws = 0
    with pytest.raises(SystemExit, match="--draws 0"):
        cli.run_text_robustness(args, None, None, None)


def test_cli_text_robustness_pools_splits(tmp_path, monkeypatch, capsys):
    """--reports-split validate,test: each split is its own gallery, then the model is paired with the
    baseline over both, the same four reports served as both splits counting as eight."""
    import argparse
    from open_clip_cxr.eval import cli
    asked = []
    monkeypatch.setattr(RB, "load_reports", lambda spec=None, split=None, limit=None: asked.append(split) or REPORTS)
    monkeypatch.setattr(cli, "load_model", lambda args: (object(), None, None))
    monkeypatch.setattr(RB, "openclip_encode_fn", lambda *a, **k: (lambda t: torch.ones(len(t), 3)))
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--task", "text-robustness", "--model", "const", "--baselines", "bow", "--styles",
                         "heldout", "--reports-split", "val,test", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    assert asked == ["validate", "test"]
    out = capsys.readouterr().out
    assert "== heldout styles, validate split" in out and "== heldout styles, test split" in out
    assert "== heldout styles over 1 draws of 2 splits (8 reports)" in out
    res = json.load(open(tmp_path / "results.json"))["results"]
    assert sorted(res["by_split"]) == ["test", "validate"]
    ed = res["by_split"]["test"]["0"]["heldout"]["bag-of-words"]["error_discrimination"]
    bow_right = ed["n"] - len(ed["misses"])     # the constant model fails all; bow wins these, once per split
    line = [l for l in out.splitlines() if l.startswith("error discrimination (all types)")][-1]
    assert f"0 / {2 * bow_right} " in line and bow_right
    args.reports_split = "test,testing"
    with pytest.raises(SystemExit, match="at most once"):
        cli.run_text_robustness(args, None, None, None)
    monkeypatch.setattr(RB, "load_reports", lambda spec=None, split=None, limit=None: REPORTS if split == "test" else [])
    args.reports_split = "test,holdout"
    with pytest.raises(SystemExit, match="no reports in split 'holdout'"):
        cli.run_text_robustness(args, None, None, None)


def test_cli_text_robustness_styles_both(tmp_path, monkeypatch, capsys):
    import argparse
    from open_clip_cxr.eval import cli
    monkeypatch.setattr(RB, "openi_reports", lambda split=None, limit=None: REPORTS)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--task", "text-robustness", "--baselines", "bow", "--styles", "both", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    res = json.load(open(tmp_path / "results.json"))["results"]
    assert list(res["by_protocol"]) == ["train", "heldout"]
    held = res["by_protocol"]["heldout"]["bag-of-words"]
    assert held["styles"] == "heldout" and res["by_model"]["bag-of-words"]["styles"] == "train"
    assert any(s in held["variant_to_original"] for s in ("caps_headers", "typos", "numbered_list"))
    out = capsys.readouterr().out
    assert "== train styles" in out and "== heldout styles" in out
    with pytest.raises(SystemExit):
        p.parse_args(["--task", "text-robustness", "--styles", "unseen"])


@pytest.mark.slow
def test_open_i_test_split_at_run_time():
    """Open-I reports are read from the torchxrayvision wheel when the test runs; nothing is stored."""
    try:
        reports = RB.openi_reports("test", limit=60)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(reports) == 60 and all(r.split == "test" for r in reports)
    res = RB.run_robustness(reports, RB.bow_encode_fn())
    assert res["n_reports"] == 60 and res["variant_to_original_mean_R@1"] > 0.5


def test_embedder_in_length_chunks_keeps_each_text_its_own_row():
    texts = ["a b", "a much longer text here", "c", "a b", "mid length one", "x y z w"]
    calls = []

    def enc(batch):
        calls.append(len(batch))
        return RB.bow_encode_fn(64)(batch)
    emb = RB._Embedder(enc, texts, progress="test", chunk=2)
    assert calls == [2, 2, 1]   # 5 distinct texts in chunks of 2
    assert torch.allclose(emb(texts), RB.bow_encode_fn(64)(texts))


def test_originals_typed_alike_up_to_doubled_periods_are_one_gallery_item():
    """Open-I holds "No acute findings.." beside "No acute findings.": a rewrite of either may
    retrieve either; reports that differ in a word stay two items."""
    twins = [Report("a", "test", findings="Heart normal. Lungs clear.", impression="No acute findings.."),
             Report("b", "test", findings="Heart normal. Lungs clear.", impression="No acute findings."),
             Report("c", "test", findings="Heart normal. Lungs clear.", impression="No acute disease.")]
    q = {"a": "Heart is normal. Lungs are clear.\nNo acute findings.", "b": "Heart is normal. Lungs are clear.\n"
         "There are no acute findings.", "c": "Heart is normal. Lungs are clear.\nNo acute disease."}
    variants = lambda r: [Variant(q[r.study_id], "rephrase", True)]  # noqa: E731
    # every text lands on b's original except c's query and original: a's query still scores
    b_text, c_text = RB.original_text(twins[1]), RB.original_text(twins[2])

    def enc(texts):
        return torch.stack([torch.tensor([0.0, 1.0]) if t in (q["c"], c_text) else torch.tensor([1.0, 0.0])
                            if t in (q["a"], q["b"], b_text) else torch.tensor([0.7, 0.7]) for t in texts])
    res = RB.run_robustness(twins, enc, variants_fn=variants, negatives_fn=lambda r: [])
    assert res["variant_to_original"]["rephrase"]["R@1"] == 1.0
    assert RB.same_report_key("No acute findings..  ") == RB.same_report_key("No acute findings.")
    assert RB.same_report_key("No acute findings.") != RB.same_report_key("No acute disease.")


def test_error_copy_gallery_needs_the_findings_to_match_not_just_the_words():
    """The error-copy gallery holds every report's one-error copies beside the originals: an
    encoder that reads words but not what they say (here: blind to "no", "left" and "right")
    finds the right report in the plain gallery and loses it to its one-error copy in this one."""
    blind_to = {"no", "left", "right", "lt"}

    def words_only(texts):
        return RB.bow_encode_fn(dim=512)([" ".join(w for w in t.lower().replace(".", " ").split()
                                                   if w not in blind_to) for t in texts])
    res = run(words_only)
    plain, near = res["variant_to_original"], res["error_copy_gallery"]
    assert set(near) == set(plain)
    assert plain["abbreviate"]["R@1"] == 1.0                # r2 "lt" -> r2, the only report with its words
    assert near["abbreviate"]["R@1"] == 0.0                 # tied with its laterality copy: ties count against
    assert near["abbreviate"]["misses"] == [0]
    assert near["reorder"]["n"] == plain["reorder"]["n"] == 2
    assert res["error_copy_gallery_mean_R@1"] < res["variant_to_original_mean_R@1"]
    flat = RB._flatten(res)
    assert flat["error-copy gallery R@1 [abbreviate]"] == 0.0
    # the row pairs like any other, and the bench counts its items
    from open_clip_cxr.eval import paired as P
    bow = run(RB.bow_encode_fn())
    assert bow["error_copy_gallery"]["abbreviate"]["R@1"] == 1.0   # bag of words sees "left" vs "right"
    assert P.paired_rows(bow, res)["error-copy gallery R@1 [abbreviate]"] == (1, 0, 1.0)
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "bts", pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_text_stage.py")
    bts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bts)
    assert bts.row_count(res, "error-copy gallery R@1 [reorder]") == 2
