"""Prefill backends: the implementation of the prefill stage, and the visible fallback when one can't run.

The PyTorch prefill is the model's own; fp8 (PyTorch FP8 GEMMs over quantized copies of the LLM blocks) and
tensorrt (an engine built from the FP8 ONNX export) live in their own modules and are imported only when chosen.
"""

from __future__ import annotations

from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.choice import TORCH, Implementation
from pi_policy.runtime.spec import FP8Options

__all__ = ["make_prefill"]


def make_prefill(impl: str, model: PiModel, engine_path: str | None = None, checkpoint: str | None = None,
                 fp8: FP8Options | None = None, calibration=None) -> Implementation:
    """impl: torch, fp8 or tensorrt (pi_policy.runtime.choice). calibration: FP8 static scales (a JSON path, a
    dict of amax, or sample prefixes); default the spec's calibration file, else dynamic scales."""
    if impl == TORCH:
        return Implementation(None)
    if impl == "fp8":
        from pi_policy.runtime.prefill.fp8 import build_fp8_prefill

        fp8 = fp8 or FP8Options()
        return build_fp8_prefill(model, calibration=calibration if calibration is not None else fp8.calibration,
                                 **fp8.kwargs())
    if impl == "tensorrt":
        from pi_policy.runtime.prefill.tensorrt import load_tensorrt_prefill

        return load_tensorrt_prefill(model, engine_path, checkpoint)
    raise ValueError(f"unknown prefill implementation {impl!r}")
