"""Vision backends: the SigLIP tower as the model runs it, or with FP8 copies of its linears (fp8)."""

from __future__ import annotations

from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.choice import TORCH, Implementation
from pi_policy.runtime.spec import FP8Options

__all__ = ["make_vision"]


def make_vision(impl: str, model: PiModel, fp8: FP8Options | None = None, calibration=None) -> Implementation:
    """impl: torch or fp8 (pi_policy.runtime.choice). calibration: FP8 static scales (a JSON path or a dict of amax:
    its `vision.*` entries); default the spec's calibration file, else dynamic scales."""
    if impl == TORCH:
        return Implementation(None)
    if impl == "fp8":
        from pi_policy.runtime.vision.fp8 import build_fp8_vision

        fp8 = fp8 or FP8Options()
        if not isinstance(calibration, (str, dict)):  # sample prefixes calibrate the prefill only
            calibration = fp8.calibration
        fn, note = build_fp8_vision(model, calibration, **fp8.vision_kwargs())
        return Implementation(fn, "fp8", note)
    raise ValueError(f"unknown vision implementation {impl!r}")
