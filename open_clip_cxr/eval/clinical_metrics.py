"""RadGraph-F1 and CheXbert-F1, the clinical metrics CXR report papers give beside GREEN (optional).

Both run the packages their authors publish, `radgraph` (Jain et al.; Delbrouck et al.) and
`f1chexbert` (Smit et al.'s CheXbert labeler), on weights that must already be on this machine:
these packages download into their own cache folders on first use, which an offline machine
cannot do. `check_radgraph` / `check_chexbert` say, before any model is built, what is missing
and where it is expected; nothing here stands in for a missing model.
"""
import os
from typing import Optional, Sequence

from open_clip_cxr.asset_packages import in_hf_cache

RADGRAPH_TYPES = ("radgraph", "radgraph-xl", "modern-radgraph-xl")


class MetricUnavailableError(FileNotFoundError):
    """An optional metric's package or weights are not on this machine (the message says which, and the fix)."""


def _package_cache(package: str, app: str) -> str:
    """The cache folder a package downloads into (`appdirs.user_cache_dir(app)`), found without
    importing the package (importing radgraph or f1chexbert takes seconds)."""
    import importlib.util
    if importlib.util.find_spec(package) is None:
        raise MetricUnavailableError(f"the `{package}` package is not installed; pip install {package} "
                                     "(or pip install open_clip_cxr[clinical])")
    from appdirs import user_cache_dir
    return user_cache_dir(app)


def _radgraph_folder(model_type: str, model_cache_dir: Optional[str]) -> str:
    if model_cache_dir is None:
        from importlib.metadata import version
        model_cache_dir = os.path.join(_package_cache("radgraph", "radgraph"), version("radgraph"))
    return os.path.join(model_cache_dir, model_type)


def check_radgraph(model_type: str = "radgraph", model_cache_dir: Optional[str] = None) -> str:
    """The folder holding the RadGraph model; MetricUnavailableError when it (or its encoder) is missing."""
    if model_type not in RADGRAPH_TYPES:
        raise MetricUnavailableError(f"unknown RadGraph model {model_type!r}; use one of {', '.join(RADGRAPH_TYPES)}")
    folder = _radgraph_folder(model_type, model_cache_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(os.path.join(folder, "weights.th")):
        raise MetricUnavailableError(
            f"RadGraph-F1: no {model_type} weights in {folder} (config.json, weights.th, vocabulary/), and they "
            f"cannot be downloaded offline; unpack {model_type}.tar.gz from the hub repo "
            "StanfordAIMI/RRG_scorers there on a connected machine")
    import json
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    encoder = cfg.get("model", {}).get("embedder", {}).get("token_embedders", {}).get("bert", {}).get("model_name")
    if encoder and not os.path.isdir(encoder) and not in_hf_cache(encoder):
        raise MetricUnavailableError(f"RadGraph-F1: its encoder {encoder!r} is not in the Hugging Face cache; "
                                     f"download it on a connected machine (huggingface-cli download {encoder})")
    return folder


def _import(package: str):
    import importlib
    try:
        return importlib.import_module(package)
    except Exception as e:   # noqa: BLE001  (an install that does not fit our pins fails in many ways)
        raise MetricUnavailableError(f"the `{package.split('.')[0]}` package does not import with this "
                                     f"environment's versions ({type(e).__name__}: {e})") from e


def radgraph_f1(candidates: Sequence[str], references: Sequence[str], model_type: str = "radgraph",
                model_cache_dir: Optional[str] = None, device: str = "cpu") -> dict:
    """Mean RadGraph F1 at the package's three reward levels (simple, partial, complete)."""
    check_radgraph(model_type, model_cache_dir)
    F1RadGraph = _import("radgraph").F1RadGraph
    cuda = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else -1)
    scorer = F1RadGraph(reward_level="all", model_type=model_type, model_cache_dir=model_cache_dir, cuda=cuda)
    mean, per, _, _ = scorer(refs=list(references), hyps=list(candidates))
    return {"RadGraph-F1-simple": float(mean[0]), "RadGraph-F1-partial": float(mean[1]),
            "RadGraph-F1-complete": float(mean[2]), "RadGraph-model": model_type,
            "per_pair_partial": [float(x) for x in per[1]]}


def check_chexbert(cache_dir: Optional[str] = None) -> str:
    """The CheXbert checkpoint path; MetricUnavailableError when it or the BERT tokenizer is missing."""
    ckpt = os.path.join(cache_dir or _package_cache("f1chexbert", "chexbert"), "chexbert.pth")
    if not os.path.isfile(ckpt):
        raise MetricUnavailableError(f"CheXbert-F1: no CheXbert weights at {ckpt}, and they cannot be downloaded "
                                     "offline; copy chexbert.pth from the hub repo StanfordAIMI/RRG_scorers there")
    if not in_hf_cache("bert-base-uncased"):
        raise MetricUnavailableError("CheXbert-F1: the bert-base-uncased tokenizer and config are not in the Hugging "
                                     "Face cache; huggingface-cli download bert-base-uncased on a connected machine")
    return ckpt


def chexbert_f1(candidates: Sequence[str], references: Sequence[str], device: str = "cpu") -> dict:
    """CheXbert-labelled F1 of candidates against references: micro/macro over the 14 observations and
    over the 5 common ones (cardiomegaly, edema, consolidation, atelectasis, pleural effusion)."""
    check_chexbert()
    F1CheXbert = _import("f1chexbert").F1CheXbert
    scorer = F1CheXbert(device=device)
    accuracy, _, cr14, cr5 = scorer(hyps=list(candidates), refs=list(references))
    return {"CheXbert-F1-micro-14": float(cr14["micro avg"]["f1-score"]),
            "CheXbert-F1-macro-14": float(cr14["macro avg"]["f1-score"]),
            "CheXbert-F1-micro-5": float(cr5["micro avg"]["f1-score"]),
            "CheXbert-F1-macro-5": float(cr5["macro avg"]["f1-score"]),
            "CheXbert-accuracy-5": float(accuracy)}
