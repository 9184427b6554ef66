"""Write an OpenCLIP Hub folder that `open_clip.create_model_and_transforms('local-dir:DIR')`
(or `hf-hub:ORG/NAME` once pushed) loads after `import open_clip_cxr`:

    DIR/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    DIR/open_clip_model.safetensors  the whole CLIP state dict (LoRA merged unless asked not to)
    DIR/tokenizer.json ...           our tokenizer (never OpenCLIP's CLIP fallback)
    DIR/config.json                  the text tower's transformers config (see `TEXT_CONFIG_NAME`)
    DIR/README.md                    the model card, when one is given

`open-clip-cxr export` builds the model, writes the folder with its card, loads it back through
OpenCLIP's `local-dir:` and checks that text and image embeddings match the source.
"""
import copy
import json
import logging
from pathlib import Path
from typing import Dict, Optional

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# transformers 5's AutoTokenizer always reads a repo's config.json first. Missing on the Hub it is
# skipped when online, but offline it only is if the cache recorded it as absent, which a plain
# `snapshot_download` does not: so `get_tokenizer('hf-hub:...')` would fail offline. The text
# tower's config (informative, and registered once open_clip_cxr is imported) avoids that.
TEXT_CONFIG_NAME = "config.json"


def text_tower(model):
    """The model's `CXRTextModel` text tower, or None. (torch and the tower import here, not at the
    top of the module, so that `open-clip-cxr export --help` stays fast.)"""
    from open_clip_cxr.text.model import CXRTextModel
    transformer = getattr(getattr(model, "text", None), "transformer", None)
    return transformer if isinstance(transformer, CXRTextModel) else None


def export_model_cfg(model, model_cfg: dict, tokenizer_source: str) -> dict:
    """`model_cfg` with the text spec rewritten to match the tower as it is now."""
    cfg = copy.deepcopy(model_cfg)
    tower = text_tower(model)
    if tower is not None:
        from open_clip_cxr.text.archs import spec_for
        cfg["text_cfg"]["hf_model_name"] = spec_for(tower.config)
    cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_source
    cfg["text_cfg"].pop("hf_model_pretrained", None)
    cfg["vision_cfg"].pop("timm_model_pretrained", None)
    return cfg


def save_state_dict(model, path: Path) -> None:
    """Safetensors refuses shared storage; store each tensor once, contiguous, on the CPU."""
    from safetensors.torch import save_file
    seen, state = {}, {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        state[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen[ptr] = key
    save_file(state, str(path), metadata={"format": "pt"})


def export_folder(model, model_cfg: dict, tokenizer, out_dir, *, preprocess_cfg: Optional[dict] = None,
                  merge_lora: bool = True, repo_id: Optional[str] = None, card: Optional[str] = None) -> Path:
    """Write `out_dir` (created; files replaced). `merge_lora=True` folds LoRA into the base
    weights of `model` in place, which is what a release wants; keep it False for fine-tuners."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower = text_tower(model)
    if merge_lora and tower is not None:
        tower.merge_lora()
    # A Hub repo names itself as the tokenizer source; a local folder is read by path
    # (OpenCLIP's `local-dir:` always reads the tokenizer from the folder itself).
    cfg = export_model_cfg(model, model_cfg, repo_id or str(out.resolve()))
    preprocess = dict(preprocess_cfg or getattr(model.visual, "preprocess_cfg", {}) or {})
    (out / CONFIG_NAME).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    save_state_dict(model, out / WEIGHTS_NAME)
    hf_tok = getattr(tokenizer, "tokenizer", None)
    if hf_tok is None or not hasattr(hf_tok, "save_pretrained"):
        raise TypeError("export needs OpenCLIP's HFTokenizer (ours); got " + type(tokenizer).__name__)
    hf_tok.save_pretrained(out)
    if tower is not None:
        (out / TEXT_CONFIG_NAME).write_text(tower.config.to_json_string())
    if card is not None:
        (out / "README.md").write_text(card)
    return out


# -- round-trip check ---------------------------------------------------------------------------
# The probes live in the library (push uses them too); re-exported here for export's callers.
from open_clip_cxr.eval.probe import PROBE_TEXTS, embeddings, probe_images  # noqa: E402,F401


class ExportMismatchError(RuntimeError):
    """The exported folder does not reproduce the source model."""


def verify_export(folder, reference: Dict, atol: float = 1e-4) -> Dict[str, float]:
    """Load `folder` with `open_clip` (`local-dir:`) and compare with `reference` (from `embeddings`
    on the source model, before export). Returns max abs diffs; raises if any exceeds `atol`."""
    import torch
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our text tower)
    name = "local-dir:" + str(Path(folder))
    model, _, _ = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    got = embeddings(model, tokenizer, PROBE_TEXTS, reference["images"])
    if not torch.equal(got["tokens"], reference["tokens"]):
        raise ExportMismatchError(f"{folder}: its tokenizer gives other token ids than the source's")
    diffs = {k: float((got[k] - reference[k]).abs().max()) for k in ("text", "image", "logit_scale")}
    bad = {k: v for k, v in diffs.items() if not v <= atol}  # `not <=` also catches NaN
    if bad:
        raise ExportMismatchError(f"{folder} does not reproduce the source model: max abs diff {bad} > {atol}")
    return diffs


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="built-in name (cxr-llm, cxr-llm-small, ...), local-dir:DIR or a folder, hf-hub:ORG/NAME")
    parser.add_argument("--pretrained", default=None,
                        help="full CLIP checkpoint (.safetensors / .pt / .bin / DeepSpeed folder) to load into it")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--no-merge", action="store_true", help="keep LoRA unmerged (for fine-tuners)")
    parser.add_argument("--eval-json", default=None, help="retrieval results (open-clip-cxr eval output) for the card")
    parser.add_argument("--recipe", default=None, help="training recipe (YAML or JSON) for the card")
    parser.add_argument("--repo-id", default=None, help="ORG/NAME the folder will be pushed to")
    parser.add_argument("--license", default=None,
                        help="license id for the card (default: from the recipe or the base model)")
    parser.add_argument("--no-card", action="store_true", help="do not write README.md")
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs embedding difference accepted on reload")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even when it holds files export does not write")


# What an export writes (and `push` uploads); any other file in --out is someone else's.
EXPORT_FILES = ("open_clip_config.json", "config.json", "*.safetensors", "README.md", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt",
                "merges.txt", "added_tokens.json", "chat_template.jinja", "adapter.json")


def check_out_folder(out, overwrite: bool = False) -> None:
    """Refuse an --out that is a file, or a folder holding files this export would not write."""
    import fnmatch
    from open_clip_cxr.errors import UsageError
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new or written by export)")
    if not out.is_dir() or overwrite:
        return
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in EXPORT_FILES))
    if foreign:
        raise UsageError(f"--out {out} holds files export did not write ({', '.join(foreign[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}); choose an empty folder or pass --overwrite")


def load_source(model_name: str, pretrained: Optional[str] = None):
    """(model in eval mode, tokenizer, model_cfg) for a name / folder, with an optional checkpoint."""
    import open_clip
    import open_clip_cxr
    from .checkpoints import load_clip_checkpoint
    if Path(model_name).is_dir() and not model_name.startswith(("local-dir:", "hf-hub:")):
        model_name = "local-dir:" + model_name
    schema, _ = open_clip.factory.parse_model_name(model_name)
    kwargs = {} if schema else {"pretrained": None, "pretrained_hf": pretrained is None}
    model = open_clip_cxr.create_model(model_name, **kwargs)
    if pretrained:
        load_clip_checkpoint(model, pretrained)
    model_cfg = open_clip.get_model_config(model_name)
    return model.eval(), open_clip.get_tokenizer(model_name), model_cfg


def run(args) -> int:
    from open_clip_cxr_hub.card import load_eval_results, load_recipe, render_card
    from open_clip_cxr.errors import UsageError
    check_out_folder(args.out, args.overwrite)
    for flag, path in (("--eval-json", args.eval_json), ("--recipe", args.recipe), ("--pretrained", args.pretrained)):
        if path and not Path(path).exists() and not (flag == "--pretrained" and "/" not in path and "." not in path):
            raise UsageError(f"{flag} {path} does not exist; check the path")
    model, tokenizer, model_cfg = load_source(args.model, args.pretrained)
    if not args.pretrained and not args.model.startswith(("local-dir:", "hf-hub:")) and not Path(args.model).is_dir():
        logging.warning(f"no --pretrained checkpoint: exporting {args.model} with its base weights only")
    reference = embeddings(model, tokenizer)
    card = None
    if not args.no_card:
        card = render_card(
            repo_id=args.repo_id, model_cfg=model_cfg, preprocess_cfg=dict(model.visual.preprocess_cfg),
            eval_results=load_eval_results(args.eval_json) if args.eval_json else None,
            recipe=load_recipe(args.recipe) if args.recipe else None, license=args.license,
            lora_merged=not args.no_merge)
    out = export_folder(model, model_cfg, tokenizer, args.out, merge_lora=not args.no_merge,
                        repo_id=args.repo_id, card=card)
    diffs = verify_export(out, reference, atol=args.atol)
    print(f"wrote {out} (LoRA {'unmerged' if args.no_merge else 'merged'})")
    print("reload via local-dir: max abs diff " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    return 0
