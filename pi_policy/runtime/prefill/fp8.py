"""FP8 (e4m3) prefill: quantized copies of the LLM's linears; torch._scaled_mm on sm_89+, simulated elsewhere.

The BF16 model is never touched: each Gemma block is deep-copied with its four linears (wqkv, wo,
mlp.gate_up, mlp.down) replaced by FP8Linear, and the copies run through the model's own prefill
(`PiModel.prefill(..., layers=copies)`), so norms, RoPE, attention, softmax and residuals are the
shared code in model/layers.py. Where the Triton kernels run (a CUDA GPU), the norms and the GeGLU that feed
an FP8 linear also quantize their output themselves (fp8_fused.py) instead of leaving it to a separate pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from pi_policy.model.gemma import GemmaBlock
from pi_policy.model.pi0 import PiModel
from pi_policy.progress import progress_bar
from pi_policy.runtime.choice import Implementation
from pi_policy.runtime.prefill.calibration import apply_calibration
from pi_policy.runtime.prefill.fp8_fused import FUSED_PRODUCERS, fuse_block, unavailable
from pi_policy.runtime.prefill.fp8_linear import (
    DYNAMIC,
    FP8Linear,
    apply_amax,
    fp8_supported,
    get_module,
    observe_amax,
    set_module,
)

QUANTIZED = ("wqkv", "wo", "mlp.gate_up", "mlp.down")


def shape_key(m: int, k: int, n: int) -> str:
    return f"{m}x{k}x{n}"


def quantize_block(block: GemmaBlock, *, per_channel: bool, kernel: str, fast_accum: bool,
                   keep_bf16: Sequence[str] = (), fuse_quant: bool = True, dynamic: str = "tensor",
                   fused: bool = False) -> GemmaBlock:
    """A copy of `block` with FP8 linears. Names in keep_bf16 share the original nn.Linear (read only).
    fused: the norms and the GeGLU that feed an FP8 linear quantize their own output (Triton, fp8_fused.py)."""
    originals = {name: get_module(block, name) for name in QUANTIZED}
    # Map the big linears to placeholders so deepcopy does not duplicate weights we replace anyway.
    memo = {id(lin): nn.Identity() for lin in originals.values()}
    q = copy.deepcopy(block, memo)
    for name, lin in originals.items():
        fp8 = name not in keep_bf16
        set_module(q, name, FP8Linear(lin, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum,
                                      fuse_quant=fuse_quant, dynamic=dynamic) if fp8 else lin)
    if fused:
        fuse_block(q)
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

    def fused_producers(self) -> int:
        """How many of the norms and GeGLUs the prefill runs quantize their own output for the FP8 linear they feed
        (the last layer runs only its attention norm)."""
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
                      keep_bf16: tuple[str, ...] = (), dynamic: str = "tensor",
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
    fp8_fused.py); default: off (an option until a GPU measures it). Where the kernels cannot run, a separate pass
    does it and the note says why.
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
    if fuse_producers is None:  # an option until a GPU measures it (docs/fp8.md)
        fuse_producers = False
    if fuse_producers:
        why = unavailable(device)
        if why:
            notes.append(f"fused FP8 activation quantization unavailable ({why}); a separate pass quantizes")
            fuse_producers = False
    m = model.cfg.prefix_len
    layers = []
    with torch.no_grad():
        for blk in progress_bar(model.llm.layers, enabled=progress, desc="fp8 quantize", leave=False):
            keep = [name for name in QUANTIZED if name in keep_bf16 or decisions is not None and not decisions.get(
                shape_key(m, get_module(blk, name).in_features, get_module(blk, name).out_features), True)]
            layers.append(quantize_block(blk, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum,
                                         keep_bf16=keep, fuse_quant=fuse_quant, dynamic=dynamic,
                                         fused=fuse_producers))
    prefill = FP8Prefill(model, layers, kernel)
    if compile_blocks is None:
        compile_blocks = kernel == "scaled_mm"
    if compile_blocks:
        prefill.compiled = nn.ModuleList(torch.compile(blk, dynamic=False) for blk in layers)
    if calibration is not None:
        apply_calibration(prefill, calibration, prefill_amax, progress)
    return Implementation(prefill, "fp8", "; ".join(notes + [prefill.summary()]) if notes else "")
