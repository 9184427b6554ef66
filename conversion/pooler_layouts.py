"""Latent-attention pooler layouts found in LLM2Vec-style checkpoints -> our pooler's keys.

Our `LatentAttentionPooling` (open_clip_cxr/text/pooling.py) computes, per token x:

    a = x + to_out(attn(q=to_q(x), k|v=to_kv(latents)))      (to_out has a bias)
    y = a + mlp.2(gelu(mlp.0(a)))                              then a masked mean over tokens

Checkpoints store latent attention in several ways (all under `latent_attn.` unless noted):

- "cxr": our own names (`latents`, `to_q`, `to_kv`, `to_out`, `mlp.0`, `mlp.2`);
- "nv_embed": NV-Embed's `LatentAttentionModel` (`latents`, `cross_attend_blocks.0.fn.to_q|to_kv|to_out`,
  `cross_attend_blocks.0.norm|norm_context`, `cross_attend_blocks.1.norm`, `cross_attend_blocks.1.fn.net.0|2`),
  usually under `latent_attention_model.`;
- "prenorm": the NV-style `pooling_latent.LatentAttentionPooling` of later LLM2Vec forks, whose
  constructor matches the call in llm2vec4cxr's modeling code (`cross_attn.fn.to_q|to_k|to_v|to_out`,
  `cross_attn.norm|norm_context`, `cross_ff.norm`, GEGLU `cross_ff.fn.net.0` and `net.2` or `net.3`);
- "mha": the LLM2Vec fork in the authors' llm2vec4cxr GitHub repo (`latents`,
  `multihead_attn.in_proj_weight|in_proj_bias|out_proj`, `mlp.0|2`; no residual connections).

Which one `lukeingawesome/llm2vec4cxr` ships could not be checked offline. So every layout is
detected and mapped exactly where the maths allows, and otherwise refused with the reason:

- exact: `to_k`+`to_v` -> `to_kv` (stacked, keys first, as ours splits it); `norm_context` (a
  LayerNorm on the constant latents) folded into `latents`; a missing `to_out` bias -> zeros;
- refused (`PoolerLayoutError`): a LayerNorm on the tokens before the attention or the
  feed-forward (per-token normalisation is not linear), a GEGLU feed-forward (Linear to 2x, then
  x * gelu(gate)), an attention width other than the hidden size, and the "mha" layout (no
  residuals, query bias). Supporting them needs a pooling option in `text/pooling.py`.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

OUR_KEYS = ("latents", "to_q.weight", "to_kv.weight", "to_out.weight", "to_out.bias",
            "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
SOURCE_PREFIXES = ("latent_attn.", "latent_attention_model.")
LAYOUTS = ("cxr", "nv_embed", "prenorm", "mha")


class PoolerLayoutError(ValueError):
    """A pooler checkpoint our `LatentAttentionPooling` cannot represent exactly."""


# Per layout: source sub-key -> our key for the tensors that map one to one.
_RENAMES = {
    "cxr": {k: k for k in OUR_KEYS},
    "nv_embed": {
        "latents": "latents",
        "cross_attend_blocks.0.fn.to_q.weight": "to_q.weight",
        "cross_attend_blocks.0.fn.to_kv.weight": "to_kv.weight",
        "cross_attend_blocks.0.fn.to_out.weight": "to_out.weight",
        "cross_attend_blocks.0.fn.to_out.bias": "to_out.bias",
        "cross_attend_blocks.1.fn.net.0.weight": "mlp.0.weight",
        "cross_attend_blocks.1.fn.net.0.bias": "mlp.0.bias",
        "cross_attend_blocks.1.fn.net.2.weight": "mlp.2.weight",
        "cross_attend_blocks.1.fn.net.2.bias": "mlp.2.bias",
    },
    "prenorm": {
        "latents": "latents",
        "cross_attn.fn.to_q.weight": "to_q.weight",
        "cross_attn.fn.to_kv.weight": "to_kv.weight",
        "cross_attn.fn.to_out.weight": "to_out.weight",
        "cross_attn.fn.to_out.bias": "to_out.bias",
        "cross_ff.fn.net.0.weight": "mlp.0.weight",
        "cross_ff.fn.net.0.bias": "mlp.0.bias",
        "cross_ff.fn.net.2.weight": "mlp.2.weight",  # without dropout layers
        "cross_ff.fn.net.2.bias": "mlp.2.bias",
        "cross_ff.fn.net.3.weight": "mlp.2.weight",  # with Dropout after GEGLU
        "cross_ff.fn.net.3.bias": "mlp.2.bias",
    },
}
# Split key/value projections (stacked into `to_kv`), and the latent-side LayerNorm (folded).
_SPLIT_KV = {"nv_embed": ("cross_attend_blocks.0.fn.to_k.weight", "cross_attend_blocks.0.fn.to_v.weight"),
             "prenorm": ("cross_attn.fn.to_k.weight", "cross_attn.fn.to_v.weight")}
_CONTEXT_NORM = {"nv_embed": "cross_attend_blocks.0.norm_context.", "prenorm": "cross_attn.norm_context."}
# LayerNorms on the token path: no linear equivalent.
_TOKEN_NORMS = {"nv_embed": ("cross_attend_blocks.0.norm.", "cross_attend_blocks.1.norm."),
                "prenorm": ("cross_attn.norm.", "cross_ff.norm.")}


def detect_layout(keys) -> str:
    """The layout of pooler sub-keys (prefix already removed)."""
    keys = list(keys)
    if any(k.startswith("multihead_attn.") for k in keys):
        return "mha"
    if any(k.startswith("cross_attend_blocks.") for k in keys):
        return "nv_embed"
    if any(k.startswith(("cross_attn.", "cross_ff.")) for k in keys):
        return "prenorm"
    return "cxr"


def split_prefix(key: str) -> Optional[Tuple[str, str]]:
    """(prefix, sub-key) when `key` belongs to a latent-attention pooler, else None."""
    for prefix in SOURCE_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return None


def _problems(layout: str, sub: Dict[str, torch.Tensor], hidden_size: Optional[int]) -> List[str]:
    out = []
    if layout == "mha":
        out.append("'mha' layout (torch MultiheadAttention + MLP): its output has no residual connections "
                   "and its query projection has a bias; ours adds both residuals and has no query bias")
        return out
    for prefix in _TOKEN_NORMS.get(layout, ()):
        if any(k.startswith(prefix) for k in sub):
            out.append(f"a LayerNorm on the tokens ({prefix}*) before a sub-layer; ours has none and a "
                       f"per-token normalisation has no linear equivalent")
    renames = _RENAMES[layout]
    ff_in = next((sub[k] for k, v in renames.items() if v == "mlp.0.weight" and k in sub), None)
    ff_out = next((sub[k] for k, v in renames.items() if v == "mlp.2.weight" and k in sub), None)
    if ff_in is not None and ff_out is not None and ff_in.shape[0] == 2 * ff_out.shape[1]:
        out.append(f"a GEGLU feed-forward (Linear {ff_in.shape[1]}->{ff_in.shape[0]}, x * gelu(gate), Linear "
                   f"{ff_out.shape[1]}->{ff_out.shape[0]}); ours is Linear -> GELU -> Linear")
    q = next((sub[k] for k, v in renames.items() if v == "to_q.weight" and k in sub), None)
    if q is not None and hidden_size is not None and q.shape[0] != hidden_size:
        out.append(f"an attention width of {q.shape[0]} (heads x head_dim) instead of the hidden size "
                   f"{hidden_size}; ours attends at the hidden size")
    return out


@torch.no_grad()
def convert_pooler_state(sub: Dict[str, torch.Tensor], hidden_size: Optional[int] = None,
                         layout: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Pooler tensors (sub-keys, prefix removed) -> our `LatentAttentionPooling` state dict.

    Raises `PoolerLayoutError` naming every feature that cannot be represented exactly.
    """
    layout = layout or detect_layout(sub)
    problems = _problems(layout, sub, hidden_size)
    if problems:
        raise PoolerLayoutError(
            f"the checkpoint's latent-attention pooler ({layout!r} layout) cannot be represented by "
            f"open_clip_cxr's LatentAttentionPooling: " + "; ".join(problems) + ". Import the decoder "
            f"alone with `open-clip-cxr convert --from llm2vec --pooler drop`, or add a matching pooling "
            f"option to open_clip_cxr/text/pooling.py (see conversion/pooler_layouts.py).")
    renames = _RENAMES[layout]
    out, used = {}, set()
    for key, tensor in sub.items():
        if key in renames:
            out[renames[key]] = tensor
            used.add(key)
    if layout in _SPLIT_KV and all(k in sub for k in _SPLIT_KV[layout]):
        k_w, v_w = (sub[k] for k in _SPLIT_KV[layout])
        out["to_kv.weight"] = torch.cat([k_w, v_w], dim=0)
        used.update(_SPLIT_KV[layout])
    norm = _CONTEXT_NORM.get(layout)
    if norm and norm + "weight" in sub and "latents" in out:
        # The latents are constants, so LayerNorm(latents) can be stored in their place.
        lat = out["latents"]
        out["latents"] = F.layer_norm(lat.float(), lat.shape[-1:], sub[norm + "weight"].float(),
                                      sub.get(norm + "bias", torch.zeros_like(lat[0])).float()).to(lat.dtype)
        used.update(k for k in sub if k.startswith(norm))
    if "to_out.weight" in out and "to_out.bias" not in out:
        out["to_out.bias"] = torch.zeros(out["to_out.weight"].shape[0], dtype=out["to_out.weight"].dtype)
    unused = sorted(set(sub) - used)
    if unused:
        raise PoolerLayoutError(f"pooler tensors with no counterpart in our LatentAttentionPooling "
                                f"({layout!r} layout): {unused[:8]}")
    missing = [k for k in OUR_KEYS if k not in out]
    if missing:
        raise PoolerLayoutError(f"pooler checkpoint ({layout!r} layout) lacks {missing}")
    return out


def _check_one_to_one(sub_key: str) -> str:
    if sub_key in OUR_KEYS:
        return sub_key
    layout = detect_layout([sub_key])
    if layout == "cxr":
        raise PoolerLayoutError(f"unknown latent-attention tensor {sub_key!r}; known: {OUR_KEYS}")
    raise PoolerLayoutError(
        f"latent-attention tensor {sub_key!r} is in the {layout!r} layout, which needs a whole-checkpoint "
        f"conversion (or cannot be represented); run `open-clip-cxr convert --from llm2vec` on the "
        f"weights and point `base_weights` at its output (see conversion/pooler_layouts.py)")


def pooler_key(key: str) -> Optional[str]:
    """`POOLER_KEY_MAPPERS` entry for `text/base_weights.py`: maps our own layout stored under
    `latent_attn.` key by key, and refuses the others loudly (a silently random pooler would be
    worse: with LoRA on, it stays frozen)."""
    split = split_prefix(key)
    return None if split is None else _check_one_to_one(split[1])

