"""The shared math: RMSNorm (plain and adaptive), RoPE, attention, GeGLU MLP. Every backend uses these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Gemma RMSNorm, y = x / rms(x) * (1 + w), computed in float32.

    With cond_dim set it is pi0.5's adaptive RMSNorm: a dense layer maps the condition to
    (scale, shift, gate); y = x / rms(x) * (1 + scale) + shift and the caller gates its residual.
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (y * (1.0 + self.weight.float())).to(x.dtype), None
        scale, shift, gate = self.dense(cond).float().unsqueeze(1).chunk(3, dim=-1)
        return (y * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B, T, head_dim) in float32 for integer positions (B, T)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, head_dim) by the half-split convention Gemma uses."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention. q (B, H, T, D); k, v (B, KVH, S, D); mask bool (B, T, S) or None.

    Without a mask (SigLIP) this is fused SDPA. With one, the query heads that share a KV head are folded
    into rows, so grouped-query attention is two plain matmuls around a float32 softmax: at pi0's shapes
    (one KV head, 50-800 queries) that beats the fused kernels, which are tuned for long sequences.
    Every masked row must keep at least one True.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    b, h, t, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    if s % 8:  # an odd key count misaligns the score rows; cuBLAS then picks slow kernels (pi0: 816 + 51 keys)
        pad = 8 - s % 8
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    scores = (q.reshape(b, kvh, g * t, d) @ k.transpose(-1, -2)).float() * d**-0.5
    scores = scores.masked_fill(~mask.repeat(1, g, 1)[:, None], float("-inf"))
    out = scores.softmax(dim=-1).to(v.dtype) @ v
    return out.view(b, h, t, d)


class GeGLU(nn.Module):
    """Gemma's gated MLP with gate and up projections fused into one matmul."""

    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)
