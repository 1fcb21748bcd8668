"""The FP8 prefill's norms and GeGLU quantizing their own output: module swaps over a quantized Gemma block copy.

GemmaBlock's code is unchanged: `attn_norm` and `mlp_norm` become NormToFP8, which hands the FP8Linear it feeds an
FP8Activation instead of a bf16 tensor, and `mlp` becomes FusedGeGLU, whose gate/up output is quantized by the
GeGLU kernel for the down projection. The kernels (fp8_kernels.py) are torch custom ops, so torch.compile'd
blocks and CUDA graphs treat them as single opaque launches. While a linear is calibrated or exported, its
producer runs the shared PyTorch code (model/layers.py) and the linear quantizes as before.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_policy.model.gemma import GemmaBlock
from pi_policy.model.layers import GeGLU, RMSNorm
from pi_policy.runtime.prefill.fp8_linear import FP8Activation, FP8Linear, dynamic_scale, quantize_fp8


# -- the kernels as custom ops: (static scale -> e4m3) and (per-row scales -> e4m3, (M, 1) scales) --------------------
@torch.library.custom_op("pi_policy::rmsnorm_fp8_static", mutates_args=())
def rmsnorm_fp8_static(x: Tensor, weight: Tensor, eps: float, scale: Tensor) -> Tensor:
    from pi_policy.runtime.prefill import fp8_kernels

    return fp8_kernels.rmsnorm_fp8(x, weight, eps, scale)[0]


@torch.library.custom_op("pi_policy::rmsnorm_fp8_rows", mutates_args=())
def rmsnorm_fp8_rows(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from pi_policy.runtime.prefill import fp8_kernels

    return fp8_kernels.rmsnorm_fp8(x, weight, eps)


@torch.library.custom_op("pi_policy::geglu_fp8_static", mutates_args=())
def geglu_fp8_static(gate_up: Tensor, scale: Tensor) -> Tensor:
    from pi_policy.runtime.prefill import fp8_kernels

    return fp8_kernels.geglu_fp8(gate_up, scale)[0]


@torch.library.custom_op("pi_policy::geglu_fp8_rows", mutates_args=())
def geglu_fp8_rows(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    from pi_policy.runtime.prefill import fp8_kernels

    return fp8_kernels.geglu_fp8(gate_up)


def _e4m3_like(x: Tensor, cols: int) -> Tensor:
    return x.new_empty((x.shape[0], cols), dtype=torch.float8_e4m3fn)


@rmsnorm_fp8_static.register_fake
def _(x, weight, eps, scale):
    return _e4m3_like(x, x.shape[1])


@rmsnorm_fp8_rows.register_fake
def _(x, weight, eps):
    return _e4m3_like(x, x.shape[1]), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@geglu_fp8_static.register_fake
def _(gate_up, scale):
    return _e4m3_like(gate_up, gate_up.shape[1] // 2)


@geglu_fp8_rows.register_fake
def _(gate_up):
    return _e4m3_like(gate_up, gate_up.shape[1] // 2), gate_up.new_empty((gate_up.shape[0], 1), dtype=torch.float32)


def _fusable(lin: nn.Module) -> bool:
    """The FP8 linear takes an activation its producer quantized: a static scale, or dynamic per row."""
    return isinstance(lin, FP8Linear) and not lin.quantizes_itself and (lin.act_scale is not None
                                                                           or lin.dynamic == "row")


class NormToFP8(nn.Module):
    """Gemma's RMSNorm whose output goes only to `consumer` (an FP8Linear), quantized by the norm's own kernel."""

    def __init__(self, norm: RMSNorm, consumer: FP8Linear):
        super().__init__()
        if norm.dense is not None:
            raise ValueError("NormToFP8 fuses the plain RMSNorm; the adaptive (pi0.5 expert) norm is not fused")
        self.norm = norm
        self.__dict__["consumer"] = consumer  # not a submodule: the block owns it

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor | FP8Activation, None]:
        lin = self.consumer
        if not _fusable(lin):
            return self.norm(x, cond)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w = self.norm.weight
        if lin.act_scale is not None:
            q = rmsnorm_fp8_static(x2, w, self.norm.eps, lin.act_scale)
            return FP8Activation(q, lin.act_scale, tuple(x.shape[:-1])), None
        q, rows = rmsnorm_fp8_rows(x2, w, self.norm.eps)
        return FP8Activation(q, rows, tuple(x.shape[:-1])), None


class FusedGeGLU(GeGLU):
    """GeGLU whose hidden activation is quantized by the GeGLU kernel for the FP8 down projection."""

    def forward(self, x: Tensor | FP8Activation) -> Tensor:
        if not _fusable(self.down):
            return super().forward(x)  # gate_up (an FP8Linear when x arrives quantized) takes x as it is
        gu = self.gate_up(x)
        lead, gu2 = gu.shape[:-1], gu.reshape(-1, gu.shape[-1]).contiguous()
        if self.down.act_scale is not None:
            h = FP8Activation(geglu_fp8_static(gu2, self.down.act_scale), self.down.act_scale, tuple(lead))
        else:
            h = FP8Activation(*geglu_fp8_rows(gu2), tuple(lead))
        return self.down(h)


FUSED_PRODUCERS = (NormToFP8, FusedGeGLU)


def fuse_block(block: GemmaBlock) -> GemmaBlock:
    """In a quantized block copy: the norms feeding an FP8 wqkv or gate_up, and the GeGLU feeding an FP8 down,
    quantize their own output. The swapped modules share the copy's parameters."""
    if isinstance(block.wqkv, FP8Linear):
        block.attn_norm = NormToFP8(block.attn_norm, block.wqkv)
    if isinstance(block.mlp.gate_up, FP8Linear):
        block.mlp_norm = NormToFP8(block.mlp_norm, block.mlp.gate_up)
    if isinstance(block.mlp.down, FP8Linear):
        block.mlp.__class__ = FusedGeGLU
    return block


def unavailable(device: torch.device) -> str:
    """Why the kernels cannot serve on `device` ('' when they can): each op is run once on a small input and
    checked against the PyTorch reference (this also compiles them before any CUDA graph capture)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"needs a CUDA GPU (here {device.type})"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(5, 96, device=device, generator=gen)
        norm = RMSNorm(96).to(device)
        with torch.no_grad():
            norm.weight.normal_(0, 0.5, generator=gen)
            ref = norm(x)[0]
            q, rows = rmsnorm_fp8_rows(x, norm.weight, norm.eps)
            gu = torch.randn(5, 64, device=device, generator=gen)
            ref_h = F.gelu(gu[:, :32], approximate="tanh") * gu[:, 32:]  # GeGLU.forward after its gate_up
            qh, rows_h = geglu_fp8_rows(gu)
        for (qk, sk), r in (((q, rows), ref), ((qh, rows_h), ref_h)):
            want = quantize_fp8(r, dynamic_scale(r, True)).float() * dynamic_scale(r, True)
            err = float((qk.float() * sk - want).abs().max() / want.abs().max())
            if not err < 0.07:  # one e4m3 step is at most 1/8 of a value; a broken kernel is off by far more
                return f"self-check off by {err:.3g} of the reference"
    except Exception as e:  # noqa: BLE001 - no Triton, or a platform without FP8 conversion: serve unfused
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return ""
