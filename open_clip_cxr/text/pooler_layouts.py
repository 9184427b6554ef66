"""Latent-attention pooler layouts found in LLM2Vec-style checkpoints -> our pooler's keys + options.

Our `LatentAttentionPooling` (open_clip_cxr/text/pooling.py) computes, per token x:

    n(.) = LayerNorm if pre_norm else identity (norm_tokens / norm_latents / ff_norm)
    a = x + to_out(attn(q=to_q(n(x)), k|v=to_kv(n(latents))))   heads * head_dim wide; biases optional
    y = a + mlp.2(act(mlp.0(n(a))))                              act: GELU, or GEGLU (mlp.0 twice as wide)

(without residuals, `latent_residual: false`: a = to_out(...), y = mlp.2(act(mlp.0(a)))), then a
masked mean over tokens. The options are `CXRTextConfig.latent_pre_norm`, `latent_ff`,
`latent_head_dim`, `latent_out_bias`, `latent_in_bias` and `latent_residual`; their defaults
are our original layout.

Checkpoints store latent attention in several ways (all under `latent_attn.` unless noted):

- "cxr": our own names (`latents`, `to_q`, `to_kv`, `to_out`, `mlp.0`, `mlp.2`, and with pre-norm
  `norm_tokens`, `norm_latents`, `ff_norm`);
- "nv_embed": NV-Embed's `LatentAttentionModel` (`latents`, `cross_attend_blocks.0.fn.to_q|to_kv|to_out`,
  `cross_attend_blocks.0.norm|norm_context`, `cross_attend_blocks.1.norm`, `cross_attend_blocks.1.fn.net.0|2`),
  usually under `latent_attention_model.`;
- "prenorm": the NV-style `pooling_latent.LatentAttentionPooling` of later LLM2Vec forks, whose
  constructor matches the call in llm2vec4cxr's modeling code (`cross_attn.fn.to_q|to_k|to_v|to_out`,
  `cross_attn.norm|norm_context`, `cross_ff.norm`, GEGLU `cross_ff.fn.net.0` and `net.2` or `net.3`);
- "mha": the pooler of the LLM2Vec fork the authors ship in both public repos
  (`llm2vec/llm2vec.py` of lukeingawesome/llm2vec4cxr and of llm2clip4cxr): `latents`,
  `multihead_attn.in_proj_weight|in_proj_bias` (a batch-first `nn.MultiheadAttention`, tokens as
  queries, latents as keys and values), `multihead_attn.out_proj.weight|bias`, then `mlp.0|2`
  (Linear-GELU-Linear at the hidden width), no LayerNorms and no residual connections; the mean
  is taken over the pooled (instruction-free) tokens. Ours holds it exactly with
  `latent_in_bias` (the in-projection biases), `latent_residual: false`, `latent_mlp_ratio: 1`:
  the packed in-projection's rows [q; k; v] become `to_q` and `to_kv` (k then v).

Every option is read off the tensors, exactly: pre-norm from the token LayerNorms' presence,
GEGLU from `mlp.0` being twice as wide as `mlp.2`'s input, the attention width (heads x
head_dim) from `to_q`'s rows, the output and input biases from their presence, residuals from
the layout. Heads alone cannot be read off the weights (the authors use 8). Other exact
rewrites: `to_k`+`to_v` -> `to_kv` (stacked, keys first, as ours splits it); without token
norms, a `norm_context` LayerNorm on the constant latents is folded into `latents`.

Still refused (`PoolerLayoutError`, with the reason): a LayerNorm on the tokens before only one
of the two sub-layers, token norms without a latent norm (our `pre_norm` has all three), a bias
on only one of the query and key/value projections, and any tensor with no counterpart (e.g.
`nn.MultiheadAttention`'s `bias_k`/`bias_v` or separate `q_proj_weight`): no public code of the
authors produces these.

Which layout the released `lukeingawesome/llm2vec4cxr` weights use, and so `cxr-llm`'s default
(text/archs/cxr-llm.json): "mha". Every public script of the authors that loads those weights
goes through `LLM2VecWrapper` (llm2vec4cxr's `llm2vec_wrapper.py`, `tutorial.py`; llm2clip4cxr's
`training/llm2vec_wrapper.py`, used by `training/main.py` to train the CLIP model and by
`retrieval.py` to evaluate it). The wrapper subclasses the `LLM2Vec` of the `llm2vec` package
that both repos vendor and install (`pip install -e .`), whose only latent-attention pooler is
the `nn.MultiheadAttention` one above, and fills it from the Hub's `model.safetensors` by the
`latent_attn.` prefix. The CLIP checkpoint keeps only `visual.*`, `text.projection.*`,
`logit_scale` and LoRA (`filter_clip_sd_for_eval`), so the released CLIP model's text features
are that pooler's output. `modeling_llm2vec4cxr.py` imports a `LatentAttentionPooling(d_model=...)`
from `llm2vec.pooling`, a module neither public repo contains (an NV-style "prenorm" one by its
signature); it is still converted exactly when a checkpoint has that layout. The released
weights themselves could not be inspected offline; `open-clip-cxr convert --from llm2vec` reads
the layout off the tensor names regardless, and a `cxr-llm` loaded through `base_weights`
converts whichever layout it finds if it fits the config (else it fails, naming the fields).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import LATENT_OPTIONS

OUR_KEYS = ("latents", "to_q.weight", "to_q.bias", "to_kv.weight", "to_kv.bias", "to_out.weight", "to_out.bias",
            "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
NORM_KEYS = ("norm_tokens.weight", "norm_tokens.bias", "norm_latents.weight", "norm_latents.bias",
             "ff_norm.weight", "ff_norm.bias")
ALL_KEYS = OUR_KEYS + NORM_KEYS   # every key our pooler has under some option
SOURCE_PREFIXES = ("latent_attn.", "latent_attention_model.")
LAYOUTS = ("cxr", "nv_embed", "prenorm", "mha")
# The `CXRTextConfig` fields a pooler checkpoint determines: every latent-attention option.
OPTION_FIELDS = tuple(LATENT_OPTIONS)


class PoolerLayoutError(ValueError):
    """A pooler checkpoint our `LatentAttentionPooling` cannot represent exactly."""


# Per layout: source sub-key -> our key for the tensors that map one to one.
_RENAMES = {
    "cxr": {k: k for k in ALL_KEYS},
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
    "mha": {
        "latents": "latents",
        "multihead_attn.out_proj.weight": "to_out.weight",
        "multihead_attn.out_proj.bias": "to_out.bias",
        "mlp.0.weight": "mlp.0.weight",
        "mlp.0.bias": "mlp.0.bias",
        "mlp.2.weight": "mlp.2.weight",
        "mlp.2.bias": "mlp.2.bias",
    },
}
# nn.MultiheadAttention's packed input projection: rows [q; k; v] -> to_q and to_kv (k then v).
_PACKED_QKV = ("multihead_attn.in_proj_weight", "multihead_attn.in_proj_bias")
# Split key/value projections (stacked into `to_kv`).
_SPLIT_KV = {"nv_embed": ("cross_attend_blocks.0.fn.to_k.weight", "cross_attend_blocks.0.fn.to_v.weight"),
             "prenorm": ("cross_attn.fn.to_k.weight", "cross_attn.fn.to_v.weight")}
# LayerNorm prefixes per layout: (before attention on tokens, on latents, before the FF) -> ours.
_NORMS = {"cxr": ("norm_tokens.", "norm_latents.", "ff_norm."),
          "nv_embed": ("cross_attend_blocks.0.norm.", "cross_attend_blocks.0.norm_context.",
                       "cross_attend_blocks.1.norm."),
          "prenorm": ("cross_attn.norm.", "cross_attn.norm_context.", "cross_ff.norm.")}
_OUR_NORMS = ("norm_tokens.", "norm_latents.", "ff_norm.")
_HINT = (". Import the decoder alone with `open-clip-cxr convert --from llm2vec --pooler drop`, or add a "
         "matching pooling option to open_clip_cxr/text/pooling.py (see open_clip_cxr/text/pooler_layouts.py).")


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


def _refuse(layout: str, problems: List[str]):
    raise PoolerLayoutError(
        f"the checkpoint's latent-attention pooler ({layout!r} layout) cannot be represented by "
        f"open_clip_cxr's LatentAttentionPooling: " + "; ".join(problems) + _HINT)


def _norm_params(sub: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sub.items() if k.startswith(prefix)}


def _infer_options(layout: str, out: Dict[str, torch.Tensor], norms: Tuple[dict, dict, dict],
                   hidden: int, heads: int) -> Tuple[dict, List[str]]:
    """Config values for the mapped tensors, and the reasons they cannot be represented (if any)."""
    problems = []
    tokens, latents, ff = norms
    if bool(tokens) != bool(ff):
        have, lack = ("attention", "feed-forward") if tokens else ("feed-forward", "attention")
        problems.append(f"a LayerNorm on the tokens before the {have} but none before the {lack}; our "
                        f"pre_norm option normalises before both")
    elif tokens and not latents:
        problems.append("LayerNorms on the tokens but none on the latents; our pre_norm option "
                        "normalises both (a LayerNorm is not the identity, so it cannot be switched off)")
    ff_in, ff_out = out.get("mlp.0.weight"), out.get("mlp.2.weight")
    kind, ratio = "gelu", None
    if ff_in is not None and ff_out is not None:
        if ff_in.shape[0] == 2 * ff_out.shape[1]:
            kind = "geglu"
        elif ff_in.shape[0] != ff_out.shape[1]:
            problems.append(f"a feed-forward of Linear {ff_in.shape[1]}->{ff_in.shape[0]} then Linear "
                            f"{ff_out.shape[1]}->{ff_out.shape[0]}: neither Linear-GELU-Linear nor GEGLU")
        if ff_out.shape[1] % hidden:
            problems.append(f"a feed-forward width of {ff_out.shape[1]}, not a multiple of the hidden size {hidden}")
        ratio = ff_out.shape[1] // hidden
    head_dim = None
    q = out.get("to_q.weight")
    if q is not None:
        inner = q.shape[0]
        if inner % heads:
            problems.append(f"an attention width of {inner}, not divisible by {heads} heads (pass the "
                            f"right latent_heads)")
        elif inner != hidden:
            head_dim = inner // heads
        kv, o = out.get("to_kv.weight"), out.get("to_out.weight")
        if (kv is not None and kv.shape[0] != 2 * inner) or (o is not None and o.shape[1] != inner):
            problems.append(f"query, key/value and output projections of inconsistent widths "
                            f"({inner}, {None if kv is None else kv.shape[0]}, {None if o is None else o.shape[1]})")
    options = {"latent_heads": heads, "latent_mlp_ratio": ratio, "latent_pre_norm": bool(tokens),
               "latent_ff": kind, "latent_head_dim": head_dim, "latent_out_bias": "to_out.bias" in out,
               "latent_in_bias": "to_q.bias" in out, "latent_residual": layout != "mha"}
    if ("to_q.bias" in out) != ("to_kv.bias" in out):
        problems.append("a bias on only one of the query and key/value projections")
    if "latents" in out:
        options["num_latents"] = out["latents"].shape[0]
    return options, problems


@torch.no_grad()
def convert_pooler(sub: Dict[str, torch.Tensor], hidden_size: Optional[int] = None, heads: int = 8,
                   layout: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Pooler tensors (sub-keys, prefix removed) -> (our `LatentAttentionPooling` state dict,
    the `CXRTextConfig` pooling fields that build a pooler holding it exactly).

    Raises `PoolerLayoutError` naming every feature that cannot be represented exactly.
    """
    layout = layout or detect_layout(sub)
    renames = _RENAMES[layout]
    out, used = {}, set()
    for key, tensor in sub.items():
        if key in renames and not key.startswith(_OUR_NORMS):
            out[renames[key]] = tensor
            used.add(key)
    if layout in _SPLIT_KV and all(k in sub for k in _SPLIT_KV[layout]):
        k_w, v_w = (sub[k] for k in _SPLIT_KV[layout])
        out["to_kv.weight"] = torch.cat([k_w, v_w], dim=0)
        used.update(_SPLIT_KV[layout])
    if layout == "mha":
        for key in _PACKED_QKV:
            if key in sub:
                q, k, v = sub[key].chunk(3, dim=0)
                suffix = key.rsplit("_", 1)[-1]   # "weight" | "bias"
                out["to_q." + suffix], out["to_kv." + suffix] = q, torch.cat([k, v], dim=0)
                used.add(key)
    norm_prefixes = _NORMS.get(layout, ())   # "mha" has no LayerNorms
    norms = tuple(_norm_params(sub, prefix) for prefix in norm_prefixes) or ({}, {}, {})
    for prefix in norm_prefixes:
        used.update(k for k in sub if k.startswith(prefix))
    if "latents" not in out:
        raise PoolerLayoutError(f"pooler checkpoint ({layout!r} layout) has no `latents`")
    hidden = hidden_size or out["latents"].shape[1]
    options, problems = _infer_options(layout, out, norms, hidden, heads)
    if problems:
        _refuse(layout, problems)
    tokens, latents, ff = norms
    if options["latent_pre_norm"]:
        for ours, params in zip(_OUR_NORMS, norms):
            out.update({ours + k: v for k, v in params.items()})
    elif latents:
        # Without token norms, LayerNorm(latents) is a constant and can be stored in their place.
        lat = out["latents"]
        out["latents"] = F.layer_norm(lat.float(), lat.shape[-1:], latents["weight"].float(),
                                      latents.get("bias", torch.zeros_like(lat[0])).float()).to(lat.dtype)
    unused = sorted(set(sub) - used)
    if unused:
        raise PoolerLayoutError(f"pooler tensors with no counterpart in our LatentAttentionPooling "
                                f"({layout!r} layout): {unused[:8]}" + _HINT)
    missing = [k for k in expected_keys(options) if k not in out]
    if missing:
        raise PoolerLayoutError(f"pooler checkpoint ({layout!r} layout) lacks {missing}")
    return out, options


def expected_keys(options: dict) -> List[str]:
    """Our pooler's state-dict keys under `options` (CXRTextConfig field names)."""
    keys = [k for k in OUR_KEYS if (k != "to_out.bias" or options.get("latent_out_bias", True))
            and (k not in ("to_q.bias", "to_kv.bias") or options.get("latent_in_bias", False))]
    if options.get("latent_pre_norm", False):
        keys += list(NORM_KEYS)
    return keys


def pooler_options(config) -> dict:
    """The pooling fields of a `CXRTextConfig` (to compare with, or pass to, `convert_pooler_state`)."""
    return {k: getattr(config, k) for k in OPTION_FIELDS}


@torch.no_grad()
def convert_pooler_state(sub: Dict[str, torch.Tensor], hidden_size: Optional[int] = None,
                         layout: Optional[str] = None, options: Optional[dict] = None,
                         heads: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """`convert_pooler`'s state dict alone. With `options` (a target config's `pooler_options`),
    the state is made to fit that pooler: a missing `to_out` bias becomes zeros where the target
    has one (exact); any other difference raises `PoolerLayoutError` naming it."""
    heads = heads or (options or {}).get("latent_heads") or 8
    state, found = convert_pooler(sub, hidden_size, heads, layout)
    if options is None:
        return state
    if options.get("latent_out_bias", True) and not found["latent_out_bias"]:
        state["to_out.bias"] = torch.zeros(state["to_out.weight"].shape[0], dtype=state["to_out.weight"].dtype)
        found["latent_out_bias"] = True
    if options.get("latent_in_bias", False) and not found["latent_in_bias"]:
        for name in ("to_q", "to_kv"):
            state[name + ".bias"] = torch.zeros(state[name + ".weight"].shape[0], dtype=state[name + ".weight"].dtype)
        found["latent_in_bias"] = True
    hidden = state["latents"].shape[1]
    width = lambda o: o.get("latent_head_dim") or hidden // heads  # noqa: E731  (None means hidden / heads)
    same = lambda k: found.get(k) == options[k] or (k == "latent_head_dim" and width(found) == width(options))  # noqa: E731
    diff = {k: (found[k], options[k]) for k in OPTION_FIELDS if k in options and not same(k)}
    if diff:
        raise PoolerLayoutError(
            "the checkpoint's latent-attention pooler does not fit the target text tower: "
            + ", ".join(f"{k}: checkpoint {a!r}, tower {b!r}" for k, (a, b) in diff.items())
            + ". Set these fields in the tower's architecture (e.g. `cxr-text:<name>{\"latent_ff\": ...}`).")
    return state


def _check_one_to_one(sub_key: str) -> str:
    if sub_key in ALL_KEYS:
        return sub_key
    layout = detect_layout([sub_key])
    if layout == "cxr":
        raise PoolerLayoutError(f"unknown latent-attention tensor {sub_key!r}; known: {ALL_KEYS}")
    raise PoolerLayoutError(
        f"latent-attention tensor {sub_key!r} is in the {layout!r} layout, which needs a whole-checkpoint "
        f"conversion (or cannot be represented); run `open-clip-cxr convert --from llm2vec` on the "
        f"weights and point `base_weights` at its output (see open_clip_cxr/text/pooler_layouts.py)")


def pooler_key(key: str) -> Optional[str]:
    """`POOLER_KEY_MAPPERS` entry for `text/base_weights.py`: maps our own layout stored under
    `latent_attn.` key by key, and refuses the others loudly (a silently random pooler would be
    worse: with LoRA on, it stays frozen)."""
    split = split_prefix(key)
    return None if split is None else _check_one_to_one(split[1])
