"""SigLIP vision tower (So400m/14 at full size): patches -> pre-LN transformer -> tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SiglipConfig
from .layers import attention


class SiglipBlock(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(attention(q, k, v, None).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SiglipVision(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> tokens (B, num_tokens, width)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, images: Tensor, blocks: Sequence[nn.Module] | None = None) -> Tensor:
        """`blocks` lets an optimized backend run its own (quantized) copies of the blocks."""
        blocks = self.blocks if blocks is None else blocks
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = (x + self.pos_embed).to(self.blocks[0].qkv.weight.dtype)  # the model's dtype
        for block in blocks:
            x = block(x)
        return self.norm(x)

