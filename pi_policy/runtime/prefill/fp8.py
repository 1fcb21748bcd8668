"""FP8 (e4m3) prefill: quantized copies of the LLM's linears; torch._scaled_mm on sm_89+, simulated elsewhere.

The BF16 model is never touched: each Gemma block is deep-copied with its four linears (wqkv, wo,
mlp.gate_up, mlp.down) replaced by FP8Linear, and the copies run through the model's own prefill
(`PiModel.prefill(..., layers=copies)`), so norms, RoPE, attention, softmax and residuals are the
shared code in model/layers.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pi_policy.model.gemma import GemmaBlock
from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.choice import Implementation
from pi_policy.runtime.prefill.calibration import load_calibration

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
QUANTIZED = ("wqkv", "wo", "mlp.gate_up", "mlp.down")
KERNELS = ("scaled_mm", "simulated")


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


def dynamic_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor scale from this call's amax, then quantize."""
    scale = fp8_scale(torch.linalg.vector_norm(x, math.inf, dtype=torch.float32))
    return quantize_fp8(x, scale), scale


def fused_dynamic_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """dynamic_quantize compiled: a reduction and one pointwise kernel instead of a dozen small launches."""
    if "d" not in _FUSED:
        _FUSED["d"] = torch.compile(dynamic_quantize, dynamic=False, fullgraph=True)
    return _FUSED["d"](x)


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
    """y = x W^T with W in float8_e4m3fn and x quantized per tensor (static scale if calibrated, else dynamic)."""

    def __init__(self, linear: nn.Linear, *, per_channel: bool = False, kernel: str = "simulated",
                 fast_accum: bool = True, fuse_quant: bool = True):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown FP8 kernel {kernel!r}; choose one of {KERNELS}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, ws = quantize_weight(linear.weight, per_channel)
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", ws)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("act_scale", None)  # set by calibration; None -> dynamic per-call scale
        self.register_buffer("observed_amax", None)  # running max of |x| while calibrating
        self.per_channel, self.kernel, self.fast_accum = per_channel, kernel, fast_accum
        self.fuse_quant = fuse_quant  # scaled_mm path only; compiled on first call
        self.observing = False
        self.exporting = False

    def extra_repr(self) -> str:
        scales = "static" if self.act_scale is not None else "dynamic"
        return (f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, "
                f"weights={'per-channel' if self.per_channel else 'per-tensor'}, activations={scales}")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.observing:
            amax = x2.detach().abs().amax().float()
            self.observed_amax = amax if self.observed_amax is None else torch.maximum(self.observed_amax, amax)
        sa = self.act_scale
        if self.kernel == "scaled_mm" and not self.exporting:
            y = self._scaled_mm(x2, sa)
        elif sa is None and self.exporting:
            raise ValueError("ONNX export needs a static activation scale for every FP8 linear the prefill runs "
                             "(TensorRT's Q/DQ scales are constants): calibrate first (pi-policy calibrate)")
        else:
            if sa is None:
                sa = fp8_scale(torch.linalg.vector_norm(x2, math.inf, dtype=torch.float32))
            dt = x.dtype
            scale = sa.to(dt) if self.exporting else sa  # ONNX opset 19 wants x and its scale in one dtype
            ws = self.weight_scale
            if self.exporting:
                ws = ws.to(dt).flatten() if self.per_channel else ws.to(dt)
            y = QDQ.apply(x2, scale) @ DequantWeight.apply(self.weight, ws, dt).t()
            if self.bias is not None:
                y = y + self.bias.to(dt)
        return y.reshape(*lead, self.out_features)

    def _scaled_mm(self, x2: Tensor, sa: Tensor | None) -> Tensor:
        if sa is None:
            xq, sa = (fused_dynamic_quantize if self.fuse_quant else dynamic_quantize)(x2)
        else:
            xq = (fused_quantize if self.fuse_quant else quantize_fp8)(x2, sa)
        sb = self.weight_scale
        if self.per_channel:  # row-wise scaling: scale_a (M, 1), scale_b (1, N)
            sa, sb = sa.reshape(1, 1).expand(x2.shape[0], 1).contiguous(), sb.reshape(1, -1)
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        # b must be column-major: the transpose of a row-major (out, in) weight is exactly that.
        return torch._scaled_mm(xq, self.weight.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=x2.dtype,
                                use_fast_accum=self.fast_accum)


def shape_key(m: int, k: int, n: int) -> str:
    return f"{m}x{k}x{n}"


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, module)


def quantize_block(block: GemmaBlock, *, per_channel: bool, kernel: str, fast_accum: bool,
                   keep_bf16: Sequence[str] = (), fuse_quant: bool = True) -> GemmaBlock:
    """A copy of `block` with FP8 linears. Names in keep_bf16 share the original nn.Linear (read only)."""
    originals = {name: get_module(block, name) for name in QUANTIZED}
    # Map the big linears to placeholders so deepcopy does not duplicate weights we replace anyway.
    memo = {id(lin): nn.Identity() for lin in originals.values()}
    q = copy.deepcopy(block, memo)
    for name, lin in originals.items():
        fp8 = name not in keep_bf16
        set_module(q, name, FP8Linear(lin, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum,
                                      fuse_quant=fuse_quant) if fp8 else lin)
    return q.eval()


class FP8Prefill:
    """The prefill with FP8 copies of the LLM blocks; call it like PrefillFn: fn(prefix_embs, prefix_pad, kv)."""

    def __init__(self, model: PiModel, layers: list[GemmaBlock], kernel: str):
        self.model, self.layers, self.kernel = model, nn.ModuleList(layers), kernel
        self.compiled: nn.ModuleList | None = None  # torch.compile'd wrappers of self.layers, if asked for

    def __call__(self, prefix_embs: Tensor, prefix_pad: Tensor, kv: tuple[Tensor, Tensor]):
        return self.model.prefill(prefix_embs, prefix_pad, kv, layers=self.compiled or self.layers)

    def linears(self) -> dict[str, FP8Linear]:
        return {f"layers.{i}.{name}": get_module(blk, name) for i, blk in enumerate(self.layers)
                for name in QUANTIZED if isinstance(get_module(blk, name), FP8Linear)}

    def running_linears(self) -> dict[str, FP8Linear]:
        """The FP8 linears the prefill runs. PiModel.prefill computes only K/V in the last layer, so that layer's
        wo, mlp.gate_up and mlp.down are quantized but never run (and calibration never sees them)."""
        last = f"layers.{len(self.layers) - 1}."
        return {n: lin for n, lin in self.linears().items() if not n.startswith(last) or n == last + "wqkv"}

    def summary(self) -> str:
        n_fp8, total = len(self.linears()), len(self.layers) * len(QUANTIZED)
        running = self.running_linears()
        fp8_layers = sum(all(isinstance(get_module(b, n), FP8Linear) for n in QUANTIZED) for b in self.layers)
        static = sum(lin.act_scale is not None for lin in running.values())
        return (f"{len(running)} FP8 linears run in the prefill ({n_fp8}/{total} quantized; the last layer computes "
                f"only K/V), {static}/{len(running)} with static activation scales (others dynamic), "
                f"{fp8_layers}/{len(self.layers)} layers fully FP8, kernel {self.kernel}")

    @torch.no_grad()
    def calibrate(self, samples: Iterable[tuple[Tensor, Tensor]], progress: bool = False) -> dict[str, float]:
        """Static activation scales from the running max |x| each FP8 linear sees on the samples."""
        lins = self.linears()
        saved = {name: lin.act_scale for name, lin in lins.items()}
        for lin in lins.values():
            lin.act_scale, lin.observed_amax, lin.observing = None, None, True
        try:
            n = 0
            for embs, pad in tqdm(list(samples), desc="fp8 calibration", disable=not progress, leave=False):
                self.model.prefill(embs, pad, None, layers=self.layers)
                n += 1
            if n == 0:
                raise ValueError("FP8 calibration needs at least one (prefix_embs, prefix_pad) sample")
            # A linear the prefill never runs (the last layer's attention output and MLP) observes nothing.
            amax = {name: float(lin.observed_amax) for name, lin in lins.items() if lin.observed_amax is not None}
        except BaseException:
            for name, lin in lins.items():
                lin.act_scale = saved[name]
            raise
        finally:
            for lin in lins.values():
                lin.observing, lin.observed_amax = False, None
        self.set_amax(amax)
        return amax

    def set_amax(self, amax: dict[str, float]) -> None:
        lins = self.linears()
        extra = sorted(set(amax) - set(lins))
        if extra or not amax:
            raise ValueError(f"calibration does not fit this model: {len(extra)} unexpected linears {extra[:5]}"
                             if extra else "calibration holds no scales")
        bad = [k for k, v in amax.items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"calibration amax must be finite and > 0; bad entries: {bad[:5]}")
        for name, lin in lins.items():  # linears without an entry keep dynamic scales
            lin.act_scale = fp8_scale(torch.tensor(amax[name], device=lin.weight.device)) if name in amax else None


def build_fp8_prefill(model: PiModel, calibration=None, *, decisions: dict[str, bool] | None = None,
                      per_channel: bool = False, fast_accum: bool = True, kernel: str | None = None,
                      fuse_quant: bool = True, compile_blocks: bool | None = None, progress: bool = False,
                      keep_bf16: tuple[str, ...] = ()) -> Implementation:
    """An FP8 prefill over quantized copies of the LLM blocks (the model itself is only read).

    calibration: None (dynamic per-call activation scales), a path to a calibration JSON, a dict of
    amax per linear, or an iterable of (prefix_embs, prefix_pad) samples to calibrate on.
    decisions: shape key "MxKxN" -> use FP8 (from probe_fp8_shapes); shapes it marks False stay bf16.
    keep_bf16: linear names (wqkv, wo, mlp.gate_up, mlp.down) that stay bf16 in every block.
    kernel: "scaled_mm" or "simulated"; default: scaled_mm where the GPU supports it.
    fuse_quant: activation quantization as one torch.compile'd kernel (scaled_mm path).
    compile_blocks: torch.compile each FP8 block (fuses the shared norms, RoPE and GeGLU around the GEMMs);
    default: on with the scaled_mm kernel (the first calls compile; the runner's warm-up makes them).
    """
    unknown = set(keep_bf16) - set(QUANTIZED)
    if unknown:
        raise ValueError(f"unknown linear(s) {sorted(unknown)} to keep in bf16; choose from {QUANTIZED}")
    device = next(model.parameters()).device
    notes = []
    if kernel is None:
        kernel = "scaled_mm" if fp8_supported(device) else "simulated"
        if kernel == "simulated":
            where = "CPU" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} (no FP8 tensor cores)"
            notes.append(f"{where}: FP8 simulated by quantize-dequantize (same numerics, not faster)")
    elif kernel == "scaled_mm" and not fp8_supported(device):
        raise RuntimeError(f"kernel 'scaled_mm' needs a CUDA GPU with compute capability >= 8.9; model is on {device}")
    m = model.cfg.prefix_len
    layers = []
    with torch.no_grad():
        for blk in tqdm(model.llm.layers, desc="fp8 quantize", disable=not progress, leave=False):
            keep = [name for name in QUANTIZED if name in keep_bf16 or decisions is not None and not decisions.get(
                shape_key(m, get_module(blk, name).in_features, get_module(blk, name).out_features), True)]
            layers.append(quantize_block(blk, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum,
                                         keep_bf16=keep, fuse_quant=fuse_quant))
    prefill = FP8Prefill(model, layers, kernel)
    if compile_blocks is None:
        compile_blocks = kernel == "scaled_mm"
    if compile_blocks:
        prefill.compiled = nn.ModuleList(torch.compile(blk, dynamic=False) for blk in layers)
    if calibration is not None:
        if isinstance(calibration, (str, Path)):
            prefill.set_amax(load_calibration(calibration))
        elif isinstance(calibration, dict):
            prefill.set_amax({str(k): float(v) for k, v in calibration.items()})
        else:
            prefill.calibrate(calibration, progress=progress)
    return Implementation(prefill, "fp8", "; ".join(notes + [prefill.summary()]) if notes else "")
