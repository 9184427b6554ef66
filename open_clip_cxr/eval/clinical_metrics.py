"""RadGraph-F1 and CheXbert-F1, the clinical metrics CXR report papers give beside GREEN (optional).

Both run the packages their authors publish, `radgraph` (Jain et al.; Delbrouck et al.) and
`f1chexbert` (Smit et al.'s CheXbert labeler), on weights that must already be on this machine:
these packages download into their own cache folders on first use, which an offline machine
cannot do. `check_radgraph` / `check_chexbert` say, before any model is built, what is missing
and where it is expected; nothing here stands in for a missing model.
"""
import os
from typing import Optional, Sequence

RADGRAPH_TYPES = ("radgraph", "radgraph-xl", "modern-radgraph-xl")


class MetricUnavailableError(FileNotFoundError):
    """An optional metric's package or weights are not on this machine (the message says which, and the fix)."""


def _hf_cached(repo_id: str) -> bool:
    """Is a hub model's config in the local Hugging Face cache (no network)?"""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str) and os.path.exists(hit)


def check_radgraph(model_type: str = "radgraph", model_cache_dir: Optional[str] = None) -> str:
    """The folder holding the RadGraph model; MetricUnavailableError when it (or its encoder) is missing."""
    if model_type not in RADGRAPH_TYPES:
        raise MetricUnavailableError(f"unknown RadGraph model {model_type!r}; use one of {', '.join(RADGRAPH_TYPES)}")
    try:
        import radgraph.radgraph as rg
    except Exception as e:   # noqa: BLE001  (an incompatible install fails in many ways)
        raise MetricUnavailableError(f"RadGraph-F1 needs the `radgraph` package, which does not import here "
                                     f"({type(e).__name__}: {e}); pip install radgraph") from e
    folder = os.path.join(model_cache_dir or rg.CACHE_DIR, model_type)
    if not os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(os.path.join(folder, "weights.th")):
        raise MetricUnavailableError(
            f"RadGraph-F1: no {model_type} weights in {folder} (config.json, weights.th, vocabulary/), and they "
            f"cannot be downloaded offline; unpack {rg.MODEL_MAPPING[model_type]} from the hub repo "
            "StanfordAIMI/RRG_scorers there on a connected machine")
    import json
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    encoder = cfg.get("model", {}).get("embedder", {}).get("token_embedders", {}).get("bert", {}).get("model_name")
    if encoder and not os.path.isdir(encoder) and not _hf_cached(encoder):
        raise MetricUnavailableError(f"RadGraph-F1: its encoder {encoder!r} is not in the Hugging Face cache; "
                                     f"download it on a connected machine (huggingface-cli download {encoder})")
    return folder


def radgraph_f1(candidates: Sequence[str], references: Sequence[str], model_type: str = "radgraph",
                model_cache_dir: Optional[str] = None, device: str = "cpu") -> dict:
    """Mean RadGraph F1 at the package's three reward levels (simple, partial, complete)."""
    check_radgraph(model_type, model_cache_dir)
    from radgraph import F1RadGraph
    cuda = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else -1)
    scorer = F1RadGraph(reward_level="all", model_type=model_type, model_cache_dir=model_cache_dir, cuda=cuda)
    mean, per, _, _ = scorer(refs=list(references), hyps=list(candidates))
    return {"RadGraph-F1-simple": float(mean[0]), "RadGraph-F1-partial": float(mean[1]),
            "RadGraph-F1-complete": float(mean[2]), "RadGraph-model": model_type,
            "per_pair_partial": [float(x) for x in per[1]]}


def check_chexbert() -> str:
    """The CheXbert checkpoint path; MetricUnavailableError when it or the BERT tokenizer is missing."""
    try:
        import f1chexbert.f1chexbert as fc
    except Exception as e:   # noqa: BLE001
        raise MetricUnavailableError(f"CheXbert-F1 needs the `f1chexbert` package, which does not import here "
                                     f"({type(e).__name__}: {e}); pip install f1chexbert") from e
    ckpt = os.path.join(fc.CACHE_DIR, "chexbert.pth")
    if not os.path.isfile(ckpt):
        raise MetricUnavailableError(f"CheXbert-F1: no CheXbert weights at {ckpt}, and they cannot be downloaded "
                                     "offline; copy chexbert.pth from the hub repo StanfordAIMI/RRG_scorers there")
    if not _hf_cached("bert-base-uncased"):
        raise MetricUnavailableError("CheXbert-F1: the bert-base-uncased tokenizer and config are not in the Hugging "
                                     "Face cache; huggingface-cli download bert-base-uncased on a connected machine")
    return ckpt


def chexbert_f1(candidates: Sequence[str], references: Sequence[str], device: str = "cpu") -> dict:
    """CheXbert-labelled F1 of candidates against references: micro/macro over the 14 observations and
    over the 5 common ones (cardiomegaly, edema, consolidation, atelectasis, pleural effusion)."""
    check_chexbert()
    from f1chexbert import F1CheXbert
    scorer = F1CheXbert(device=device)
    accuracy, _, cr14, cr5 = scorer(hyps=list(candidates), refs=list(references))
    return {"CheXbert-F1-micro-14": float(cr14["micro avg"]["f1-score"]),
            "CheXbert-F1-macro-14": float(cr14["macro avg"]["f1-score"]),
            "CheXbert-F1-micro-5": float(cr5["micro avg"]["f1-score"]),
            "CheXbert-F1-macro-5": float(cr5["macro avg"]["f1-score"]),
            "CheXbert-accuracy-5": float(accuracy)}
