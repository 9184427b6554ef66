"""Stage 1's model pieces: the CLIP model it adapts, LoRA placement, the MNTP module, the
evaluation encoder and suite, the cache's measured rate and the export's provenance."""
import json
import re
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn

from open_clip_cxr.precision import choose as choose_precision
from open_clip_cxr_train.mntp import IGNORE, LORA_TARGETS, mntp_loss
from open_clip_cxr_train.speedups import FrozenCast, low_precision_dtype
from open_clip_cxr_train.stage1_data import load_reports
from open_clip_cxr_train.text_embed import TextStateCache, length_chunks
from open_clip_cxr_train.throughput import peak_flops


def build_model(name: str, text_arch: Optional[str] = None, lowercase: Optional[bool] = None):
    """(CLIP model, tokenizer, model_cfg, preprocess_cfg) for a built-in name or `local-dir:DIR`.
    `text_arch` swaps in another text tower spec, e.g. `cxr-text:cxr-llm-small{"llm": {"num_hidden_layers": 3}}`
    (recipe key `text_arch`; same tokenizer): architecture ablations without a new model config.
    `lowercase` (recipe key; None: the config's) sets `text_cfg.tokenizer_kwargs.lowercase`, so the
    tokenizer trained with is the one the exported config rebuilds."""
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our models)
    from open_clip_cxr.factory import PREPROCESS_CFGS
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())
        model_cfg, preprocess_cfg = cfg["model_cfg"], cfg.get("preprocess_cfg")
    else:
        model_cfg, preprocess_cfg = open_clip.get_model_config(name), PREPROCESS_CFGS.get(name)
    kwargs, tok_kwargs = {}, {}
    if text_arch:
        model_cfg = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "hf_model_name": text_arch}}
        kwargs["text_cfg"] = model_cfg["text_cfg"]
    if lowercase is not None:
        tok_kwargs = {"lowercase": bool(lowercase)}
        text_cfg = model_cfg["text_cfg"]
        model_cfg = {**model_cfg, "text_cfg": {**text_cfg, "tokenizer_kwargs": {
            **text_cfg.get("tokenizer_kwargs", {}), **tok_kwargs}}}
    model, _, _ = open_clip.create_model_and_transforms(name, **kwargs)
    tokenizer = open_clip.get_tokenizer(name, **tok_kwargs)
    return model, tokenizer, model_cfg, preprocess_cfg


def lora_targets(tower, lora: dict) -> List[str]:
    """`lora.target_modules`, limited to the top `lora.layers` decoder layers when set.

    Explicit module names ("layers.29.self_attn.q_proj"), because peft matches a target by
    suffix: frozen layers below the lowest adapter need no backward pass at all."""
    targets = list(lora.get("target_modules") or LORA_TARGETS)
    top = lora.get("layers")
    n_layers = tower.config.llm_config().num_hidden_layers
    if not top or top >= n_layers:
        return targets
    names = []
    for n, _ in tower.base_llm().named_modules():
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", n)
        if layer and int(layer.group(1)) >= n_layers - int(top) and n.rsplit(".", 1)[-1] in targets:
            names.append(n)
    return names


def set_lora(tower, lora: Optional[dict]):
    """Fold any current LoRA into the base weights, then wrap the decoder with `lora`."""
    tower.merge_lora()
    if lora:
        tower.config.lora = {"r": lora.get("r", 16), "alpha": lora.get("alpha", 32),
                             "dropout": lora.get("dropout", 0.05), "target_modules": lora_targets(tower, lora)}
        tower.enable_lora()
    return tower


def trainable(module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ---------------------------------------------------------------- encoding for evaluation

def tower_encode_fn(tower, tokenizer, max_length: Optional[int] = None, max_tokens: int = 4096,
                    dtype="auto", device="cpu"):
    """`encode_fn(list[str]) -> [N, D]` (L2-normalised) from the tower's pooled output, in
    length-sorted chunks under autocast: what the robustness suite calls. `dtype`: the
    autocast dtype, None for fp32, "auto" for what `open_clip_cxr.precision.choose` measures
    (`OPEN_CLIP_CXR_PRECISION` overrides)."""
    pad = tower.config.pad_token_id
    if isinstance(dtype, str):
        dtype = choose_precision(dtype, device).dtype

    @torch.no_grad()
    def encode(texts):
        tower.eval()
        ids = tokenizer(list(texts), context_length=max_length) if max_length else tokenizer(list(texts))
        mask = ids != pad
        out = torch.zeros(len(texts), tower.config.hidden_size)
        for idx in length_chunks(mask.sum(1).tolist(), max_tokens):
            rows = torch.tensor(idx)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                pooled = tower(input_ids=ids[rows].to(device), attention_mask=mask[rows].to(device)).pooler_output
            out[rows] = pooled.float().cpu()
        return nn.functional.normalize(out, dim=-1)
    return encode


# ---------------------------------------------------------------- one stage's loop

class MNTPModel(nn.Module):
    """The MNTP loss as one module (one forward per step, as DDP wants), length-chunked."""

    def __init__(self, tower, max_tokens: int):
        super().__init__()
        self.tower, self.max_tokens = tower, max_tokens

    def forward(self, input_ids, attention_mask, labels):
        total = (labels[:, 1:] != IGNORE).sum().clamp_min(1)
        loss = 0.0
        for idx in length_chunks(attention_mask.sum(1).tolist(), self.max_tokens):
            rows = torch.tensor(idx, device=input_ids.device)
            n = (labels[rows, 1:] != IGNORE).sum()
            if n:
                loss = loss + mntp_loss(self.tower, input_ids[rows], attention_mask[rows], labels[rows]) * n
        return loss / total


def stage1_provenance(recipe: dict, mntp_steps: int, supcon_steps: int) -> dict:
    """The export's record of where its towers' weights came from: the text tower trained here;
    the vision tower never trained (stage 1 builds it without pretrained weights), so a CLIP
    stage started from this folder takes its vision weights elsewhere (`training/towers.py`)."""
    from open_clip_cxr_train.towers import is_folder, read_provenance
    name = recipe.get("model", "cxr-llm-small")
    vision = {"init": "random", "trained": False, "by": None}
    if is_folder(name):   # stage 1 continued from a folder: its vision tower is carried as it was
        vision = {**((read_provenance(name) or {}).get("vision") or {"init": f"{name} (unknown)", "trained": None})}
    text_arch = f" with text_arch {recipe['text_arch']}" if recipe.get("text_arch") else ""
    return {"text": {"init": f"{name}{text_arch}", "trained": True,
                     "by": f"train-text (MNTP {mntp_steps} steps, supervised contrastive {supcon_steps} steps)"},
            "vision": vision}


def pooler_flops_per_token(tower) -> float:
    """Forward FLOPs the pooler spends on one token (0 for mean and last-token pooling)."""
    count = getattr(tower.pooler, "flops_per_token", None)
    return float(count()) if count else 0.0


def contrastive_flops_per_token(tower, run_layers: int, grad_layers: int) -> float:
    """Training FLOPs of one token in the contrastive step, as 2 x weights per matmul pass: the
    forward of the top `run_layers` decoder layers (all of them, or those above the cache), the
    activation gradients back down through the top `grad_layers` (the adapted ones; 0 while they
    are frozen), the trainable adapters' weight gradients, and the pooler, trained whole: forward,
    input and weight gradients, 3x its forward. (The pooler's input gradient is skipped when
    nothing below it trains: for latent attention that overcounts `to_q`'s share, under 3 %.)
    Decoder attention's own T^2 term is left out, as in `throughput.flops_per_sample_transformer`."""
    layers = tower.base_llm().layers
    per_layer = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() > 1) / len(layers)
    head = {id(p) for m in (tower.pooler, tower.norm) for p in m.parameters()}
    adapters = sum(p.numel() for p in trainable(tower) if id(p) not in head)
    return 2.0 * per_layer * (run_layers + grad_layers) + 2.0 * adapters + 3.0 * pooler_flops_per_token(tower)


def mntp_flops_per_token(tower, mask_prob: float) -> float:
    """Training FLOPs of one token in MNTP: the decoder forward and activation gradients through
    every layer (LoRA in all of them) and the adapters' weight gradients, as in the contrastive
    step; the pooler's forward only (the tower pools, MNTP never reads it); and the tied LM head,
    forward and input gradient, on the masked share of the tokens."""
    n = len(tower.base_llm().layers)
    vocab_weights = tower.base_llm().get_input_embeddings().weight.numel()
    return (contrastive_flops_per_token(tower, n, n) - 2.0 * pooler_flops_per_token(tower)
            + 4.0 * mask_prob * vocab_weights)


def cache_rate(tower, cache: TextStateCache, dtype: Optional[torch.dtype]) -> dict:
    """Throughput of text-state caching: texts/s, model GFLOP/s (2 x the matmul weights of the
    layers run, per real token: padding is not work) and its share of the measured `F.linear`
    peak of the precision in use (`open_clip_cxr.precision.peak_flops`)."""
    llm = tower.base_llm()
    n_run = len(llm.layers) - cache.k
    per_token = 2.0 * sum(p.numel() for layer in list(llm.layers)[:n_run] for p in layer.parameters() if p.dim() > 1)
    tokens = sum(int(i.numel()) for i in cache.ids)
    secs = max(cache.seconds, 1e-9)
    peak = peak_flops(next(tower.parameters()).device, dtype or torch.float32)
    flops = per_token * tokens / secs
    return {"texts": len(cache), "tokens": tokens, "seconds": round(secs, 2),
            "texts_per_s": round(len(cache) / secs, 2), "gflops": round(flops / 1e9, 2),
            "peak_gflops": round(peak / 1e9, 1), "of_peak": round(flops / peak, 4),
            "precision": "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
            "threads": torch.get_num_threads()}


def evaluate(tower, tokenizer, recipe: dict, device="cpu") -> dict:
    """The text-robustness suite on the validation split (`eval.split`, `eval.limit`)."""
    from open_clip_cxr.eval.robustness import format_table, run_robustness
    ecfg = recipe.get("eval") or {}
    data = {**recipe.get("data", {}), "limit": ecfg.get("limit")}
    reports = load_reports(data, ecfg.get("split", "validate"))
    if not reports:
        return {}
    # the run's precision (`resolved.precision`, else measured); `eval.bf16: true|false` forces
    run = (recipe.get("resolved") or {}).get("precision") or "auto"
    dtype = ({True: torch.bfloat16, False: None}[bool(ecfg["bf16"])] if "bf16" in ecfg
             else low_precision_dtype(choose_precision(run, device).mixed_precision))
    encode = tower_encode_fn(tower, tokenizer, device=device, dtype=dtype,
                             max_tokens=int(recipe.get("train", {}).get("max_tokens", 4096)))
    t = time.time()
    cast = FrozenCast(tower, dtype)
    try:
        res = run_robustness(reports, encode, seed=int(ecfg.get("seed", 0)))
    finally:
        cast.restore()
    res["eval_s"] = round(time.time() - t, 1)
    print(format_table({"stage 1": res}), flush=True)
    return res
