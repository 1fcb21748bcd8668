"""FP8 (e4m3) vision: quantized copies of the SigLIP tower's linears and of the projector into the LLM's width.

As for the prefill, the model is never touched: each SigLIP block is deep-copied with its four linears (qkv, out,
fc1, fc2) replaced by FP8Linear (runtime/prefill/fp8_linear.py), the projector too, and the copies run through the
model's own `PiModel.embed_images(..., blocks=copies, projector=copy)`, so the patch embedding, LayerNorms,
attention and GELU are the shared code. Activations are quantized per row or per tensor (dynamic) or by static
scales from `pi-policy calibrate` (entries `vision.blocks.{i}.{name}` and `vision.projector`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from pi_policy.model.pi0 import PiModel
from pi_policy.progress import progress_bar
from pi_policy.runtime.prefill.calibration import apply_calibration
from pi_policy.runtime.prefill.fp8_linear import (
    DYNAMIC,
    FP8Linear,
    apply_amax,
    fp8_supported,
    get_module,
    observe_amax,
)

QUANTIZED = ("qkv", "out", "fc1", "fc2")  # per SigLIP block
PROJECTOR = "projector"
PREFIX = "vision."


def vision_amax(calibration: dict[str, float]) -> dict[str, float]:
    """The vision tower's entries of a calibration, without their `vision.` prefix."""
    return {k.removeprefix(PREFIX): v for k, v in calibration.items() if k.startswith(PREFIX)}


class FP8Vision:
    """The vision stage with FP8 copies of the SigLIP blocks and the projector; call it like model.embed_images."""

    def __init__(self, model: PiModel, blocks: list[nn.Module], projector: nn.Module, kernel: str):
        self.model, self.blocks, self.projector, self.kernel = model, nn.ModuleList(blocks), projector, kernel

    def __call__(self, images: Tensor) -> Tensor:
        return self.model.embed_images(images, self.blocks, self.projector)

    def linears(self) -> dict[str, FP8Linear]:
        """The FP8 linears by calibration name, without the `vision.` prefix (blocks.{i}.{name}, projector)."""
        out = {f"blocks.{i}.{name}": get_module(blk, name) for i, blk in enumerate(self.blocks) for name in QUANTIZED
               if isinstance(get_module(blk, name), FP8Linear)}
        if isinstance(self.projector, FP8Linear):
            out[PROJECTOR] = self.projector
        return out

    def summary(self) -> str:
        lins = self.linears()
        total = len(self.blocks) * len(QUANTIZED) + 1
        static = sum(lin.act_scale is not None for lin in lins.values())
        dynamic = {lin.dynamic for lin in lins.values() if lin.act_scale is None}
        return (f"vision: {len(lins)}/{total} linears in FP8 ({len(self.blocks)} SigLIP blocks and the projector), "
                f"{static}/{len(lins)} with static activation scales (others dynamic"
                f"{' per ' + '/'.join(sorted(dynamic)) if dynamic else ''}), kernel {self.kernel}")

    def calibrate(self, samples: Iterable[Tensor], progress: bool = False) -> dict[str, float]:
        """Static activation scales from the running max |x| each FP8 linear sees on sample images
        ((B, cameras, 3, H, W) in [-1, 1]); returns the amax per calibration name (with the `vision.` prefix)."""
        amax = observe_amax(self.linears(), self, samples, progress, desc="fp8 vision calibration")
        self.set_amax(amax)
        return {PREFIX + k: v for k, v in amax.items()}

    def set_amax(self, amax: dict[str, float]) -> None:
        """amax per linear, named as linears() names them (no `vision.` prefix)."""
        apply_amax(self.linears(), amax, "vision tower")


def build_fp8_vision(model: PiModel, calibration=None, *, per_channel: bool = False, fast_accum: bool = True,
                     kernel: str | None = None, fuse_quant: bool = True, dynamic: str = "tensor",
                     keep_bf16: Sequence[str] = (), progress: bool = False) -> tuple[FP8Vision, str]:
    """FP8 copies of the vision tower's linears; returns (the stage's callable, a note: empty unless simulated).

    calibration: None (dynamic scales), a calibration JSON path or a dict of amax by calibration name (its
    `vision.*` entries are used), or an iterable of sample images to calibrate on.
    keep_bf16: linears left in bf16 (qkv, out, fc1, fc2 in every block, and/or projector).
    The other options are build_fp8_prefill's.
    """
    unknown = set(keep_bf16) - {*QUANTIZED, PROJECTOR}
    if unknown:
        raise ValueError(f"unknown vision linear(s) {sorted(unknown)} to keep in bf16; choose from "
                         f"{(*QUANTIZED, PROJECTOR)}")
    if dynamic not in DYNAMIC:
        raise ValueError(f"unknown dynamic activation scaling {dynamic!r}; choose one of {DYNAMIC}")
    device = next(model.parameters()).device
    note = ""
    if kernel is None:
        kernel = "scaled_mm" if fp8_supported(device) else "simulated"
        if kernel == "simulated":
            where = "CPU" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} (no FP8 tensor cores)"
            note = f"{where}: FP8 vision simulated by quantize-dequantize (same numerics, not faster)"
    elif kernel == "scaled_mm" and not fp8_supported(device):
        raise RuntimeError(f"kernel 'scaled_mm' needs a CUDA GPU with compute capability >= 8.9; model is on {device}")

    def fp8(lin: nn.Linear) -> FP8Linear:
        return FP8Linear(lin, per_channel=per_channel, kernel=kernel, fast_accum=fast_accum, fuse_quant=fuse_quant,
                         dynamic=dynamic)

    blocks = []
    with torch.no_grad():
        for blk in progress_bar(model.vision.blocks, enabled=progress, desc="fp8 vision quantize", leave=False):
            originals = {name: get_module(blk, name) for name in QUANTIZED}
            q = copy.deepcopy(blk, {id(lin): nn.Identity() for lin in originals.values()})
            for name, lin in originals.items():
                setattr(q, name, lin if name in keep_bf16 else fp8(lin))
            blocks.append(q.eval())
        projector = model.projector if PROJECTOR in keep_bf16 else fp8(model.projector)
    vision = FP8Vision(model, blocks, projector, kernel)
    if calibration is not None:
        apply_calibration(vision, calibration, vision_amax, progress)
    return vision, "; ".join(n for n in (note, vision.summary()) if n) if note else ""
