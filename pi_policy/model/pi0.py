"""The pi0 / pi0.5 model with one method per inference stage, all on static shapes.

    embed_images -> embed_prefix -> prefill (KV cache) -> denoise (N Euler flow-matching steps)

sample_actions composes them. Noise is an argument, so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PiConfig
from .gemma import GemmaBlock, GemmaStack
from .layers import rope_cos_sin
from .rtc import RTCInputs
from .siglip import SiglipVision

KVCache = tuple[Tensor, Tensor]  # K and V, each (layers, B, kv_heads, prefix_len, head_dim), RoPE applied to K


class PiModel(nn.Module):
    def __init__(self, cfg: PiConfig):
        super().__init__()
        self.cfg = cfg
        we = cfg.expert.width
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.llm.width)
        self.llm = GemmaStack(cfg.llm)
        self.expert = GemmaStack(cfg.expert, cond_dim=we if cfg.pi05 else None)
        self.action_in = nn.Linear(cfg.action_dim, we)
        self.action_out = nn.Linear(we, cfg.action_dim)
        if cfg.pi05:
            self.time_in = nn.Linear(we, we)
            self.time_out = nn.Linear(we, we)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, we)
            self.action_time_in = nn.Linear(2 * we, we)
            self.action_time_out = nn.Linear(we, we)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.layers[0].wqkv.weight.dtype

    # -- stage 1: vision ------------------------------------------------------------------------
    def embed_images(self, images: Tensor, blocks: Sequence[nn.Module] | None = None,
                     projector: nn.Module | None = None) -> Tensor:
        """(B, cameras, 3, H, W) in [-1, 1] -> image tokens (B, cameras * tokens, llm width).

        `blocks` and `projector` let an optimized backend run its own (quantized) copies of the SigLIP blocks and
        of the projection into the LLM's width.
        """
        b, n = images.shape[:2]
        x = self.vision(images.flatten(0, 1), blocks)
        return (projector or self.projector)(x).reshape(b, n * x.shape[1], -1)

    # -- stage 2: embed prefix ------------------------------------------------------------------
    def embed_prefix(self, image_tokens: Tensor, image_masks: Tensor, tokens: Tensor,
                     token_masks: Tensor) -> tuple[Tensor, Tensor]:
        """Image tokens + prompt tokens -> prefix embeddings (B, P, D) and padding mask (B, P)."""
        lang = self.embed_tokens(tokens) * math.sqrt(self.cfg.llm.width)
        embs = torch.cat([image_tokens, lang.to(image_tokens.dtype)], dim=1)
        per_image = image_tokens.shape[1] // image_masks.shape[1]
        pad = torch.cat([image_masks.repeat_interleave(per_image, dim=1), token_masks], dim=1)
        return embs, pad

    # -- stage 3: prefill -----------------------------------------------------------------------
    def prefill(self, prefix_embs: Tensor, prefix_pad: Tensor, cache: KVCache | None = None,
                layers: Sequence[GemmaBlock] | None = None) -> KVCache:
        """Run the LLM over the prefix; write K/V of every layer into `cache` (allocated if None).

        `layers` lets an optimized backend run its own (quantized) copies of the blocks.
        """
        layers = self.llm.layers if layers is None else layers
        cfg = self.cfg.llm
        if cache is None:
            b, p = prefix_pad.shape
            shape = (len(layers), b, cfg.num_kv_heads, p, cfg.head_dim)
            cache = (prefix_embs.new_empty(shape), prefix_embs.new_empty(shape))
        cos, sin = rope_cos_sin(torch.cumsum(prefix_pad.long(), dim=1) - 1, cfg.head_dim, cfg.rope_base)
        mask = prefix_attention_mask(prefix_pad)
        x = prefix_embs
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:  # only the last layer's K/V are ever read: skip its attention and MLP
                _, k, v, _ = layer.qkv(x, cos, sin, None)
            else:
                x, k, v = layer(x, cos, sin, mask)
            cache[0][i].copy_(k)
            cache[1][i].copy_(v)
        return cache

    # -- stage 4: denoise -----------------------------------------------------------------------
    def suffix_attention(self, prefix_pad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mask (B, S, P + S) and RoPE tables for the suffix tokens attending to [prefix, suffix]."""
        b, s = prefix_pad.shape[0], self.cfg.suffix_len
        # Block-causal: pi0's state token sees only itself (and the prefix); actions see state and actions.
        block = torch.zeros(s, dtype=torch.long, device=prefix_pad.device)
        block[s - self.cfg.horizon:] = 1
        own = block[None, :] <= block[:, None]
        mask = torch.cat([prefix_pad[:, None, :].expand(b, s, -1), own.expand(b, s, s)], dim=2)
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.arange(s, device=prefix_pad.device)
        cos, sin = rope_cos_sin(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_base)
        return mask, cos, sin

    def velocity(self, x_t: Tensor, t: Tensor, state: Tensor, cache: KVCache, mask: Tensor, cos: Tensor,
                 sin: Tensor) -> Tensor:
        """Flow-matching velocity at time t (B,) for noisy actions x_t (B, horizon, action_dim)."""
        dtype = self.dtype
        tokens = self.action_in(x_t.to(dtype))
        t_emb = time_embedding(t, self.cfg.expert.width).to(dtype)
        cond = None
        if self.cfg.pi05:
            cond = F.silu(self.time_out(F.silu(self.time_in(t_emb))))
        else:
            at = torch.cat([tokens, t_emb[:, None].expand_as(tokens)], dim=-1)
            tokens = self.action_time_out(F.silu(self.action_time_in(at)))
            tokens = torch.cat([self.state_proj(state.to(dtype))[:, None], tokens], dim=1)
        x = tokens
        for i, layer in enumerate(self.expert.layers):
            x, _, _ = layer(x, cos, sin, mask, cond, past_kv=(cache[0][i], cache[1][i]))
        x, _ = self.expert.norm(x, cond)
        return self.action_out(x[:, -self.cfg.horizon:]).float()

    def denoise(self, cache: KVCache, prefix_pad: Tensor, state: Tensor, noise: Tensor,
                num_steps: int | None = None, velocity=None, rtc: RTCInputs | None = None) -> Tensor:
        """Integrate from t=1 (noise) to t=0 (actions) with Euler steps; returns float32 (B, H, A).

        `velocity` may be a compiled version of self.velocity (with rtc guided, one that supports autograd).
        `rtc` continues a previous chunk (model.rtc); without it the loop is the plain one.
        """
        n = num_steps or self.cfg.num_steps
        velocity = velocity or self.velocity
        mask, cos, sin = self.suffix_attention(prefix_pad)
        x = noise.float()
        dt, times = euler_times(n)
        for step, time in enumerate(times):
            t = torch.full((x.shape[0],), time, device=x.device)
            if rtc is None or rtc.mode == "inpaint":
                v = velocity(x, t, state, cache, mask, cos, sin)
            else:
                v = rtc.guided_velocity(lambda x, t=t: velocity(x, t, state, cache, mask, cos, sin), x, time)
            x = x + dt * v
            if rtc is not None and rtc.mode == "inpaint":
                x = rtc.inpaint(x, noise.float(), (n - 1 - step) / n)  # exactly 0 after the last step
        return x

    # -- all stages -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                       state: Tensor, noise: Tensor, num_steps: int | None = None) -> Tensor:
        image_tokens = self.embed_images(images)
        embs, pad = self.embed_prefix(image_tokens, image_masks, tokens, token_masks)
        cache = self.prefill(embs, pad)
        return self.denoise(cache, pad, state, noise, num_steps)


def euler_times(num_steps: int) -> tuple[float, list[float]]:
    """The float32 step dt and the times 1, 1 + dt, ... that openpi's and LeRobot's loops visit (they add dt to a
    float32 time at each step, which can differ from 1 + k * dt in the last bit)."""
    dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
    t, times = torch.tensor(1.0, dtype=torch.float32), []
    for _ in range(num_steps):
        times.append(t.item())
        t = t + dt
    return dt.item(), times


def time_embedding(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """Sine-cosine embedding (B, dim) of flow-matching times t (B,), periods from 4e-3 to 4 (sensitive on [0, 1]).

    Computed in float64 and cast to float32, as openpi and LeRobot do: the fastest component turns 1571 rad per
    unit of t, so float32 phases would be off by up to 1e-4. No buffer: `model.to(bfloat16)` would round it.
    """
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    phase = (1.0 / period * 2 * math.pi)[None, :] * t.to(torch.float64)[:, None]
    return torch.cat([phase.sin(), phase.cos()], dim=-1).float()


def prefix_attention_mask(pad: Tensor) -> Tensor:
    """Bidirectional among valid prefix tokens; a padded token attends only to itself (keeps rows finite)."""
    idx = torch.arange(pad.shape[1], device=pad.device)
    return (pad[:, None, :] & pad[:, :, None]) | (idx[:, None] == idx[None, :])


RESIDUAL_OUT = (".wo.", ".mlp.down.", ".out.", ".fc2.")  # projections that write into a residual stream


def init_random(model: PiModel, seed: int = 0) -> PiModel:
    """Deterministic random weights for demos, tests and benchmarks: std 0.02 matrices, zero biases, and
    the projections that write into a residual stream scaled by 1/sqrt(2 * depth) (GPT-2's scheme), so each
    layer updates the stream by a fraction of its size, as in trained models."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)  # values depend on the device type, not the run
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith("bias") or p.ndim == 1) and ".dense." not in name:
                p.zero_()
            else:  # adaptive-norm dense layers too: small, non-zero modulation so pi0.5 paths are exercised
                depth = model.cfg.vision.depth if name.startswith("vision.") else model.cfg.llm.depth
                std = 0.02 / math.sqrt(2 * depth) if any(k in name for k in RESIDUAL_OUT) else 0.02
                p.normal_(0.0, std, generator=gen)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
    return model


KEEP_FP32 = ("attn_norm.weight", "mlp_norm.weight", "llm.norm.weight", "expert.norm.weight", "patch_embed", "pos_embed")


def cast_for_inference(model: PiModel, dtype: torch.dtype) -> PiModel:
    """Cast weights to `dtype`, keeping norms and the patch/position embeddings in float32 as openpi does."""
    model.to(dtype)
    for name, p in model.named_parameters():
        if any(key in name for key in KEEP_FP32):
            p.data = p.data.float()
    return model
