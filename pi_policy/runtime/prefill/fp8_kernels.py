"""Triton kernels that produce FP8 activations: RMSNorm -> e4m3 and GeGLU -> e4m3, each in one pass over its input.

The FP8 prefill's GEMMs read e4m3 activations. Quantizing the output of RMSNorm or of GeGLU as a separate pass
writes the bf16 activation, reads it back for its amax and again to quantize; here the kernel that computes the
activation quantizes it before anything is written. With a static scale (from calibration) the scale is an input;
without one each row gets its own scale from its amax (one program per row, so the amax never leaves the program):
the scale is fp8_scale's, amax / 448 rounded up to a bfloat16 value. One program handles one row; the row is read
in BLOCK-wide pieces. All kernels run under TRITON_INTERPRET=1 for CPU tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

E4M3_MAX = 448.0
MAX_BLOCK = 4096  # columns per load

# Triton's interpreter converts float32 -> e4m3 without carrying a mantissa round-up into the exponent
# (0.498 -> 0.25): there each value is first rounded to e4m3 in float32 (the GPU's conversion rounds to nearest even).
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _e4m3(v):
    """float32 v (already within +-448) -> float8_e4m3fn, round to nearest even."""
    if _INTERPRET:
        e = tl.floor(tl.log2(tl.maximum(tl.abs(v), 1e-30)))
        ulp = tl.exp2(tl.maximum(e, -6.0) - 3.0)  # 3 mantissa bits; subnormals below 2^-6
        v = ((v / ulp + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: float32 addition rounds to nearest even
    return v.to(tl.float8e4nv)


@triton.jit
def _scale_of(amax):
    """fp8_scale: max(amax, 1e-12) / 448, rounded up to the next bfloat16 value (exact in a bf16 graph)."""
    s = tl.maximum(amax, 1e-12) / 448.0
    bits = s.to(tl.int32, bitcast=True)
    return ((bits + 0xFFFF) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_store(y, q_ptrs, mask, inv_scale):
    v = tl.minimum(tl.maximum(y * inv_scale, -448.0), 448.0)
    tl.store(q_ptrs, _e4m3(v), mask=mask)


# -- RMSNorm -> e4m3: y = x / rms(x) * (1 + w) ------------------------------------------------------------------------
@triton.jit
def _rmsnorm_fp8(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps,
                 STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row, q_row = x_ptr + row * stride_x, q_ptr + row * stride_q
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        ss += x * x
    rs = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    if STATIC:
        scale = tl.load(s_ptr)
    else:  # this row's amax first: a second read of the row, from cache
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            rk = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x * rs * (1.0 + w)))
        scale = _scale_of(tl.max(amax, axis=0))
        tl.store(s_ptr + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        _quantize_store(x * rs * (1.0 + w), q_row + rk, rk < K, inv)


# -- GeGLU -> e4m3: h = gelu_tanh(g) * u for [g, u] = one row of the gate/up projection --------------------------------
@triton.jit
def _geglu(gu_row, rf, F):
    g = tl.load(gu_row + rf, mask=rf < F, other=0.0).to(tl.float32)
    u = tl.load(gu_row + F + rf, mask=rf < F, other=0.0).to(tl.float32)
    # tanh-approximate GELU: 0.5 g (1 + tanh(z)) = g * sigmoid(2 z)
    return g * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) * u


@triton.jit
def _geglu_fp8(gu_ptr, q_ptr, s_ptr, F, stride_gu, stride_q, STATIC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    gu_row, q_row = gu_ptr + row * stride_gu, q_ptr + row * stride_q
    if STATIC:  # programs (row, column block): one pass
        rf = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        _quantize_store(_geglu(gu_row, rf, F), q_row + rf, rf < F, 1.0 / tl.load(s_ptr))
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for f0 in range(0, F, BLOCK):
            amax = tl.maximum(amax, tl.abs(_geglu(gu_row, f0 + tl.arange(0, BLOCK), F)))
        scale = _scale_of(tl.max(amax, axis=0))
        tl.store(s_ptr + row, scale)
        inv = 1.0 / scale
        for f0 in range(0, F, BLOCK):
            rf = f0 + tl.arange(0, BLOCK)
            _quantize_store(_geglu(gu_row, rf, F), q_row + rf, rf < F, inv)


def _block(n: int) -> int:
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(n)))


def _rows(x: Tensor, n: int) -> Tensor:
    if x.dim() != 2 or x.shape[1] != n or x.stride(1) != 1:
        raise ValueError(f"expected a row-major (M, {n}) tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    return x


def rmsnorm_fp8(x: Tensor, weight: Tensor, eps: float, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (e4m3 (M, K), scale): RMSNorm with Gemma's (1 + w), quantized by the static `scale` (returned
    as given), or per row (a new (M, 1) float32 scale) when scale is None."""
    m, k = _rows(x, weight.numel()).shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = scale if scale is not None else torch.empty((m, 1), dtype=torch.float32, device=x.device)
    _rmsnorm_fp8[(m,)](x, weight, q, s, k, x.stride(0), q.stride(0), eps, STATIC=scale is not None,
                       BLOCK=_block(k))
    return q, s


def geglu_fp8(gate_up: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """gate_up (M, 2F), gate columns first -> (e4m3 gelu_tanh(gate) * up (M, F), scale): quantized by the static
    `scale` (returned as given), or per row (a new (M, 1) float32 scale) when scale is None."""
    m, f2 = gate_up.shape
    if f2 % 2:
        raise ValueError(f"gate_up must have an even number of columns, got {f2}")
    f = f2 // 2
    _rows(gate_up, f2)
    q = torch.empty((m, f), dtype=torch.float8_e4m3fn, device=gate_up.device)
    s = scale if scale is not None else torch.empty((m, 1), dtype=torch.float32, device=gate_up.device)
    block = _block(f)
    grid = (m, triton.cdiv(f, block)) if scale is not None else (m,)
    _geglu_fp8[grid](gate_up, q, s, f, gate_up.stride(0), q.stride(0), STATIC=scale is not None, BLOCK=block)
    return q, s
