"""GREEN (Ostmeier et al., 2024) as the authors' code computes it: prompt, chat text, generation, parse, score.

Written to give the numbers of Stanford-AIMI/GREEN's ``green_score`` package (green.py and
utils.py, read at commit d72c195) without importing it. What it reproduces:

- the prompt (`make_prompt`): GREEN's text with its 4-space indentation, each report cut to
  its first 300 whitespace-separated words and re-joined with single spaces;
- the chat text (`chat_text`): GREEN replaces the tokenizer's chat template with its own,
  renders ``[human: prompt, gpt: ""]`` with the generation prompt, which gives
  ``<|user|>\\n{prompt}{eos}\\n<|assistant|>\\n{eos}\\n<|assistant|>\\n``;
- tokenisation: the tokenizer's own special tokens (BOS for Llama) plus an EOS at the end (GREEN
  loads the tokenizer with ``add_eos_token=True``), at most 2048 tokens, left padding with EOS;
- generation: greedy, ``max_length=2048`` tokens in all (prompt included), EOS stops, batches of
  8 in input order, the model in float16 (GREEN's dtype; bfloat16 is offered);
- decoding: the whole sequence decoded with special tokens skipped, then GREEN's clean-up
  (`clean_response`: the text after ``[Explanation]:`` in the part after the last
  ``<|assistant|>``, ``</s>`` and ``<unk>`` removed);
- parsing (`parse_green`) and score (`green_score`): a section is the text after
  ``[<name>]:`` up to the first blank line; a section starting with "No" or missing counts 0;
  category lines ``(a) ...`` (or ``(1) ...``) count the first ``: N.`` on the line; matched
  findings are the leading ``N.``; GREEN = matched / (matched + significant errors), and 0
  when matched is 0. GREEN scores every output: one it cannot read scores 0 and is averaged in
  (``n_unparsed`` here only says how many lacked GREEN's sections);
- the summary (`summarise`): mean and population standard deviation of the scores, and per
  category the fraction of outputs with no clinically significant error of that kind.

Not reproduced: the summary's "representative error" sentences (GREEN clusters error sentences
with a sentence-transformers model and k-means) and multi-GPU splitting.
"""
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

DEFAULT_JUDGE = "StanfordAIMI/GREEN-radllama2-7b"
MAX_WORDS = 300          # words kept of each report in the prompt
MAX_LENGTH = 2048        # tokens of prompt + answer (GREEN's tokenizer truncation and generate max_length)
BATCH_SIZE = 8           # GREEN's batch size (greedy outputs can depend on the padding in a batch)
CATEGORIES = ("a", "b", "c", "d", "e", "f")
CATEGORY_NAMES = {
    "a": "False report of a finding in the candidate",
    "b": "Missing a finding present in the reference",
    "c": "Misidentification of a finding's anatomic location/position",
    "d": "Misassessment of the severity of a finding",
    "e": "Mentioning a comparison that isn't in the reference",
    "f": "Omitting a comparison detailing a change from a prior study",
}
# the column names of GREEN's results table: "(a) False report of a finding in the candidate", ...
CATEGORY_COLUMNS = {c: f"({c}) {n}" for c, n in CATEGORY_NAMES.items()}
SIGNIFICANT, INSIGNIFICANT, MATCHED = "Clinically Significant Errors", "Clinically Insignificant Errors", "Matched Findings"

# GREEN's prompt without its indentation; `make_prompt` indents every non-blank line after the
# first by four spaces, as the authors' f-string does.
_PROMPT_LINES = """Objective: Evaluate the accuracy of a candidate radiology report in comparison to a reference radiology report composed by expert radiologists.

Process Overview: You will be presented with:

1. The criteria for making a judgment.
2. The reference radiology report.
3. The candidate radiology report.
4. The desired format for your assessment.

1. Criteria for Judgment:

For each candidate report, determine:

The count of clinically significant errors.
The count of clinically insignificant errors.

Errors can fall into one of these categories:

a) False report of a finding in the candidate.
b) Missing a finding present in the reference.
c) Misidentification of a finding's anatomic location/position.
d) Misassessment of the severity of a finding.
e) Mentioning a comparison that isn't in the reference.
f) Omitting a comparison detailing a change from a prior study.
Note: Concentrate on the clinical findings rather than the report's writing style. Evaluate only the findings that appear in both reports.

2. Reference Report:
{reference}

3. Candidate Report:
{candidate}

4. Reporting Your Assessment:

Follow this specific format for your output, even if no errors are found:
```
[Explanation]:
<Explanation>

[Clinically Significant Errors]:
(a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>
....
(f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>

[Clinically Insignificant Errors]:
(a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>
....
(f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>

[Matched Findings]:
<The number of matched findings>. <Finding 1>; <Finding 2>; ...; <Finding n>
```
"""
_LINES = _PROMPT_LINES.split("\n")
GREEN_PROMPT = "\n".join([_LINES[0]] + [("    " + s) if s else s for s in _LINES[1:]])


def _first_words(text: str, n: int = MAX_WORDS) -> str:
    return " ".join(str(text).split()[:n])


def make_prompt(reference: str, candidate: str, max_words: int = MAX_WORDS) -> str:
    """GREEN's prompt for one pair: each report cut to `max_words` words, whitespace collapsed."""
    return GREEN_PROMPT.format(reference=_first_words(reference, max_words),
                               candidate=_first_words(candidate, max_words))


def chat_text(prompt: str, eos_token: str = "</s>") -> str:
    """What GREEN's own chat template renders for [human: prompt, gpt: ""] with the generation prompt."""
    return f"<|user|>\n{prompt}{eos_token}\n<|assistant|>\n{eos_token}\n<|assistant|>\n"


_ECHOED_TEMPLATE = "[Explanation]:\n    <Explanation>\n"   # the prompt's own format block, echoed


def clean_response(text: str) -> str:
    """GREEN's clean-up of a decoded sequence (prompt and answer): keep the answer after [Explanation]:."""
    tag = "[Explanation]:"
    if tag in text:
        text = text.rsplit("<|assistant|>", 1)[-1]
        parts = text.split(tag)
        # GREEN takes the first split when the template block is there and the last otherwise;
        # with no tag left after the cut it keeps the whole answer
        if len(parts) > 1:
            text = parts[1] if _ECHOED_TEMPLATE in text else parts[-1]
    text = text.rsplit("<|assistant|>", 1)[-1]
    return text.replace("</s>", "").replace("<unk>", "")


# ------------------------------------------------------------------ parsing

def _section(text: str, name: str) -> Optional[str]:
    """The text after the first "[name]:" (and the whitespace after it) up to the first blank line."""
    m = re.search(r"\[" + re.escape(name) + r"\]:\s*", text)
    if m is None:
        return None
    rest = text[m.end():]
    blank = re.search(r"\n\s*\n", rest)
    return rest[:blank.start()] if blank else rest


_LETTER_LINE = re.compile(r"\([a-f]\) [^\n]*")     # from "(x) " to the end of its line
_NUMBER_LINE = re.compile(r"\([1-6]\) [^\n]*")     # GREEN's fallback when no lettered line is there
_LINE_COUNT = re.compile(r": (\d+)\.")             # "…: 2." — the first one on the line


def _category_lines(body: str) -> Dict[str, List[str]]:
    """Category -> its lines, in sorted order (GREEN sorts them; the last line with a count wins)."""
    lines = sorted(_LETTER_LINE.findall(body))
    keys = {f"({c}) ": c for c in CATEGORIES}
    if not lines:
        lines = sorted(_NUMBER_LINE.findall(body))
        keys = {f"({i + 1}) ": c for i, c in enumerate(CATEGORIES)}
    out: Dict[str, List[str]] = {c: [] for c in CATEGORIES}
    for line in lines:
        for prefix, c in keys.items():
            if line.startswith(prefix):
                out[c].append(line)
    return out


def _category_counts(body: Optional[str]) -> Dict[str, int]:
    counts = {c: 0 for c in CATEGORIES}
    if body is None or body.startswith("No"):
        return counts
    for c, lines in _category_lines(body).items():
        for line in lines:
            m = _LINE_COUNT.search(line)
            if m:
                counts[c] = int(m.group(1))
    return counts


def _error_sentences(body: Optional[str]) -> Dict[str, List[str]]:
    """Per category, the ';'-separated items after "N." (GREEN's parse_error_sentences)."""
    out: Dict[str, List[str]] = {c: [] for c in CATEGORIES}
    if body is None or body.startswith("No"):
        return out
    for c, lines in _category_lines(body).items():
        for line in lines:
            after_colon = line.rsplit(":", 1)[-1]
            out[c] = after_colon.split(".", 1)[-1].split(";")
    return out


def _matched_count(body: Optional[str]) -> int:
    if body is None or body.startswith("No"):
        return 0
    m = re.match(r"(\d+)\.", body)
    return int(m.group(1)) if m else 0


@dataclass
class GreenParse:
    """Counts GREEN's parser reads from one judge output (missing parts count 0, as in GREEN)."""
    significant: Dict[str, int]
    insignificant: Dict[str, int]
    matched: int
    has_significant: bool        # a "[Clinically Significant Errors]:" section was there
    has_matched: bool            # a "[Matched Findings]:" section was there
    significant_sentences: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def n_significant(self) -> int:
        return sum(self.significant.values())

    @property
    def well_formed(self) -> bool:
        """Both sections the score needs were present (GREEN scores the output either way)."""
        return self.has_significant and self.has_matched


def parse_green(text: str) -> GreenParse:
    """Read a judge output the way GREEN's parse_error_counts does."""
    text = text if isinstance(text, str) else ""
    sig, insig, matched = _section(text, SIGNIFICANT), _section(text, INSIGNIFICANT), _section(text, MATCHED)
    return GreenParse(significant=_category_counts(sig), insignificant=_category_counts(insig),
                      matched=_matched_count(matched), has_significant=sig is not None,
                      has_matched=matched is not None, significant_sentences=_error_sentences(sig))


def green_score(parsed: GreenParse) -> float:
    """matched / (matched + clinically significant errors); 0 when nothing matched (GREEN's rule)."""
    if parsed.matched == 0:
        return 0.0
    return parsed.matched / (parsed.matched + parsed.n_significant)


def summarise(parses: Sequence[GreenParse]) -> dict:
    """GREEN's summary numbers: mean and (population) std of the scores, and per category the
    fraction of outputs without a clinically significant error of that kind; plus mean counts."""
    n = len(parses)
    scores = [green_score(p) for p in parses]
    mean = sum(scores) / n if n else None
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n) if n else None
    avg = lambda xs: sum(xs) / n if n else None   # noqa: E731
    return {
        "green": mean, "green_std": std, "n": n,
        "n_unparsed": sum(not p.well_formed for p in parses),
        "accuracy": {CATEGORY_COLUMNS[c]: avg([float(p.significant[c] == 0) for p in parses]) for c in CATEGORIES},
        "mean_matched": avg([p.matched for p in parses]),
        "mean_significant_errors": {c: avg([p.significant[c] for p in parses]) for c in CATEGORIES},
        "mean_insignificant_errors": {c: avg([p.insignificant[c] for p in parses]) for c in CATEGORIES},
    }


def per_report_record(output: str) -> dict:
    """One output's score and counts, keyed like GREEN's results table (plus our extras)."""
    p = parse_green(output)
    rec = {"green_score": green_score(p), **{CATEGORY_COLUMNS[c]: p.significant[c] for c in CATEGORIES},
           "Matched Findings": p.matched, "insignificant": dict(p.insignificant), "well_formed": p.well_formed}
    return rec


# ------------------------------------------------------------------ the judge

def encode_like_green(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH):
    """Token ids and mask as GREEN's tokenizer makes them: own special tokens, an EOS appended,
    right-truncated to `max_length` (keeping the EOS), padded on the left with EOS."""
    import torch
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the judge's tokenizer has no EOS token (GREEN appends it and pads with it)")
    pad = eos   # GREEN sets pad_token = eos_token, whatever the tokenizer had
    rows = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
        if len(ids) > max_length:
            ids = ids[:max_length - 1] + ids[-1:]
        rows.append(ids)
    n = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, mask


class GreenJudge:
    """GREEN's judge run over (reference, candidate) pairs, batched and cached on disk.

    `cache_path` (JSONL, one {"key", "output"} per line) makes long runs resumable: outputs
    already there are not generated again; the key hashes the judge's id, the prompt and the
    generation length, so a different judge never reuses another's answers. The cached output is
    the cleaned answer (what GREEN parses). `max_new_tokens=None` keeps GREEN's
    ``max_length=2048`` (prompt + answer); a number caps the answer instead (not GREEN's setting).
    """

    def __init__(self, model, tokenizer, batch_size: int = BATCH_SIZE, max_new_tokens: Optional[int] = None,
                 max_length: int = MAX_LENGTH, cache_path: Optional[str] = None, judge_id: Optional[str] = None,
                 progress: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.cache_path, self.progress = cache_path, progress
        self.judge_id = judge_id or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self._cache: Dict[str, str] = self._load_cache()

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_JUDGE, device: str = "cpu", dtype="float16", **kw) -> "GreenJudge":
        """Load a local or cached judge (default: GREEN's 7B model) in `dtype` (GREEN: float16); one that
        is not on this machine is one FileNotFoundError naming `label` (the option the user set)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        load_kw = {k: kw.pop(k) for k in ("gguf_file",) if k in kw}
        from open_clip_cxr.asset_packages import find_local_model
        where = find_local_model(model_id, load_kw.get("gguf_file"), kw.pop("label", "judge"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **load_kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, **load_kw)
        # the id as given names the judge in the cache keys, wherever it was found
        return cls(model.to(device).eval(), tok, judge_id=kw.pop("judge_id", model_id), **kw)

    # -- cache
    def _key(self, prompt: str) -> str:
        raw = json.dumps(["green-d72c195", self.judge_id, self.max_length, self.max_new_tokens, prompt])
        return hashlib.sha256(raw.encode()).hexdigest()

    def _load_cache(self) -> Dict[str, str]:
        cache: Dict[str, str] = {}
        if self.cache_path and os.path.exists(self.cache_path):
            with open(self.cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        cache[rec["key"]] = rec["output"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue   # a line cut short by an interrupted run: generate it again
        return cache

    def _store(self, pairs) -> None:
        if not self.cache_path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        with open(self.cache_path, "a", encoding="utf-8") as f:
            for key, output in pairs:
                f.write(json.dumps({"key": key, "output": output}) + "\n")

    # -- generation
    def _generate_batch(self, prompts: List[str]) -> List[str]:
        import torch
        tok = self.tokenizer
        eos = tok.eos_token or "</s>"
        input_ids, mask = encode_like_green(tok, [chat_text(p, eos) for p in prompts], self.max_length)
        device = next(self.model.parameters()).device
        pad = tok.eos_token_id   # GREEN pads with EOS
        length = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {"max_length": self.max_length}
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                      eos_token_id=tok.eos_token_id, pad_token_id=pad, do_sample=False,
                                      temperature=None, top_p=None, **length)
        texts = tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [clean_response(t) for t in texts]

    def generate(self, prompts: Sequence[str]) -> List[str]:
        """Cleaned judge answers for `prompts`, from the cache where present (batches in input order)."""
        keys = [self._key(p) for p in prompts]
        todo = list({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        starts = range(0, len(todo), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="GREEN judge", unit="batch")
        for s in starts:
            idx = todo[s:s + self.batch_size]
            outs = self._generate_batch([prompts[i] for i in idx])
            pairs = [(keys[i], o) for i, o in zip(idx, outs)]
            self._cache.update(pairs)
            self._store(pairs)
        return [self._cache[k] for k in keys]

    def __call__(self, references: Sequence[str], candidates: Sequence[str]) -> dict:
        """{"summary": GREEN's summary numbers, "per_report": [{green_score, (a)..(f), Matched Findings, output}]}."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        outputs = self.generate([make_prompt(r, c) for r, c in zip(references, candidates)])
        per = []
        for o in outputs:
            rec = per_report_record(o)
            rec["output"] = o
            per.append(rec)
        summary = summarise([parse_green(o) for o in outputs])
        summary["judge"] = self.judge_id
        return {"summary": summary, "per_report": per}
