"""The action expert packed once for the Triton kernels: a drop-in for PiModel.denoise (and .velocity).

At start-up each expert layer's four matrices are copied into the kernels' layout (bf16, or float8_e4m3fn with
per-output-channel scales), Gemma's RMSNorm (1 + w) folded into the following projection. Everything that
depends only on the denoise time is computed once per step schedule: pi0's time half of action_time_in, and
pi0.5's adaptive-norm (scale, shift, gate) for every norm and step, with each shift pushed through its
projection into a bias. Per layer-step the kernels then run: qkv (split-K) -> attention (split over keys) ->
combine -> output projection into the residual -> norm + gate/up + GeGLU -> down projection into the residual.
The residual stream stays float32. The model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pi_policy.model.layers import rope_cos_sin
from pi_policy.model.pi0 import KVCache, PiModel, euler_times, time_embedding
from pi_policy.runtime.expert import kernels
from pi_policy.runtime.options import EXPERT_MATRICES, kept_cells
from pi_policy.runtime.prefill.fp8_linear import quantize_weight

WEIGHTS = ("bf16", "fp8")
MATRICES = EXPERT_MATRICES


def pack(w: Tensor, fold: Tensor | None, fp8: bool) -> tuple[Tensor, Tensor | None]:
    """(out, in) weight -> kernel weight (bf16, or fp8 with its (out,) float32 scales), RMSNorm's (1 + w) folded."""
    w = w.detach().float()
    if fold is not None:
        w = w * (1.0 + fold.detach().float())[None, :]
    if fp8:
        w8, scale = quantize_weight(w, per_channel=True)
        return w8.contiguous(), scale.view(-1).contiguous()
    return w.to(torch.bfloat16).contiguous(), None


def pack_layer(blk, name: str, adaptive: bool, fp8: bool) -> tuple[Tensor, Tensor | None]:
    """One expert layer's matrix `name` (of MATRICES) packed; pi0's RMSNorm weights folded into qkv and gate_up."""
    w, norm = {"qkv": (blk.wqkv.weight, blk.attn_norm), "wo": (blk.wo.weight, None),
               "gate_up": (blk.mlp.gate_up.weight, blk.mlp_norm), "down": (blk.mlp.down.weight, None)}[name]
    return pack(w, None if adaptive or norm is None else norm.weight, fp8)


@dataclass
class Stack:
    """One matrix kind over all layers, as the kernels read it. One format: `w` (layers, out, in), FP8 `scale`
    (layers, out). Mixed (FP8 with some layers kept bf16): `w` and `scale` hold the FP8 layers, `kept` the bf16
    ones, and `slot` (layers,) int32 says where layer i is: slot >= 0 in w, slot < 0 in kept[-1 - slot]."""

    w: Tensor
    scale: Tensor | None = None
    kept: Tensor | None = None
    slot: Tensor | None = None

    @property
    def mode(self) -> int:
        """0: bf16, 1: FP8, 2: mixed."""
        return 2 if self.kept is not None else int(self.scale is not None)

    def layer(self, i: int) -> tuple[Tensor, Tensor | None]:
        if self.slot is None:
            return self.w[i], None if self.scale is None else self.scale[i]
        s = int(self.slot[i])
        return (self.w[s], self.scale[s]) if s >= 0 else (self.kept[-1 - s], None)


def stack(packed: list[tuple[Tensor, Tensor | None]]) -> Stack:
    """Per-layer packed matrices (bf16, FP8 with scales, or both) -> one Stack, filled in place."""
    fp8 = [i for i, (_, s) in enumerate(packed) if s is not None]
    kept = [i for i, (_, s) in enumerate(packed) if s is None]

    def fill(idx: list[int], j: int) -> Tensor | None:
        if not idx:
            return None
        first = packed[idx[0]][j]
        out = first.new_empty((len(idx), *first.shape))
        for k, i in enumerate(idx):
            out[k].copy_(packed[i][j])
        return out

    if not fp8 or not kept:
        return Stack(fill(list(range(len(packed))), 0), fill(fp8, 1))
    slot = torch.tensor([fp8.index(i) if i in fp8 else -1 - kept.index(i) for i in range(len(packed))],
                        dtype=torch.int32, device=packed[0][0].device)
    return Stack(fill(fp8, 0), fill(fp8, 1), fill(kept, 0), slot)


def dequantize(w: Tensor, scale: Tensor | None) -> Tensor:
    """The float32 matrix a kernel multiplies by."""
    return w.float() if scale is None else w.float() * scale[:, None]


class FusedExpert:
    """The expert's denoise loop on the fused kernels; `weights` is "bf16" or "fp8" (weight-only, W8A16), with
    the matrices named in `keep_bf16` (kept_cells: a kind in every layer or in some) left in bf16."""

    def __init__(self, model: PiModel, weights: str = "bf16", keep_bf16: Iterable[str] = ()):
        if weights not in WEIGHTS:
            raise ValueError(f"unknown expert weight format {weights!r}; choose one of {WEIGHTS}")
        cfg = model.cfg
        self.model, self.cfg, self.weights = model, cfg, weights
        adaptive = cfg.pi05
        kept = kept_cells(keep_bf16, cfg.expert.depth)
        with torch.no_grad():
            # each matrix kind stacked over layers, which the persistent kernel indexes; per-layer views
            self.stacked = {name: stack([pack_layer(blk, name, adaptive, weights == "fp8" and (i, name) not in kept)
                                         for i, blk in enumerate(model.expert.layers)]) for name in MATRICES}
            self.layers = [{name: st.layer(i) for name, st in self.stacked.items()}
                           for i in range(len(model.expert.layers))]
            self.out_w = pack(model.action_out.weight, None if adaptive else model.expert.norm.weight, False)[0]
            self.out_b = model.action_out.bias.detach().float()
            if not adaptive:  # action_time_in(cat(tokens, t_emb)): the token half here, the time half per step
                self.w_action_time = model.action_time_in.weight[:, : cfg.expert.width].contiguous()
        self._schedules: dict[int, dict[str, Tensor]] = {}
        self.schedule(cfg.num_steps)  # before any CUDA graph capture

    # -- what depends only on time ---------------------------------------------------------------------------
    @torch.no_grad()
    def step_tables(self, ts: Tensor) -> dict[str, Tensor]:
        """Per-step constants for denoise times ts (n,): stacked (n, ...) tensors."""
        m, we = self.model, self.cfg.expert.width
        emb = time_embedding(ts, we).to(m.dtype)
        if not self.cfg.pi05:
            return {"time_bias": F.linear(emb, m.action_time_in.weight[:, we:], m.action_time_in.bias)}
        cond = F.silu(m.time_out(F.silu(m.time_in(emb))))

        def modulation(norm, packed):  # (1 + scale) on x, shift @ W.T as a bias, gate on the residual
            scale, shift, gate = norm.dense(cond).float().chunk(3, dim=-1)
            return 1.0 + scale, shift @ dequantize(*packed).T, gate

        tables: dict[str, list] = {k: [] for k in ("mod_attn", "bias_qkv", "gate_attn", "mod_mlp", "bias_gu",
                                                   "gate_mlp")}
        for blk, packed in zip(m.expert.layers, self.layers, strict=True):
            for key, val in zip(("mod_attn", "bias_qkv", "gate_attn"), modulation(blk.attn_norm, packed["qkv"]),
                                strict=True):
                tables[key].append(val)
            for key, val in zip(("mod_mlp", "bias_gu", "gate_mlp"), modulation(blk.mlp_norm, packed["gate_up"]),
                                strict=True):
                tables[key].append(val)
        out = {k: torch.stack(v, dim=1).contiguous() for k, v in tables.items()}  # (n, layers, ...)
        mod, bias, _ = modulation(m.expert.norm, (self.out_w, None))
        out["mod_out"], out["bias_out"] = mod.contiguous(), (bias + self.out_b).contiguous()
        return out

    def schedule(self, n: int) -> dict[str, Tensor]:
        """step_tables for the Euler schedule t = 1, 1 - 1/n, ..., 1/n (cached: build it outside graph capture)."""
        if n not in self._schedules:
            _, times = euler_times(n)  # the model's (and the peers') float32 times
            ts = torch.tensor(times, device=self.out_b.device)
            self._schedules[n] = self.step_tables(ts)
        return self._schedules[n]

    # -- one step --------------------------------------------------------------------------------------------
    def _step(self, xt: Tensor, out: Tensor, k: int, dt: float, tab: dict[str, Tensor], state_tok: Tensor | None,
              cache: KVCache, pad: Tensor, cos: Tensor, sin: Tensor) -> None:
        """out (B, horizon, A) += dt * velocity(xt) at step k of the tables (out may be xt: an Euler step)."""
        m, cfg = self.model, self.cfg
        e = cfg.expert
        b, s = xt.shape[0], cfg.suffix_len
        tokens = m.action_in(xt.to(m.dtype))
        x = xt.new_empty((b, s, e.width))
        if cfg.pi05:
            x.copy_(tokens)
        else:
            tokens = m.action_time_out(F.silu(F.linear(tokens, self.w_action_time, tab["time_bias"][k])))
            x[:, 0] = state_tok
            x[:, 1:] = tokens
        x = x.view(b * s, e.width)
        qkv = x.new_zeros((b * s, (e.num_heads + 2 * e.num_kv_heads) * e.head_dim))
        ss = x.new_zeros(b * s)
        attn = torch.empty((b * s, e.num_heads * e.head_dim), dtype=torch.bfloat16, device=x.device)
        h = torch.empty((b * s, e.mlp_dim), dtype=torch.bfloat16, device=x.device)
        ad = cfg.pi05
        tiles = {name: kernels.TILES[name] for name in MATRICES}
        for i, lw in enumerate(self.layers):
            kernels.linear_splitk(x, lw["qkv"][0], qkv, wscale=lw["qkv"][1], ss=ss,
                                  mod=tab["mod_attn"][k, i] if ad else None, tiles=tiles["qkv"])
            kernels.attention(qkv, ss, cache[0][i], cache[1][i], pad, cos, sin, attn, num_heads=e.num_heads,
                              n_state=s - cfg.horizon, norm_dim=e.width, eps=e.eps,
                              bias=tab["bias_qkv"][k, i] if ad else None)
            kernels.linear_splitk(attn, lw["wo"][0], x, wscale=lw["wo"][1],
                                  gate=tab["gate_attn"][k, i] if ad else None, tiles=tiles["wo"])
            kernels.norm_geglu(x, lw["gate_up"][0], h, e.eps, wscale=lw["gate_up"][1],
                               mod=tab["mod_mlp"][k, i] if ad else None, bias=tab["bias_gu"][k, i] if ad else None,
                               tiles=tiles["gate_up"])
            kernels.linear_splitk(h, lw["down"][0], x, wscale=lw["down"][1],
                                  gate=tab["gate_mlp"][k, i] if ad else None, tiles=tiles["down"])
        kernels.action_out(x, self.out_w, tab["bias_out"][k] if ad else self.out_b, out, e.eps, dt,
                           mod=tab["mod_out"][k] if ad else None)

    def _context(self, prefix_pad: Tensor, state: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        cfg, m = self.cfg, self.model
        s = cfg.suffix_len
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.arange(s, device=prefix_pad.device)
        cos, sin = rope_cos_sin(positions, cfg.expert.head_dim, cfg.expert.rope_base)
        state_tok = None if cfg.pi05 else m.state_proj(state.to(m.dtype))
        return state_tok, prefix_pad.to(torch.int8), cos.flatten(0, 1), sin.flatten(0, 1)

    # -- the model's interface -------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, cache: KVCache, prefix_pad: Tensor, state: Tensor, noise: Tensor,
                num_steps: int | None = None) -> Tensor:
        """PiModel.denoise on the fused kernels: Euler from t=1 (noise) to t=0; returns float32 (B, H, A)."""
        n = num_steps or self.cfg.num_steps
        tab = self.schedule(n)
        state_tok, pad, cos, sin = self._context(prefix_pad, state)
        xt = noise.float().clone()
        dt, _ = euler_times(n)
        for k in range(n):
            self._step(xt, xt, k, dt, tab, state_tok, cache, pad, cos, sin)
        return xt

    @torch.no_grad()
    def velocity(self, x_t: Tensor, t: Tensor, state: Tensor, cache: KVCache, mask: Tensor, cos: Tensor,
                 sin: Tensor) -> Tensor:
        """PiModel.velocity on the fused kernels (one time value for the whole batch)."""
        if t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
            raise ValueError("the fused expert takes one denoise time for the whole batch")
        p = cache[0].shape[3]
        pad = mask[:, -1, :p]  # an action token sees exactly the valid prefix keys
        state_tok, pad, _, _ = self._context(pad, state)
        v = torch.zeros_like(x_t, dtype=torch.float32)
        self._step(x_t.float(), v, 0, 1.0, self.step_tables(t.flatten()[:1]), state_tok, cache, pad,
                   cos.flatten(0, 1).float().contiguous(), sin.flatten(0, 1).float().contiguous())
        return v
