"""FP8Linear: a linear layer with float8_e4m3fn weights and quantized activations, its scales, and calibration.

Weights are quantized once (per tensor or per output channel); activations by a static scale from calibration, or
by dynamic scales per row or per tensor from each call's amax, or they arrive already quantized by the kernel that
produced them (FP8Activation). The GEMM is torch._scaled_mm on sm_89+, or the same quantization simulated
(quantize, dequantize, float matmul) elsewhere. The FP8 prefill (fp8.py) and the FP8 vision tower
(runtime/vision/fp8.py) are made of these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
KERNELS = ("scaled_mm", "simulated")
# Dynamic activation scales (no calibration): one per row (token) or one per tensor, from this call's amax.
DYNAMIC = ("row", "tensor")


class FP8Activation(NamedTuple):
    """An activation already quantized by the kernel that produced it, on its way to an FP8Linear."""

    data: Tensor  # (M, K) float8_e4m3fn
    scale: Tensor  # float32, () per tensor or (M, 1) per row
    lead: tuple[int, ...]  # the activation's leading shape (M = their product)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs through torch._scaled_mm: CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_scale(amax: Tensor) -> Tensor:
    """amax -> float32 scale, amax / scale <= 448, rounded up to a bfloat16 value (exact in a bf16 ONNX graph)."""
    s = amax.float().clamp(min=1e-12) / E4M3_MAX
    r = s.to(torch.bfloat16)
    # Positive bf16 values: the next representable value is the bit pattern plus one.
    up = (r.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(r.float() < s, up, r).float()


def quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Saturating quantization to float8_e4m3fn (a plain cast would turn overflow into NaN)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


_FUSED: dict[str, object] = {}


def fused_quantize(x: Tensor, scale: Tensor) -> Tensor:
    """quantize_fp8 as one generated kernel: eager it is four passes over an fp32 copy, which cost more than
    the FP8 GEMM saves at prefill sizes (816x16384 activations: 0.15 ms eager vs a 0.04 ms GEMM on an H100)."""
    if "q" not in _FUSED:
        _FUSED["q"] = torch.compile(quantize_fp8, dynamic=False, fullgraph=True)
    return _FUSED["q"](x, scale)


def dynamic_scale(x: Tensor, rows: bool) -> Tensor:
    """The scale of this call's amax: (M, 1) per row of a 2-D x, or () for the whole tensor."""
    amax = (torch.linalg.vector_norm(x, math.inf, dim=-1, keepdim=True, dtype=torch.float32) if rows
            else torch.linalg.vector_norm(x, math.inf, dtype=torch.float32))
    return fp8_scale(amax)


def dynamic_quantize(x: Tensor, rows: bool = False) -> tuple[Tensor, Tensor]:
    """Scale from this call's amax (per row of a 2-D x, or per tensor), then quantize."""
    scale = dynamic_scale(x, rows)
    return quantize_fp8(x, scale), scale


def fused_dynamic_quantize(x: Tensor, rows: bool = False) -> tuple[Tensor, Tensor]:
    """dynamic_quantize compiled: a reduction and one pointwise kernel instead of a dozen small launches."""
    key = "d-rows" if rows else "d"
    if key not in _FUSED:
        _FUSED[key] = torch.compile(dynamic_quantize, dynamic=False, fullgraph=True)
    return _FUSED[key](x, rows)


def quantize_weight(w: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> (fp8 weight, float32 scale of shape (out, 1) or ())."""
    w = w.detach()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = fp8_scale(amax)
    return quantize_fp8(w, scale), scale


class QDQ(torch.autograd.Function):
    """Quantize to FP8 and back; exported to ONNX as QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        return (quantize_fp8(x, scale).float() * scale.float()).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale):
        zero = g.op("Constant", value_t=torch.zeros((), dtype=FP8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale)


class DequantWeight(torch.autograd.Function):
    """FP8 weight (out, in) times its scale; exported as DequantizeLinear of an FP8 initializer."""

    @staticmethod
    def forward(ctx, w8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
        s = scale.float().view(-1, 1) if scale.ndim else scale.float()
        return (w8.float() * s).to(dtype)

    @staticmethod
    def symbolic(g, w8, scale, dtype):
        per_channel = scale.type().dim() == 1
        return g.op("DequantizeLinear", w8, scale, axis_i=0) if per_channel else g.op("DequantizeLinear", w8, scale)


class FP8Linear(nn.Module):
    """y = x W^T with W in float8_e4m3fn and x quantized: by a static per-tensor scale if calibrated, else by
    dynamic scales per row (`dynamic="row"`) or per tensor. x may arrive already quantized (FP8Activation)."""

    def __init__(self, linear: nn.Linear, *, per_channel: bool = False, kernel: str = "simulated",
                 fast_accum: bool = True, fuse_quant: bool = True, dynamic: str = "tensor"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown FP8 kernel {kernel!r}; choose one of {KERNELS}")
        if dynamic not in DYNAMIC:
            raise ValueError(f"unknown dynamic activation scaling {dynamic!r}; choose one of {DYNAMIC}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype  # the model's: what an input that arrived quantized comes back as
        w8, ws = quantize_weight(linear.weight, per_channel)
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", ws)
        # the weight scale as _scaled_mm's row-wise scale_b (1, N): used with per-row activation scales
        self.register_buffer("weight_scale_row", ws.reshape(1, -1).expand(1, self.out_features).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("act_scale", None)  # set by calibration; None -> dynamic per-call scale
        self.register_buffer("observed_amax", None)  # running max of |x| while calibrating
        self.per_channel, self.kernel, self.fast_accum, self.dynamic = per_channel, kernel, fast_accum, dynamic
        self.fuse_quant = fuse_quant  # scaled_mm path only; compiled on first call
        self.observing = False
        self.exporting = False

    def extra_repr(self) -> str:
        scales = "static" if self.act_scale is not None else f"dynamic per {self.dynamic}"
        return (f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, "
                f"weights={'per-channel' if self.per_channel else 'per-tensor'}, activations={scales}")

    @property
    def quantizes_itself(self) -> bool:
        """Its input must arrive unquantized: it is being calibrated or exported."""
        return self.observing or self.exporting

    def forward(self, x: Tensor | FP8Activation) -> Tensor:
        if isinstance(x, FP8Activation):
            return self.gemm(x.data, x.scale, self.out_dtype).reshape(*x.lead, self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.observing:
            amax = x2.detach().abs().amax().float()
            self.observed_amax = amax if self.observed_amax is None else torch.maximum(self.observed_amax, amax)
        if self.exporting:
            return self._export_forward(x2).reshape(*lead, self.out_features)
        xq, sa = self.quantize(x2)
        return self.gemm(xq, sa, x.dtype).reshape(*lead, self.out_features)

    def quantize(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """(M, K) -> (e4m3 (M, K), scale): the static scale, or this call's per row or per tensor."""
        fused = self.kernel == "scaled_mm" and self.fuse_quant
        if self.act_scale is not None:
            return (fused_quantize if fused else quantize_fp8)(x2, self.act_scale), self.act_scale
        return (fused_dynamic_quantize if fused else dynamic_quantize)(x2, self.dynamic == "row")

    def gemm(self, xq: Tensor, sa: Tensor, out_dtype: torch.dtype) -> Tensor:
        """e4m3 (M, K) with its scale (() or (M, 1)) times the FP8 weight -> (M, N) in out_dtype."""
        if self.kernel == "simulated":  # quantize-dequantize numerics, float matmul
            w = (self.weight.float() * self.weight_scale).to(out_dtype)
            y = (xq.float() * sa).to(out_dtype) @ w.t()
            return y if self.bias is None else y + self.bias.to(out_dtype)
        rowwise = self.per_channel or sa.ndim == 2  # row-wise scaling: scale_a (M, 1), scale_b (1, N)
        sb = self.weight_scale_row if rowwise else self.weight_scale
        if rowwise and sa.ndim < 2:
            sa = sa.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
        bias = None if self.bias is None else self.bias.to(out_dtype)
        # b must be column-major: the transpose of a row-major (out, in) weight is exactly that.
        return torch._scaled_mm(xq, self.weight.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype,
                                use_fast_accum=self.fast_accum)

    def _export_forward(self, x2: Tensor) -> Tensor:
        """Q/DQ in the input's dtype, for ONNX: TensorRT's activation scales are constants."""
        if self.act_scale is None:
            raise ValueError("ONNX export needs a static activation scale for every FP8 linear the prefill runs "
                             "(TensorRT's Q/DQ scales are constants): calibrate first (pi-policy calibrate)")
        dt = x2.dtype
        ws = self.weight_scale.to(dt).flatten() if self.per_channel else self.weight_scale.to(dt)
        y = QDQ.apply(x2, self.act_scale.to(dt)) @ DequantWeight.apply(self.weight, ws, dt).t()
        return y if self.bias is None else y + self.bias.to(dt)


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, module)


@torch.no_grad()
def observe_amax(lins: dict[str, FP8Linear], run: Callable[[object], object], samples: Iterable,
                 progress: bool = False, desc: str = "fp8 calibration") -> dict[str, float]:
    """Static activation amax per linear: the running max |x| each linear sees while run(sample) runs on every
    sample. A linear that sees nothing gets no entry. The linears' scales are unchanged."""
    saved = {name: lin.act_scale for name, lin in lins.items()}
    for lin in lins.values():
        lin.act_scale, lin.observed_amax, lin.observing = None, None, True
    try:
        n = 0
        for sample in tqdm(list(samples), desc=desc, disable=not progress, leave=False):
            run(sample)
            n += 1
        if n == 0:
            raise ValueError("FP8 calibration needs at least one sample")
        return {name: float(lin.observed_amax) for name, lin in lins.items() if lin.observed_amax is not None}
    finally:
        for name, lin in lins.items():
            lin.observing, lin.observed_amax, lin.act_scale = False, None, saved[name]


def apply_amax(lins: dict[str, FP8Linear], amax: dict[str, float], what: str) -> None:
    """Static scales from amax per linear name; linears without an entry keep dynamic scales."""
    extra = sorted(set(amax) - set(lins))
    if extra or not amax:
        raise ValueError(f"calibration does not fit this {what}: {len(extra)} unexpected linears {extra[:5]}"
                         if extra else f"calibration holds no scales for the {what} (pi-policy calibrate writes them)")
    bad = [k for k, v in amax.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"calibration amax must be finite and > 0; bad entries: {bad[:5]}")
    for name, lin in lins.items():
        lin.act_scale = fp8_scale(torch.tensor(amax[name], device=lin.weight.device)) if name in amax else None
