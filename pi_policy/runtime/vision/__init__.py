"""Vision backends: the SigLIP tower as the model runs it (bf16), or with FP8 copies of its linears (fp8)."""

from __future__ import annotations

from dataclasses import dataclass

from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.options import VISION_BACKENDS

# build_fp8_prefill's options that apply to the vision tower's FP8 linears too
SHARED_FP8_OPTIONS = ("per_channel", "fast_accum", "kernel", "fuse_quant", "dynamic")


@dataclass
class VisionChoice:
    fn: object | None  # None: the model's own embed_images
    name: str
    note: str = ""  # what the user should know about how it runs


def make_vision(backend: str, model: PiModel, calibration=None, fp8_options: dict | None = None) -> VisionChoice:
    """The vision stage's implementation. fp8_options: build_fp8_prefill's options; those in SHARED_FP8_OPTIONS
    apply here. calibration: a calibration file or amax dict (its `vision.*` entries)."""
    if backend == "bf16":
        return VisionChoice(None, "bf16")
    if backend == "fp8":
        from pi_policy.runtime.vision.fp8 import build_fp8_vision

        options = {k: v for k, v in (fp8_options or {}).items() if k in SHARED_FP8_OPTIONS}
        fn, note = build_fp8_vision(model, calibration, **options)
        return VisionChoice(fn, "fp8", note)
    raise ValueError(f"unknown vision backend {backend!r}; choose one of {', '.join(VISION_BACKENDS)}")
