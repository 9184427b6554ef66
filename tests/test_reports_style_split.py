"""The style split (train / held-out rule entries) and the held-out rewrites of `reports.noise`."""
import random
import re

import pytest

from open_clip_cxr.eval import robustness as RB
from open_clip_cxr.reports import noise
from open_clip_cxr.reports.lexicon import LEXICON, abbreviate, entries, expand
from open_clip_cxr.reports.mentions import mention_keys
from open_clip_cxr.reports.negatives import ERROR_TYPES, _AFFIRM_TEMPLATES, _INSERTIONS, _NEGATE_TEMPLATES, hard_negatives
from open_clip_cxr.reports.style_split import part_of
from open_clip_cxr.reports.types import Report
from open_clip_cxr.reports.variants import equivalent_variants, synonym_names

REPORTS = [
    Report("a", "test", findings="There is a small right pleural effusion. No pneumothorax. Heart size is normal.",
           impression="Small right pleural effusion."),
    Report("b", "test", findings="Right lower lobe consolidation. The lungs are otherwise clear. No effusion.",
           impression="Right lower lobe pneumonia. Follow-up radiograph recommended."),
    Report("c", "test", findings="Status post coronary artery bypass graft. Moderate cardiomegaly. Mild pulmonary "
           "edema. Bilateral pleural effusions, left larger than right.", impression="Congestive heart failure."),
    Report("d", "test", findings="The cardiomediastinal silhouette is within normal limits. The lungs are clear. "
           "No pleural effusion or pneumothorax. Degenerative changes of the thoracic spine.",
           impression="No acute cardiopulmonary abnormality."),
    Report("e", "test", findings="Endotracheal tube terminates 4 cm above the carina. Nasogastric tube in the "
           "stomach. Left lower lobe atelectasis.", impression="Lines and tubes as above. Left lower lobe atelectasis."),
]


def test_split_is_deterministic_and_both_parts_are_used():
    assert part_of("lexicon", "pneumothorax") == part_of("lexicon", "pneumothorax")
    train, held = entries("train"), entries("heldout")
    assert train and held and len(train) + len(held) == len(LEXICON)
    assert not {e.long for e in train} & {e.long for e in held}
    assert synonym_names("train") and synonym_names("heldout")
    for table, keys in (("negate_template", _NEGATE_TEMPLATES), ("affirm_template", _AFFIRM_TEMPLATES),
                        ("insertion", [p[1] for p in _INSERTIONS])):
        parts = {part_of(table, k) for k in keys}
        assert parts == {"train", "heldout"}, table
    with pytest.raises(ValueError):
        abbreviate("pneumothorax", part="validation")


def test_abbreviate_uses_only_its_part():
    held_short = {s for e in entries("heldout") for s in e.short}
    train_short = {s for e in entries("train") for s in e.short}
    text = " ".join(f"{e.long}." for e in LEXICON if not e.context)
    for seed in range(5):
        out = abbreviate(text, random.Random(seed), p=1.0, part="train")
        words = set(re.findall(r"[\w/.-]+", out))
        assert not (words & (held_short - train_short)), words & held_short
        out = abbreviate(text, random.Random(seed), p=1.0, part="heldout")
        assert set(re.findall(r"[\w/.-]+", out)) & held_short
    # the mention checker reads every entry, whatever the part
    for e in LEXICON:
        if not e.context:
            assert expand(e.short[0]).lower() == e.long


def test_training_rewrites_never_use_heldout_negative_templates():
    held = [t for k, t in _NEGATE_TEMPLATES.items() if part_of("negate_template", k) == "heldout"]
    held_ins = [p[1] for p in _INSERTIONS if part_of("insertion", p[1]) == "heldout"]
    starts = [t.split("{")[0] for t in held if not t.startswith("{")]
    for r in REPORTS:
        for seed in range(4):
            for v in hard_negatives(r, seed, part="train"):
                assert not any(s in v.text for s in held_ins), v.text
                if v.error_type == "negation" and starts:
                    assert not any(v.text.count(s) > r.findings.count(s) + r.impression.count(s)
                                   for s in starts if s), v.text


def test_acronym_forms_and_typos():
    rng = random.Random(0)
    forms = {noise.acronym_form("RLL", rng) for _ in range(60)}
    assert {"R.L.L.", "r l l", "rll"} <= forms
    assert any(f.endswith("lower lobe") for f in forms)
    text = "No left pleural effusion. Mild cardiomegaly without pneumothorax."
    for seed in range(20):
        t = noise.typos(text, random.Random(seed))
        assert t != text
        # negation, side and severity words are never misspelt
        for w in ("No", "left", "Mild", "without"):
            assert w in t.split() or w + "." in t.split()
    assert noise.typos("No PTX.", random.Random(0)) is None


def test_heldout_variants_keep_the_findings():
    seen = set()
    for r in REPORTS:
        for v in noise.heldout_variants(r, seed=1):
            seen.add(v.style)
            assert v.equivalent and v.style in noise.HELDOUT_STYLES and v.text
            if v.style == "paraphrase_heldout":
                assert mention_keys(v.text) == mention_keys(r.findings + " " + r.impression)
    assert {"abbreviate_heldout", "typos", "caps_headers", "numbered_list", "telegraphic_impression",
            "hospital_mix"} <= seen
    caps = [v.text for v in noise.heldout_variants(REPORTS[0]) if v.style == "caps_headers"][0]
    assert caps.isupper() or caps.upper() == caps
    # the header lines alone (upper=False, as bench/bench_heldout_parts.py measures them): the same
    # lines, the sections in their own case
    secs = noise.report_sections(REPORTS[0])
    lines_only = noise.caps_headers(secs, random.Random(5), upper=False)
    assert lines_only.upper() == noise.caps_headers(secs, random.Random(5))
    assert all(sec in lines_only for sec in secs) and lines_only.count("\n") >= 2
    assert noise.heldout_variants(REPORTS[0], seed=3) == noise.heldout_variants(REPORTS[0], seed=3)
    # no held-out style is a training style
    assert not set(noise.HELDOUT_STYLES) & {v.style for r in REPORTS for v in equivalent_variants(r, part="train")}


def test_hospital_mix_parts_one_at_a_time():
    r = REPORTS[1]
    base = RB.original_text(r)
    rng = lambda: noise.rng_for(0, "heldout", "hospital_mix", base)  # noqa: E731
    full = [v.text for v in noise.heldout_variants(r, seed=0) if v.style == "hospital_mix"][0]
    assert noise.hospital_mix(r, rng()) == full            # all parts: the protocol's row
    assert noise.hospital_mix(r, rng(), ()) == base          # no part: the report itself
    assert noise.hospital_mix(r, rng(), ("headers",)).startswith(("EXAM", "EXAMINATION", "PROCEDURE", "STUDY"))
    tele = noise.hospital_mix(r, rng(), ("telegraphic",))
    assert tele == tele.lower() and ", " in tele
    assert noise.telegraphic("The lungs are clear. No effusion.", drop=False, lower=False) == "The lungs are clear, No effusion"
    assert noise.telegraphic("The lungs are clear. No effusion.", join=False) == "lungs clear. no effusion."


def test_suite_heldout_protocol_with_bag_of_words():
    res = RB.run_heldout(REPORTS, RB.bow_encode_fn())
    assert res["styles"] == "heldout"
    assert set(res["variant_to_original"]) <= set(noise.HELDOUT_STYLES)
    assert "abbreviate_heldout" in res["variant_to_original"]
    assert res["error_discrimination"]["n"] >= 3
    # caps under other headers: bag of words lower-cases, so it still finds the report
    assert res["variant_to_original"]["caps_headers"]["R@1"] == 1.0
    with pytest.raises(ValueError):
        RB.run_robustness(REPORTS, RB.bow_encode_fn(), styles="nope")


def test_protocol_fingerprint_follows_the_rewriters(monkeypatch):
    """The bench caches results under this hash: any change to a rewriter's output must change it."""
    import dataclasses
    fp = RB.protocol_fingerprint(REPORTS, styles="heldout")
    assert fp == RB.protocol_fingerprint(REPORTS, styles="heldout")
    assert fp != RB.protocol_fingerprint(REPORTS, styles="train")
    assert fp != RB.protocol_fingerprint(REPORTS, seed=1, styles="heldout")
    real = noise.heldout_variants

    def one_text_changed(r, seed=0):
        out = real(r, seed=seed)
        if r is REPORTS[-1]:
            out[0] = dataclasses.replace(out[0], text=out[0].text + " ")
        return out
    monkeypatch.setattr(noise, "heldout_variants", one_text_changed)
    assert RB.protocol_fingerprint(REPORTS, styles="heldout") != fp


def test_unshout_folds_all_caps_reports_only():
    assert noise.unshout("FINDINGS: NO PTX. SMALL RIGHT EFFUSION.") == "findings: no PTX. small right effusion."
    assert noise.unshout("No PTX. Small right effusion.") == "No PTX. Small right effusion."
    caps = [v.text for v in noise.heldout_variants(REPORTS[0]) if v.style == "caps_headers"][0]
    assert noise.unshout(caps).lower() == caps.lower() and not noise.unshout(caps).isupper()


def test_near_duplicate_r1_counts_a_near_copy_and_not_a_different_report(monkeypatch):
    import importlib.util as iu

    import torch
    monkeypatch.syspath_prepend("bench")     # the script imports bench_text_stage
    spec = iu.spec_from_file_location("bench_heldout_parts", "bench/bench_heldout_parts.py")
    parts = iu.module_from_spec(spec)
    spec.loader.exec_module(parts)
    a = "Heart size is normal and the lungs are clear."
    b = "Heart size is normal and lungs are clear."
    c = "Large right pleural effusion. Heart size is normal."
    assert parts.near_duplicate(a, b) and not parts.near_duplicate(a, c)
    # an embedder whose every query lands on b: a hit for a's query (near copy), a miss for c's
    emb = lambda texts: torch.stack([torch.tensor([1.0, 0.0]) if t in ("q", b) else torch.tensor([0.0, 1.0])
                                     for t in texts])  # noqa: E731
    assert parts.r1_near(emb, [("q", a), ("q", c)], [a, b, c]) == 0.5


def test_discrimination_failures_agree_with_the_suite(monkeypatch):
    """bench_discrimination_failures counts exactly the reports the suite's held-out probe fails."""
    import importlib.util as iu
    monkeypatch.syspath_prepend("bench")
    spec = iu.spec_from_file_location("bench_discrimination_failures", "bench/bench_discrimination_failures.py")
    bdf = iu.module_from_spec(spec)
    spec.loader.exec_module(bdf)
    n_failed = []
    for fn in (RB.bow_encode_fn(), RB.bow_encode_fn(dim=8)):    # dim 8: collisions, so some reports fail
        res = RB.run_heldout(REPORTS, fn)["error_discrimination"]
        inputs = bdf.probe_inputs(REPORTS)
        texts = inputs[0] + [v.text for vs in inputs[1] + inputs[2] for v in vs]
        failed, n = bdf.failures(RB._Embedder(fn, texts), inputs)
        assert n == res["n"] and 1 - len(failed) / n == pytest.approx(res["accuracy"])
        assert {t for _, beat in failed.values() for t in beat} <= set(ERROR_TYPES)
        n_failed.append(len(failed))
    assert max(n_failed) > 0     # the comparison saw failures, not only passes


def test_gallery_outrankers_agree_with_the_error_copy_gallery(monkeypatch):
    """`--gallery-style`: a query the suite's error-copy gallery misses has its original outranked by
    something the bench names (an own one-error copy or another report), and a hit by nothing."""
    import importlib.util as iu
    monkeypatch.syspath_prepend("bench")
    spec = iu.spec_from_file_location("bench_discrimination_failures", "bench/bench_discrimination_failures.py")
    bdf = iu.module_from_spec(spec)
    spec.loader.exec_module(bdf)
    fn = RB.bow_encode_fn(dim=16)          # collisions, so some queries miss
    res = RB.run_heldout(REPORTS, fn)["error_copy_gallery"]
    inputs = bdf.probe_inputs(REPORTS)
    emb = RB._Embedder(fn, inputs[0] + [v.text for vs in inputs[1] + inputs[2] for v in vs])
    for style, row in res.items():
        n, kinds = bdf.gallery_outrankers(emb, inputs, style)
        assert n == row["n"]
        assert (sum(kinds.values()) > 0) == (row["R@1"] < 1.0)
        assert all(k in ("another report", "another report's copy") or k.split(" ", 1)[1] in ERROR_TYPES
                   for k in kinds)
    assert any(r["R@1"] < 1.0 for r in res.values())


def test_paired_failures_fixed_and_broken(monkeypatch):
    """`--pair`: fixed / broken reports between two models, overall and per error type (the sign
    test on them: tests/test_eval_robustness.py)."""
    import importlib.util as iu
    monkeypatch.syspath_prepend("bench")
    spec = iu.spec_from_file_location("bench_discrimination_failures", "bench/bench_discrimination_failures.py")
    bdf = iu.module_from_spec(spec)
    spec.loader.exec_module(bdf)
    base = {1: ("typos", ["negation"]), 2: ("typos", ["laterality"]), 3: ("typos", ["laterality", "negation"])}
    change = {3: ("typos", ["negation"]), 4: ("typos", ["laterality"])}
    assert bdf.fixed_and_broken(base, change) == (2, 1)
    assert bdf.fixed_and_broken(base, change, "laterality") == (2, 1)   # 3 still fails, on negation only
    assert bdf.fixed_and_broken(base, change, "negation") == (1, 0)


def test_bench_columns_force_the_tokenizers_text_options(monkeypatch):
    """`bench_text_stage.py --fold-capitals lower` (column '<model>+lower') lower-cases every text
    for a cased tower, as a `lowercase: true` tower's tokenizer would; `--fold-capitals on|sentence`
    folds shouted texts; `--admin-lines drop|keep` ('+dropadmin' / '+keepadmin') forces
    `drop_admin_lines`."""
    import importlib.util as iu

    import torch
    monkeypatch.syspath_prepend("bench")
    spec = iu.spec_from_file_location("bench_text_stage", "bench/bench_text_stage.py")
    B = iu.module_from_spec(spec)
    spec.loader.exec_module(B)
    assert B._folder("runs/x+unshout+lower") == "runs/x"
    assert B._folder("runs/x+sentence") == "runs/x"
    mixed = ["Heart size is normal. No PTX in the RLL."]
    lower = [mixed[0].lower()]
    fn = B.column_encode_fn("cxr-llm-tiny", 0, 512, dtype=None, fold="lower")
    assert torch.allclose(fn(mixed), fn(lower))
    cased = B.column_encode_fn("cxr-llm-tiny", 0, 512, dtype=None)
    assert not torch.allclose(cased(mixed), cased(lower))
    # --fold-capitals on / sentence: a shouted text alone is folded, to lower / sentence case
    shout, sent = ["FINDINGS: NO PTX. HEART NORMAL."], ["Findings: No ptx. Heart normal."]
    off = B.column_encode_fn("cxr-llm-tiny", 0, 512, dtype=None, fold=False)
    on = B.column_encode_fn("cxr-llm-tiny", 0, 512, dtype=None, fold=True)
    by_sentence = B.column_encode_fn("cxr-llm-tiny", 0, 512, dtype=None, fold="sentence")
    assert torch.allclose(on(shout), off([shout[0].lower()]))
    assert torch.allclose(by_sentence(shout), off(sent)) and not torch.allclose(by_sentence(shout), on(shout))
    # --admin-lines drop / keep
    assert B._folder("runs/R0+sentence+dropadmin") == "runs/R0" and B._admin("runs/R0+keepadmin") is False
    assert B._admin("runs/R0+sentence") is None
    texts = ["EXAM: CHEST 2 VIEWS\nNo pneumothorax.", "No pneumothorax."]
    kept = B.column_encode_fn("cxr-llm-tiny", 0, 64, dtype=None, admin=False)(texts)
    dropped = B.column_encode_fn("cxr-llm-tiny", 0, 64, dtype=None, admin=True)(texts)
    assert torch.allclose(dropped[0], dropped[1]) and not torch.allclose(kept[0], kept[1])


def test_target_lines_carry_a_wilson_interval_of_the_rows_count(monkeypatch):
    import importlib.util as iu
    monkeypatch.syspath_prepend("bench")
    spec = iu.spec_from_file_location("bench_text_stage", "bench/bench_text_stage.py")
    bts = iu.module_from_spec(spec)
    spec.loader.exec_module(bts)
    lo, hi = bts.wilson_interval(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)      # the textbook value
    lo, hi = bts.wilson_interval(1.0, 50)
    assert hi == 1.0 and 0.92 < lo < 0.94                         # never past 1, unlike p +- 2 SE
    res = RB.run_heldout(REPORTS, RB.bow_encode_fn())
    assert bts.row_count(res, "error discrimination (all types)") == res["error_discrimination"]["n"]
    style = next(iter(res["variant_to_original"]))
    assert bts.row_count(res, f"variant->original R@1 [{style}]") == res["variant_to_original"][style]["n"]
    assert bts.row_count(res, "impression->findings R@1") is None
