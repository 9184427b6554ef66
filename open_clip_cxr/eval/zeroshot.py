"""Zero-shot finding classification from image-text similarity, scored by AUC (sklearn) and accuracy.

Each finding has a few positive and a few negative phrasings; the phrasings of one side are
embedded, averaged and re-normalised (a prompt ensemble), and an image's probability of the
finding is the softmax over its (positive, negative) similarities, scaled by the model's
logit scale. Labels come from shard metadata: 1 positive, 0 negative, -1 (uncertain), NaN or
missing are left out of that finding's scores. The classes are CheXpert's 14 with built-in prompts,
or any labels (`select_prompts`) with prompts from a YAML file (`load_prompts`).
"""
import math
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

# CheXpert's 14 observations: (positive phrasings, negative phrasings), written as reports word them.
PROMPTS: Dict[str, Tuple[List[str], List[str]]] = {
    "Atelectasis": (["There is atelectasis.", "Bibasilar atelectasis is present.", "Findings consistent with subsegmental atelectasis."],
                    ["There is no atelectasis.", "No evidence of atelectasis.", "The lungs are well expanded without atelectasis."]),
    "Cardiomegaly": (["The heart is enlarged.", "There is cardiomegaly.", "Moderate enlargement of the cardiac silhouette."],
                     ["The heart size is normal.", "No cardiomegaly.", "The cardiac silhouette is within normal limits."]),
    "Consolidation": (["There is consolidation.", "Focal consolidation is present in the lung.", "Dense airspace consolidation."],
                      ["There is no consolidation.", "No focal consolidation.", "The lungs are clear without consolidation."]),
    "Edema": (["There is pulmonary edema.", "Findings consistent with pulmonary edema.", "Interstitial edema with vascular congestion."],
              ["There is no pulmonary edema.", "No evidence of edema.", "No vascular congestion or edema."]),
    "Pleural Effusion": (["There is a pleural effusion.", "Small bilateral pleural effusions.", "A pleural effusion is present."],
                         ["There is no pleural effusion.", "No pleural effusions.", "The costophrenic angles are sharp without effusion."]),
    "Pneumonia": (["There is pneumonia.", "Findings concerning for pneumonia.", "Airspace opacity consistent with pneumonia."],
                  ["There is no pneumonia.", "No evidence of pneumonia.", "No findings to suggest pneumonia."]),
    "Pneumothorax": (["There is a pneumothorax.", "A small pneumothorax is present.", "Findings consistent with pneumothorax."],
                     ["There is no pneumothorax.", "No pneumothorax is seen.", "No evidence of pneumothorax."]),
    "Lung Opacity": (["There is a lung opacity.", "Patchy opacities in the lungs.", "An airspace opacity is present."],
                     ["There are no lung opacities.", "The lungs are clear.", "No focal airspace opacity."]),
    "Enlarged Cardiomediastinum": (["The cardiomediastinal silhouette is enlarged.", "The mediastinum is widened.",
                                    "Enlarged cardiomediastinal contours."],
                                   ["The cardiomediastinal silhouette is normal.", "The mediastinum is not widened.",
                                    "Normal cardiomediastinal contours."]),
    "Fracture": (["There is a rib fracture.", "A fracture is present.", "Displaced fracture of the ribs."],
                 ["There is no fracture.", "No acute fracture.", "The osseous structures are intact."]),
    "Lung Lesion": (["There is a lung nodule.", "A pulmonary mass is present.", "A focal lung lesion is seen."],
                    ["There is no lung nodule.", "No pulmonary mass.", "No focal lung lesion."]),
    "Pleural Other": (["There is pleural thickening.", "Pleural scarring is present.", "Pleural plaques are seen."],
                      ["There is no pleural thickening.", "No pleural abnormality.", "The pleura are normal."]),
    "Support Devices": (["A support device is present.", "An endotracheal tube and central line are in place.",
                         "Tubes and lines are in standard position."],
                        ["No support devices are present.", "There are no tubes or lines.", "No lines or tubes are seen."]),
    "No Finding": (["No acute cardiopulmonary process.", "The chest radiograph is normal.", "The lungs are clear and the heart size is normal."],
                   ["There is an acute cardiopulmonary abnormality.", "The chest radiograph is abnormal.",
                    "There are abnormal findings in the chest."]),
}
FINDINGS = list(PROMPTS)


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def label_matrix(labels: Sequence[Optional[Mapping]], findings: Sequence[str] = FINDINGS) -> np.ndarray:
    """[N, F] float array: 1 positive, 0 negative, NaN ignored (uncertain -1, NaN, missing)."""
    out = np.full((len(labels), len(findings)), np.nan)
    col = {_norm_name(f): j for j, f in enumerate(findings)}
    for i, lab in enumerate(labels):
        for name, v in (lab or {}).items():
            j = col.get(_norm_name(name))
            if j is None or v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if v == 1.0 or v == 0.0:
                out[i, j] = v
    return out


def roc_auc(scores, labels) -> float:
    """sklearn's ROC AUC over the labelled items (NaN labels or scores left out); NaN when a class is absent."""
    from sklearn.metrics import roc_auc_score
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    keep = ~np.isnan(y) & ~np.isnan(s)
    s, y = s[keep], y[keep] == 1
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def _clean_list(value, where: str) -> List[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: needs a non-empty list of prompt strings")
    return [v.strip() for v in value]


def load_prompts(path) -> Dict[str, Tuple[List[str], List[str]]]:
    """A YAML (or JSON) file `class: {positive: [...], negative: [...]}` as a prompts mapping."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"--prompts {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--prompts {path}: expected a mapping of class -> {{positive: [...], negative: [...]}}")
    out = {}
    for name, entry in data.items():
        where = f"--prompts {path}: class {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"positive", "negative"}:
            raise ValueError(f"{where}: needs exactly the keys 'positive' and 'negative'")
        out[str(name)] = (_clean_list(entry["positive"], f"{where} positive"),
                          _clean_list(entry["negative"], f"{where} negative"))
    return out


def select_prompts(prompts: Mapping[str, Tuple[Sequence[str], Sequence[str]]], labels: Sequence[str],
                   available: Optional[Sequence[str]] = None) -> Dict[str, Tuple[Sequence[str], Sequence[str]]]:
    """{label: its prompts} for the asked-for labels (names matched ignoring case and punctuation).

    ValueError when a label has no prompts, or (given `available`, the label names in the data)
    when no image carries it."""
    by_norm = {_norm_name(k): k for k in prompts}
    missing = [lab for lab in labels if _norm_name(lab) not in by_norm]
    if missing:
        raise ValueError(f"unknown label {', '.join(map(repr, missing))}: no prompts for it (prompts exist for "
                         f"{', '.join(list(prompts)[:20])}); give --prompts FILE with positive/negative prompts for it")
    if available is not None:
        have = {_norm_name(a) for a in available}
        absent = [lab for lab in labels if _norm_name(lab) not in have]
        if absent:
            raise ValueError(f"label {', '.join(map(repr, absent))} is in no image's metadata (labels there: "
                             f"{', '.join(list(available)[:20]) or 'none'}); for a table source make the shards "
                             "with --label-cols")
    return {lab: prompts[by_norm[_norm_name(lab)]] for lab in labels}


def prompt_embeddings(encode_fn: Callable[[List[str]], torch.Tensor],
                      prompts: Mapping[str, Tuple[Sequence[str], Sequence[str]]] = PROMPTS):
    """(positive [F, D], negative [F, D]): each side's phrasings averaged, then re-normalised."""
    def ensemble(texts):
        e = torch.nn.functional.normalize(encode_fn(list(texts)).float(), dim=-1).mean(0)
        return torch.nn.functional.normalize(e, dim=-1)
    pos = torch.stack([ensemble(p) for p, _ in prompts.values()])
    neg = torch.stack([ensemble(n) for _, n in prompts.values()])
    return pos, neg


def finding_probabilities(image_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                          logit_scale: float = 100.0) -> torch.Tensor:
    """[N, F] softmax probability of the positive prompt over the (positive, negative) pair."""
    img = image_emb.float()
    logits = torch.stack([img @ pos.T, img @ neg.T], dim=-1) * logit_scale
    return logits.softmax(-1)[..., 0]


def score_findings(probs, labels: np.ndarray, findings: Sequence[str] = FINDINGS, threshold: float = 0.5) -> dict:
    """Per-finding AUC, accuracy (prob > threshold), counts; and their means over scored findings."""
    probs = np.asarray(probs, dtype=np.float64)
    per = {}
    for j, f in enumerate(findings):
        y, p = labels[:, j], probs[:, j]
        keep = ~np.isnan(y)
        n_pos, n_neg = int((y[keep] == 1).sum()), int((y[keep] == 0).sum())
        acc = float(((p[keep] > threshold) == (y[keep] == 1)).mean()) if keep.any() else float("nan")
        per[f] = {"auc": roc_auc(p, y), "accuracy": acc, "n_pos": n_pos, "n_neg": n_neg, "support": n_pos + n_neg}
    aucs = [v["auc"] for v in per.values() if not math.isnan(v["auc"])]
    accs = [v["accuracy"] for v in per.values() if not math.isnan(v["accuracy"])]
    # NaN is not JSON: findings without both classes report auc None
    for v in per.values():
        for key in ("auc", "accuracy"):
            if isinstance(v[key], float) and math.isnan(v[key]):
                v[key] = None
    return {"per_finding": per, "mean_auc": sum(aucs) / len(aucs) if aucs else None,
            "mean_accuracy": sum(accs) / len(accs) if accs else None, "n_findings_scored": len(aucs)}


def model_logit_scale(model) -> float:
    """exp(model.logit_scale) when the model learned one, else CLIP's 100."""
    ls = getattr(model, "logit_scale", None)
    if isinstance(ls, torch.Tensor):
        return float(ls.detach().float().exp().reshape(-1)[0])
    return 100.0


def evaluate_zeroshot(image_emb: torch.Tensor, labels: Sequence[Optional[Mapping]], encode_fn: Callable,
                      logit_scale: float = 100.0,
                      prompts: Mapping[str, Tuple[Sequence[str], Sequence[str]]] = PROMPTS) -> dict:
    """Zero-shot scores of images against `prompts`; `labels[i]` is image i's {finding: value}."""
    if len(image_emb) != len(labels):
        raise ValueError(f"{len(image_emb)} images but {len(labels)} label sets")
    findings = list(prompts)
    y = label_matrix(labels, findings)
    if np.isnan(y).all():
        raise ValueError(f"no usable labels (1 or 0) for {', '.join(findings[:5])}{'...' if len(findings) > 5 else ''} "
                         "in the metadata: zero-shot needs labelled images (MIMIC/CheXpert labels, or a table "
                         "source's columns via shards --label-cols and eval --labels)")
    pos, neg = prompt_embeddings(encode_fn, prompts)
    probs = finding_probabilities(image_emb, pos, neg, logit_scale)
    out = score_findings(probs.numpy(), y, findings)
    out["n_images"] = len(image_emb)
    out["logit_scale"] = logit_scale
    return out
