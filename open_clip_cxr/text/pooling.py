"""Poolers: token states (B, L, D) + a mask of tokens to pool (B, L) -> one vector per text.

All modes are batched; none loops over samples in Python. Each mode registers a builder
(`config -> nn.Module`) with `@register_pooler(name)`; `CXRTextConfig(pooling=name)` accepts
any registered name, so a new pooler is one class + one decorated builder.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LATENT_FF_KINDS, LATENT_OPTIONS

POOLERS: Dict[str, Callable[..., nn.Module]] = {}
POOLING_MODES = POOLERS.keys()   # a live view: every registered name


def register_pooler(name: str):
    """Decorator: register `builder(config) -> nn.Module` as pooling mode `name`."""
    def deco(builder):
        POOLERS[name] = builder
        return builder
    return deco


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MeanPooling(nn.Module):
    def forward(self, hidden, mask):
        return masked_mean(hidden, mask)


class LastTokenPooling(nn.Module):
    """The state of the last pooled token; works for left and right padding alike."""

    def forward(self, hidden, mask):
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).max(dim=1).values.clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class GEGLU(nn.Module):
    """Gated GELU: the input's first half, gated by GELU of its second half (NV-Embed's order)."""

    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class LatentAttentionPooling(nn.Module):
    """NV-Embed-style latent attention: each token attends over a learned latent array
    (keys and values), a feed-forward follows (residuals around both), then a masked mean.

    Options (defaults = our original layout, whose state-dict keys they leave unchanged):
    `pre_norm` adds LayerNorms on the tokens before the attention (`norm_tokens`) and before the
    feed-forward (`ff_norm`), and on the latents used as keys/values (`norm_latents`);
    `ff="geglu"` makes `mlp.0` project to twice the width and gate it (x * gelu(gate));
    `head_dim` sets the attention's inner width to heads * head_dim (default hidden / heads);
    `out_bias` gives `to_out` a bias; `in_bias` gives `to_q` and `to_kv` biases;
    `residual=False` drops both residual connections (each sub-layer's output replaces its input).
    With `in_bias=True, residual=False, ff="gelu", mlp_ratio=1` this is exactly a batch-first
    `nn.MultiheadAttention` (tokens as queries, latents as keys and values) followed by
    Linear-GELU-Linear: the pooler of the authors' `llm2vec/llm2vec.py` (conversion layout "mha").

    Tokens only attend to the latents, never to each other, so we gather the pooled tokens of
    the whole batch into one packed (T, D) matrix: padding costs nothing and one call serves
    every sample. Every option acts per token, so packing stays exact.
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, heads: int = 8, mlp_ratio: int = 4, *,
                 pre_norm: bool = False, ff: str = "gelu", head_dim: Optional[int] = None, out_bias: bool = True,
                 in_bias: bool = False, residual: bool = True):
        super().__init__()
        if ff not in LATENT_FF_KINDS:
            raise ValueError(f"ff must be one of {LATENT_FF_KINDS}, got {ff!r}")
        if head_dim is None:
            if hidden_size % heads:
                raise ValueError(f"hidden size {hidden_size} is not divisible by {heads} heads "
                                 f"(set head_dim to choose the attention width)")
            head_dim = hidden_size // heads
        self.heads, self.head_dim = heads, head_dim
        self.pre_norm, self.ff, self.residual = pre_norm, ff, residual
        inner = heads * head_dim
        self.latents = nn.Parameter(torch.empty(num_latents, hidden_size))
        if pre_norm:
            self.norm_tokens = nn.LayerNorm(hidden_size)
            self.norm_latents = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, inner, bias=in_bias)
        self.to_kv = nn.Linear(hidden_size, 2 * inner, bias=in_bias)
        self.to_out = nn.Linear(inner, hidden_size, bias=out_bias)
        if pre_norm:
            self.ff_norm = nn.LayerNorm(hidden_size)
        width = mlp_ratio * hidden_size
        # `mlp.0` / `mlp.2` keep their names for both kinds, so checkpoints map the same way.
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 2 * width if ff == "geglu" else width),
            GEGLU() if ff == "geglu" else nn.GELU(),
            nn.Linear(width, hidden_size),
        )
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.latents, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, D) token states -> (T, D) after latent cross-attention and feed-forward."""
        t = tokens.shape[0]
        h, dh = self.heads, self.head_dim
        latents = self.latents.to(tokens.dtype)
        queries = tokens
        if self.pre_norm:
            queries, latents = self.norm_tokens(tokens), self.norm_latents(latents)
        q = self.to_q(queries).view(t, h, dh).transpose(0, 1)                        # (H, T, dh)
        k, v = self.to_kv(latents).chunk(2, dim=-1)                                  # (N, H*dh) each
        k = k.view(-1, h, dh).transpose(0, 1)                                        # (H, N, dh)
        v = v.view(-1, h, dh).transpose(0, 1)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(t, h * dh)
        x = self.to_out(attended)
        if not self.residual:
            return self.mlp(x)
        x = tokens + x   # the residual takes the un-normalised tokens (PreNorm)
        return x + self.mlp(self.ff_norm(x) if self.pre_norm else x)

    def flops_per_token(self) -> float:
        """Forward FLOPs of one pooled token: its projections, its attention over the latents (scores
        and weighted values) and the feed-forward. The latents' own keys and values are computed
        once per call, not per token, and left out."""
        per_token_weights = [self.to_q, self.to_out, *(m for m in self.mlp if isinstance(m, nn.Linear))]
        macs = sum(m.weight.numel() for m in per_token_weights)
        macs += 2 * self.latents.shape[0] * self.heads * self.head_dim
        return 2.0 * macs

    def forward(self, hidden, mask):
        b = hidden.shape[0]
        rows = torch.arange(b, device=hidden.device).unsqueeze(1).expand_as(mask)[mask]
        out = self.attend(hidden[mask])
        sums = torch.zeros(b, out.shape[-1], dtype=out.dtype, device=out.device).index_add_(0, rows, out)
        counts = mask.sum(1, keepdim=True).clamp_min(1).to(out.dtype)
        return sums / counts


@register_pooler("mean")
def _mean(config) -> nn.Module:
    return MeanPooling()


@register_pooler("last_token")
def _last_token(config) -> nn.Module:
    return LastTokenPooling()


@register_pooler("latent_attention")
def _latent_attention(config) -> nn.Module:
    return LatentAttentionPooling(config.hidden_size, **{kw: getattr(config, field) for field, kw in LATENT_OPTIONS.items()})


def build_pooler(config) -> nn.Module:
    """The pooler `config.pooling` names, built by its registered builder."""
    if config.pooling not in POOLERS:
        raise ValueError(f"pooling must be one of {tuple(POOLERS)}, got {config.pooling!r}")
    return POOLERS[config.pooling](config)
