"""Poolers: token states (B, L, D) + a mask of tokens to pool (B, L) -> one vector per text.

All modes are batched; none loops over samples in Python.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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


class LatentAttentionPooling(nn.Module):
    """NV-Embed-style latent attention: each token attends over a learned latent array
    (keys and values), an MLP follows, then a masked mean.

    Tokens only attend to the latents, never to each other, so we gather the pooled tokens of
    the whole batch into one packed (T, D) matrix: padding costs nothing and one call serves
    every sample.
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, heads: int = 8, mlp_ratio: int = 4):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {heads} heads")
        self.heads = heads
        self.latents = nn.Parameter(torch.empty(num_latents, hidden_size))
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size),
            nn.GELU(),
            nn.Linear(mlp_ratio * hidden_size, hidden_size),
        )
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.latents, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, D) token states -> (T, D) after latent cross-attention and MLP (residual)."""
        t, d = tokens.shape
        h = self.heads
        q = self.to_q(tokens).view(t, h, d // h).transpose(0, 1)                     # (H, T, dh)
        k, v = self.to_kv(self.latents.to(tokens.dtype)).chunk(2, dim=-1)           # (N, D) each
        k = k.view(-1, h, d // h).transpose(0, 1)                                    # (H, N, dh)
        v = v.view(-1, h, d // h).transpose(0, 1)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(t, d)
        x = tokens + self.to_out(attended)
        return x + self.mlp(x)

    def forward(self, hidden, mask):
        b = hidden.shape[0]
        rows = torch.arange(b, device=hidden.device).unsqueeze(1).expand_as(mask)[mask]
        out = self.attend(hidden[mask])
        sums = torch.zeros(b, out.shape[-1], dtype=out.dtype, device=out.device).index_add_(0, rows, out)
        counts = mask.sum(1, keepdim=True).clamp_min(1).to(out.dtype)
        return sums / counts


def build_pooler(config) -> nn.Module:
    if config.pooling == "mean":
        return MeanPooling()
    if config.pooling == "last_token":
        return LastTokenPooling()
    return LatentAttentionPooling(
        config.hidden_size, config.num_latents, config.latent_heads, config.latent_mlp_ratio)
