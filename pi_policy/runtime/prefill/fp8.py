"""FP8 (e4m3) prefill: quantized copies of the LLM's linears; torch._scaled_mm on sm_89+, simulated elsewhere.

The BF16 model is never touched: each Gemma block is deep-copied with its four linears (wqkv, wo,
mlp.gate_up, mlp.down) replaced by FP8Linear, and the copies run through the model's own prefill
(`PiModel.prefill(..., layers=copies)`), so norms, RoPE, attention, softmax and residuals are the
shared code in model/layers.py. Where the Triton kernels run (a CUDA GPU), the norms and the GeGLU that feed
an FP8 linear also quantize their output themselves (fp8_fused.py) instead of leaving it to a separate pass.

FP8Linear, its scales and the calibration helpers here are shared with the FP8 vision tower (runtime/vision).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

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
                 fast_accum: bool = True, fuse_quant: bool = True, dynamic: str = "row"):
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
                   keep_bf16: Sequence[str] = (), fuse_quant: bool = True, dynamic: str = "row",
                   fuse_producers: bool = False) -> GemmaBlock:
    """A copy of `block` with FP8 linears. Names in keep_bf16 share the original nn.Linear (read only).
    fuse_producers: the norms and the GeGLU that feed an FP8 linear quantize their own output (Triton)."""
    originals = {name: get_module(block, name) for name in QUANTIZED}
    # Map the big linears to placeholders so deepcopy does not duplicate weights we replace anyway.
    memo = {id(lin): nn.Identity() for lin in originals.values()}
    q = copy.deepcopy(block, memo)
    for name, lin in originals.items():
        fp8 = name not in keep_bf16
        set_module(q, name, FP8Linear(lin, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum,
                                      fuse_quant=fuse_quant, dynamic=dynamic) if fp8 else lin)
    if fuse_producers:
        from pi_policy.runtime.prefill.fp8_fused import fuse_producers as fuse

        fuse(q)
    return q.eval()


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

    def fused_producers(self) -> int:
        """How many of the norms and GeGLUs the prefill runs quantize their own output for the FP8 linear they feed
        (the last layer runs only its attention norm)."""
        from pi_policy.runtime.prefill.fp8_fused import FUSED_PRODUCERS

        last = len(self.layers) - 1
        return sum(isinstance(m, FUSED_PRODUCERS) for i, blk in enumerate(self.layers)
                   for m in ((blk.attn_norm,) if i == last else (blk.attn_norm, blk.mlp_norm, blk.mlp)))

    def summary(self) -> str:
        n_fp8, total = len(self.linears()), len(self.layers) * len(QUANTIZED)
        running = self.running_linears()
        fp8_layers = sum(all(isinstance(get_module(b, n), FP8Linear) for n in QUANTIZED) for b in self.layers)
        static = sum(lin.act_scale is not None for lin in running.values())
        dynamic = {lin.dynamic for lin in running.values() if lin.act_scale is None}
        fused = self.fused_producers()
        return (f"{len(running)} FP8 linears run in the prefill ({n_fp8}/{total} quantized; the last layer computes "
                f"only K/V), {static}/{len(running)} with static activation scales (others dynamic"
                f"{' per ' + '/'.join(sorted(dynamic)) if dynamic else ''}), "
                f"{fp8_layers}/{len(self.layers)} layers fully FP8, kernel {self.kernel}"
                + (f", {fused} norms and GeGLUs quantize their own output" if fused else ""))

    def calibrate(self, samples: Iterable[tuple[Tensor, Tensor]], progress: bool = False) -> dict[str, float]:
        """Static activation scales from the running max |x| each FP8 linear sees on the samples."""
        lins = self.linears()
        # A linear the prefill never runs (the last layer's attention output and MLP) observes nothing.
        amax = observe_amax(lins, lambda s: self.model.prefill(s[0], s[1], None, layers=self.layers), samples,
                            progress)
        self.set_amax(amax)
        return amax

    def set_amax(self, amax: dict[str, float]) -> None:
        apply_amax(self.linears(), amax, "prefill")


def prefill_amax(calibration: dict[str, float]) -> dict[str, float]:
    """The prefill's entries of a calibration (`layers.*`; the vision tower's are `vision.*`)."""
    return {k: v for k, v in calibration.items() if not k.startswith("vision.")}


def build_fp8_prefill(model: PiModel, calibration=None, *, decisions: dict[str, bool] | None = None,
                      per_channel: bool = False, fast_accum: bool = True, kernel: str | None = None,
                      fuse_quant: bool = True, compile_blocks: bool | None = None, progress: bool = False,
                      keep_bf16: tuple[str, ...] = (), dynamic: str = "row",
                      fuse_producers: bool | None = None) -> Implementation:
    """An FP8 prefill over quantized copies of the LLM blocks (the model itself is only read).

    calibration: None (dynamic per-call activation scales), a path to a calibration JSON (`pi-policy
    calibrate`), a dict of amax per linear, or an iterable of (prefix_embs, prefix_pad) samples to calibrate on.
    decisions: shape key "MxKxN" -> use FP8 (from probe_fp8_shapes); shapes it marks False stay bf16.
    keep_bf16: linear names (wqkv, wo, mlp.gate_up, mlp.down) that stay bf16 in every block.
    kernel: "scaled_mm" or "simulated"; default: scaled_mm where the GPU supports it.
    dynamic: without a static scale, activations are scaled per row (token) or per tensor.
    fuse_quant: activation quantization as one torch.compile'd kernel (scaled_mm path).
    fuse_producers: the RMSNorms and GeGLUs feeding FP8 linears quantize their own output (Triton kernels,
    fp8_fused.py); default: on with the scaled_mm kernel. Where the kernels cannot run, a separate pass does it
    and the note says why.
    compile_blocks: torch.compile each FP8 block (fuses the shared norms, RoPE and GeGLU around the GEMMs);
    default: on with the scaled_mm kernel (the first calls compile; the runner's warm-up makes them).
    """
    unknown = set(keep_bf16) - set(QUANTIZED)
    if unknown:
        raise ValueError(f"unknown linear(s) {sorted(unknown)} to keep in bf16; choose from {QUANTIZED}")
    if dynamic not in DYNAMIC:
        raise ValueError(f"unknown dynamic activation scaling {dynamic!r}; choose one of {DYNAMIC}")
    device = next(model.parameters()).device
    notes = []
    if kernel is None:
        kernel = "scaled_mm" if fp8_supported(device) else "simulated"
        if kernel == "simulated":
            where = "CPU" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} (no FP8 tensor cores)"
            notes.append(f"{where}: FP8 simulated by quantize-dequantize (same numerics, not faster)")
    elif kernel == "scaled_mm" and not fp8_supported(device):
        raise RuntimeError(f"kernel 'scaled_mm' needs a CUDA GPU with compute capability >= 8.9; model is on {device}")
    if fuse_producers is None:
        fuse_producers = kernel == "scaled_mm"
    if fuse_producers:
        from pi_policy.runtime.prefill.fp8_fused import unavailable

        why = unavailable(device)
        if why:
            notes.append(f"fused FP8 activation quantization unavailable ({why}); a separate pass quantizes")
            fuse_producers = False
    m = model.cfg.prefix_len
    layers = []
    with torch.no_grad():
        for blk in tqdm(model.llm.layers, desc="fp8 quantize", disable=not progress, leave=False):
            keep = [name for name in QUANTIZED if name in keep_bf16 or decisions is not None and not decisions.get(
                shape_key(m, get_module(blk, name).in_features, get_module(blk, name).out_features), True)]
            layers.append(quantize_block(blk, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum,
                                         keep_bf16=keep, fuse_quant=fuse_quant, dynamic=dynamic,
                                         fuse_producers=fuse_producers))
    prefill = FP8Prefill(model, layers, kernel)
    if compile_blocks is None:
        compile_blocks = kernel == "scaled_mm"
    if compile_blocks:
        prefill.compiled = nn.ModuleList(torch.compile(blk, dynamic=False) for blk in layers)
    if calibration is not None:
        if isinstance(calibration, (str, Path)):
            prefill.set_amax(prefill_amax(load_calibration(calibration)))
        elif isinstance(calibration, dict):
            prefill.set_amax(prefill_amax({str(k): float(v) for k, v in calibration.items()}))
        else:
            prefill.calibrate(calibration, progress=progress)
    return Implementation(prefill, "fp8", "; ".join(notes + [prefill.summary()]) if notes else "")
