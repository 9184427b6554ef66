"""Which model an index was built with: a record (name, checkpoint, config hash, preprocessing,
probe embeddings, the tokenizer's text rules) kept in the manifest, and the check that refuses
another model by name."""
from __future__ import annotations

import logging

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from open_clip_cxr.search import store
from open_clip_cxr.search.store import SearchIndexError


@torch.no_grad()
def probe_embeddings(model, preprocess, tokenizer, device="cpu") -> dict:
    from open_clip_cxr.eval.encode import _model_dtype, encode_texts
    model.eval()
    x = preprocess(store.probe_image()).unsqueeze(0).to(device=device, dtype=_model_dtype(model))
    img = model.encode_image(x, normalize=True).float().cpu()[0]
    txt = encode_texts(model, tokenizer, [store.PROBE_TEXT], 1, device)[0]
    return {"image": [round(float(v), 6) for v in img], "text": [round(float(v), 6) for v in txt]}


def text_rules(tokenizer) -> dict:
    """What the tokenizer does to a text before tokenising it (`text_cfg.tokenizer_kwargs`): an
    archive's reports and the queries against them must be read alike. The probe text cannot show
    it (it has no administrative line and no capitals)."""
    base = getattr(tokenizer, "base", tokenizer)    # the LLM2Vec instruction tokenizer wraps ours
    return {"drop_admin_lines": bool(getattr(base, "drop_admin_lines", False)),
            "fold_capitals": getattr(base, "fold_capitals", None) or None,
            "lowercase": bool(getattr(base, "lowercase", False))}


# Indexes built before the record held the text rules: every one of them kept administrative lines.
_RULES_BEFORE_2026_12_06 = {"drop_admin_lines": False}


def model_record(model, preprocess, tokenizer, name: str, pretrained: Optional[str], precision: str,
                 device="cpu") -> dict:
    cfg = store.preprocess_config(model)
    return {"name": norm_model_name(name), "pretrained": _norm_pretrained(pretrained), "precision": precision,
            "config_hash": store.config_hash(model, cfg), "preprocess": cfg,
            "probe": probe_embeddings(model, preprocess, tokenizer, device),
            "text_rules": text_rules(tokenizer)}


def norm_model_name(name: str) -> str:
    """`local-dir:` folders as absolute paths, so an index opens from any working folder."""
    if name and name.startswith("local-dir:"):
        return "local-dir:" + str(Path(name[len("local-dir:"):]).resolve())
    return name


def _norm_pretrained(p):
    if p and Path(p).exists():
        return str(Path(p).resolve())
    return p or None


def _describe(rec: dict) -> str:
    ckpt = rec.get("pretrained")
    return repr(rec["name"]) + (f" (checkpoint {ckpt})" if ckpt else "")


def check_model(folder, manifest: dict, current: dict, tol: float = 0.99, strict_text_rules: bool = True) -> None:
    """Refuse, naming both, when `current` (a `model_record`) is not the model the index was built with.
    A tokenizer that reads texts by other rules (`text_rules`) is refused too when `strict_text_rules`
    (adding to an index: its reports would be read two ways), else warned about (searching: the
    indexed reports stay as they were read, only the queries are read the new way)."""
    old = manifest["model"]
    what = f"index {folder} was built with model {_describe(old)}"
    fix = "embeddings of different models are not comparable: use that model, or build a new index with --out"
    if current["name"] != old["name"] or current.get("pretrained") != old.get("pretrained"):
        raise SearchIndexError(f"{what}, not {_describe(current)}; {fix}")
    if current["config_hash"] != old["config_hash"]:
        diff = sorted(k for k in set(old["preprocess"]) | set(current["preprocess"])
                      if old["preprocess"].get(k) != current["preprocess"].get(k))
        detail = f"preprocessing differs in {', '.join(diff)}" if diff else "architecture differs"
        raise SearchIndexError(f"{what} and config hash {old['config_hash']}; this model has "
                               f"{current['config_hash']} ({detail}); {fix}")
    for kind in ("image", "text"):
        a, b = np.asarray(old["probe"][kind]), np.asarray(current["probe"][kind])
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        if cos < tol:
            raise SearchIndexError(f"{what}; a model of that name with other weights or preprocessing is "
                                   f"loaded now (probe {kind} embedding cosine {cos:.3f} < {tol}); {fix}")
    built = old.get("text_rules", _RULES_BEFORE_2026_12_06)
    now = current.get("text_rules", {})
    differ = sorted(k for k in built if built[k] != now.get(k))
    if differ:
        said = ", ".join(f"{k} {built[k]!r} then, {now.get(k)!r} now" for k in differ)
        msg = f"{what}, whose tokenizer read texts by other rules ({said})"
        if strict_text_rules:
            raise SearchIndexError(f"{msg}; its reports would be read two ways: build a new index with --out, "
                                   f"or add with a tokenizer set as it was (open_clip.get_tokenizer(name, {differ[0]}="
                                   f"{built[differ[0]]!r}))")
        logging.warning(f"{msg}: queries are read by today's rules, the indexed reports by those; "
                        "build a new index with --out to read both alike")
