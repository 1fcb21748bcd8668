"""One Gemma block, used by both the PaliGemma language model (prefix) and the action expert (suffix).

The prefix runs through the LLM's weights and leaves its keys/values in a cache; the suffix runs
through the expert's weights and attends to that cache plus itself. Because prefix tokens never
attend to suffix tokens, this split is exactly pi0's joint attention over [prefix, suffix].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import GemmaConfig
from .layers import GeGLU, RMSNorm, apply_rope, attention


class GemmaBlock(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.q_dim = cfg.num_heads * cfg.head_dim
        self.kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.width, cfg.eps, cond_dim)
        self.wqkv = nn.Linear(cfg.width, self.q_dim + 2 * self.kv_dim, bias=False)
        self.wo = nn.Linear(self.q_dim, cfg.width, bias=False)
        self.mlp_norm = RMSNorm(cfg.width, cfg.eps, cond_dim)
        self.mlp = GeGLU(cfg.width, cfg.mlp_dim)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor, cond: Tensor | None) -> tuple[Tensor, ...]:
        """Normed input -> q (B, H, T, D), k, v (B, KVH, T, D) with RoPE applied to q and k, and the gate."""
        b, t, _ = x.shape
        h, gate = self.attn_norm(x, cond)
        q, k, v = self.wqkv(h).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        d = self.cfg.head_dim
        q = apply_rope(q.view(b, t, -1, d).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, -1, d).transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, -1, d).transpose(1, 2), gate

    def finish(self, x: Tensor, attn: Tensor, gate: Tensor | None, cond: Tensor | None) -> Tensor:
        """Output projection, gated residual, MLP, gated residual."""
        b, t, _ = x.shape
        x = residual(x, self.wo(attn.transpose(1, 2).reshape(b, t, self.q_dim)), gate)
        h, gate = self.mlp_norm(x, cond)
        return residual(x, self.mlp(h), gate)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cond: Tensor | None = None,
                past_kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (x, k, v); k/v are this block's own (for a cache). past_kv is prepended for attention."""
        q, k, v, gate = self.qkv(x, cos, sin, cond)
        ka, va = (k, v) if past_kv is None else (cat_seq(past_kv[0], k), cat_seq(past_kv[1], v))
        return self.finish(x, attention(q, ka, va, mask), gate, cond), k, v


class GemmaStack(nn.Module):
    """A stack of Gemma blocks with a final norm (no embedding: callers embed)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(GemmaBlock(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.eps, cond_dim)


def residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    return x + y if gate is None else x + y * gate


def cat_seq(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a.to(b.dtype), b], dim=2)
