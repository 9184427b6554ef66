"""Zero-shot finding classification from image-text similarity, scored by AUC and accuracy.

Each finding has a few positive and a few negative phrasings; the phrasings of one side are
embedded, averaged and re-normalised (a prompt ensemble), and an image's probability of the
finding is the softmax over its (positive, negative) similarities, scaled by the model's
logit scale. Labels come from shard metadata: 1 positive, 0 negative, -1 (uncertain), NaN or
missing are left out of that finding's scores.
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
    """Area under the ROC curve from ranks (Mann-Whitney U); tied scores share their mean rank,
    so a tie between a positive and a negative counts one half. NaN when a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    keep = ~np.isnan(y) & ~np.isnan(s)
    s, y = s[keep], y[keep] == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    # rank of a tie group = mean of the 1-based positions it occupies
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mean_rank[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


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
        per[f] = {"auc": roc_auc(p, y), "accuracy": acc, "n_pos": n_pos, "n_neg": n_neg}
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
        raise ValueError("no usable labels (1 or 0) in the metadata: zero-shot evaluation needs CheXpert-style labels")
    pos, neg = prompt_embeddings(encode_fn, prompts)
    probs = finding_probabilities(image_emb, pos, neg, logit_scale)
    out = score_findings(probs.numpy(), y, findings)
    out["n_images"] = len(image_emb)
    out["logit_scale"] = logit_scale
    return out
