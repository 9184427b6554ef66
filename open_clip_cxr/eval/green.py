"""GREEN (Ostmeier et al., 2024): an LLM judge counts a candidate report's errors against a reference.

The judge answers in a fixed format (see `GREEN_PROMPT`); `parse_green` reads the counts of
clinically significant / insignificant errors in six categories (a)-(f) and the number of
matched findings, and `green_score` = matched / (matched + significant errors).

0/0: as in the GREEN authors' reference scorer, a response with no matched finding scores 0,
also when it lists no error (both reports empty of findings). An output that cannot be parsed
gets no score at all: it is counted apart (``n_unparsed``), never averaged in as a zero.
"""
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

DEFAULT_JUDGE = "StanfordAIMI/GREEN-radllama2-7b"
CATEGORIES = ("a", "b", "c", "d", "e", "f")
CATEGORY_NAMES = {
    "a": "False report of a finding in the candidate",
    "b": "Missing a finding present in the reference",
    "c": "Misidentification of a finding's anatomic location/position",
    "d": "Misassessment of the severity of a finding",
    "e": "Mentioning a comparison that isn't in the reference",
    "f": "Omitting a comparison detailing a change from a prior study",
}

GREEN_PROMPT = """Objective: Evaluate the accuracy of a candidate radiology report in comparison to a reference radiology report composed by expert radiologists.

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


def make_prompt(reference: str, candidate: str) -> str:
    """The GREEN judge's prompt for one (reference, candidate) pair."""
    return GREEN_PROMPT.format(reference=reference.strip(), candidate=candidate.strip())


# ------------------------------------------------------------------ parsing

_SECTIONS = {
    "explanation": r"explanation",
    "significant": r"clinically\s+significant\s+errors?",
    "insignificant": r"clinically\s+insignificant\s+errors?",
    "matched": r"matched\s+findings?",
}
# a header starts a line, may be bold/markdown/bracketed, and ends with a colon or a bracket
_HEADER = re.compile(r"^[ \t>#*_-]*\[?\s*(?P<name>" + "|".join(f"(?P<{k}>{v})" for k, v in _SECTIONS.items())
                     + r")\s*\]?[ \t*_]*(?::|(?<=\])|$)", re.IGNORECASE | re.MULTILINE)
_WORDS = {"no": 0, "none": 0, "zero": 0, "nil": 0, "n/a": 0, "na": 0, "one": 1, "two": 2, "three": 3, "four": 4,
          "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_COUNT = r"(\d+|" + "|".join(re.escape(w) for w in sorted(_WORDS, key=len, reverse=True)) + r")\b"
# "(a) label: N" at a line start ("a)" and "a." too), or "(a)" inside a line when a judge puts all on one line
_CATEGORY_LINE = re.compile(r"(?:^[ \t*•-]*\(?\s*(?P<cat>[a-fA-F])\s*[).]|(?<=\s)\((?P<inline>[a-fA-F])\))"
                            r"[ \t]*(?P<label>[^:\n]{0,160}?)[ \t*]*:[ \t*]*(?P<count>" + _COUNT + r"|[^\n]*)",
                            re.MULTILINE)
_LEADING_COUNT = re.compile(r"^[\s*:#-]*" + _COUNT, re.IGNORECASE)
_NOTHING = re.compile(r"^[\s*:.-]*(none|no\b|nil|n/a|0\b|zero|not applicable)", re.IGNORECASE)


def _count(token: str) -> Optional[int]:
    token = token.strip().lower()
    if token.isdigit():
        return int(token)
    return _WORDS.get(token)


@dataclass
class GreenParse:
    """Counts read from one judge output; `ok` is False (with `error`) when it could not be read."""
    ok: bool
    significant: Dict[str, int] = field(default_factory=dict)
    insignificant: Optional[Dict[str, int]] = None
    matched: Optional[int] = None
    explanation: str = ""
    error: str = ""

    @property
    def n_significant(self) -> int:
        return sum(self.significant.values())


def _sections(text: str) -> Dict[str, str]:
    """Header name -> body (up to the next header); the first occurrence of each header wins."""
    hits = list(_HEADER.finditer(text))
    out: Dict[str, str] = {}
    for i, m in enumerate(hits):
        name = next(k for k in _SECTIONS if m.group(k))
        end = hits[i + 1].start() if i + 1 < len(hits) else len(text)
        out.setdefault(name, text[m.end():end])
    return out


def _category_counts(body: str):
    """({category: count}, error message or ""); categories the judge left out count 0."""
    counts = {c: 0 for c in CATEGORIES}
    lines = list(_CATEGORY_LINE.finditer(body))
    if not lines:
        if not body.strip() or _NOTHING.match(body):
            return counts, ""
        return counts, "no (a)-(f) category counts"
    seen = set()
    for m in lines:
        cat = (m.group("cat") or m.group("inline")).lower()
        if cat in seen:   # a second list (e.g. an echoed template) ends the first
            break
        seen.add(cat)
        lead = _LEADING_COUNT.match(m.group("count"))
        n = _count(lead.group(1)) if lead else None
        if n is None:
            return counts, f"category ({cat}) has no count: {m.group(0).strip()[:80]!r}"
        counts[cat] = n
    return counts, ""


def parse_green(text: str) -> GreenParse:
    """Read a GREEN-format judge output; tolerant of bold/markdown headers, missing brackets,
    word counts ("None", "two"), and omitted categories (counted 0)."""
    if not isinstance(text, str) or not text.strip():
        return GreenParse(False, error="empty output")
    sec = _sections(text)
    for needed in ("significant", "matched"):
        if needed not in sec:
            return GreenParse(False, explanation=sec.get("explanation", "").strip(),
                              error=f"no [{'Clinically Significant Errors' if needed == 'significant' else 'Matched Findings'}] section")
    sig, err = _category_counts(sec["significant"])
    if err:
        return GreenParse(False, error=f"clinically significant errors: {err}")
    insig = None
    if "insignificant" in sec:
        insig, err = _category_counts(sec["insignificant"])
        if err:
            return GreenParse(False, error=f"clinically insignificant errors: {err}")
    lead = _LEADING_COUNT.match(sec["matched"])
    matched = _count(lead.group(1)) if lead else (0 if _NOTHING.match(sec["matched"]) else None)
    if matched is None:
        return GreenParse(False, error=f"matched findings has no count: {sec['matched'].strip()[:80]!r}")
    return GreenParse(True, sig, insig, matched, sec.get("explanation", "").strip())


def green_score(parsed: GreenParse) -> Optional[float]:
    """matched / (matched + clinically significant errors); 0 when nothing matched; None if unparsed."""
    if not parsed.ok:
        return None
    if parsed.matched == 0:
        return 0.0
    return parsed.matched / (parsed.matched + parsed.n_significant)


def summarise(parses: Sequence[GreenParse]) -> dict:
    """Mean GREEN over parsed outputs, mean error counts per category, and how many failed to parse."""
    ok = [p for p in parses if p.ok]
    scores = [green_score(p) for p in ok]
    out = {"green": sum(scores) / len(scores) if scores else None, "n_scored": len(ok),
           "n_unparsed": len(parses) - len(ok),
           "mean_matched": sum(p.matched for p in ok) / len(ok) if ok else None,
           "mean_significant_errors": {c: sum(p.significant[c] for p in ok) / len(ok) if ok else None
                                       for c in CATEGORIES}}
    with_insig = [p for p in ok if p.insignificant is not None]
    out["mean_insignificant_errors"] = {c: sum(p.insignificant[c] for p in with_insig) / len(with_insig)
                                        if with_insig else None for c in CATEGORIES}
    return out


# ------------------------------------------------------------------ the judge

class GreenJudge:
    """Batched greedy generation with any local causal LM, cached on disk, scored with GREEN.

    `cache_path` (JSONL, one {"key", "output"} per line) makes long runs resumable: outputs
    already there are not generated again; the key hashes the judge's id, the prompt and
    `max_new_tokens`, so a different judge never reuses another's answers.
    """

    def __init__(self, model, tokenizer, batch_size: int = 4, max_new_tokens: int = 1024,
                 cache_path: Optional[str] = None, judge_id: Optional[str] = None, progress: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.cache_path, self.progress = cache_path, progress
        self.judge_id = judge_id or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self._cache: Dict[str, str] = self._load_cache()

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_JUDGE, device: str = "cpu", dtype=None, **kw) -> "GreenJudge":
        """Load a local or cached judge (the default is GREEN's 7B model; nothing small ships it)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        load_kw = {k: kw.pop(k) for k in ("gguf_file",) if k in kw}
        load_kw["trust_remote_code"] = False  # a judge folder's custom code is never run
        tok = AutoTokenizer.from_pretrained(model_id, **load_kw)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **load_kw).to(device).eval()
        return cls(model, tok, judge_id=kw.pop("judge_id", model_id), **kw)

    # -- cache
    def _key(self, prompt: str) -> str:
        raw = json.dumps([self.judge_id, self.max_new_tokens, prompt])
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
    def _chat(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return prompt

    def _generate_batch(self, prompts: List[str]) -> List[str]:
        import torch
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"   # decoder-only: pad on the left so every row ends where generation starts
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        try:
            texts = [self._chat(p) for p in prompts]
            templated = bool(getattr(tok, "chat_template", None))
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return tok.batch_decode(new, skip_special_tokens=True)

    def generate(self, prompts: Sequence[str]) -> List[str]:
        """Judge outputs for `prompts`, from the cache where present."""
        keys = [self._key(p) for p in prompts]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values(),
                      key=lambda i: len(prompts[i]))   # similar lengths batch with less padding
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
        """{"summary": ..., "per_report": [{score, matched, significant, insignificant, parsed, error, output}]}."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        outputs = self.generate([make_prompt(r, c) for r, c in zip(references, candidates)])
        parses = [parse_green(o) for o in outputs]
        per = []
        for p, o in zip(parses, outputs):
            rec = asdict(p)
            rec.pop("explanation")
            rec["parsed"] = rec.pop("ok")
            rec["score"] = green_score(p)
            rec["output"] = o
            per.append(rec)
        summary = summarise(parses)
        summary["judge"] = self.judge_id
        return {"summary": summary, "per_report": per}
