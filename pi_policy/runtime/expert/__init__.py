"""Denoise backends: the PyTorch expert (the reference) or the fused Triton expert, with a visible fallback.

`bf16` is the model's own denoise loop (float32 on a CPU, compiled on CUDA); `triton` runs the fused kernels
with bf16 weights, `fp8` with float8_e4m3fn expert weights (per-output-channel scales, bf16 activations).
The fused expert needs a CUDA GPU, or Triton's interpreter (TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from pi_policy.runtime.options import DENOISE_BACKENDS

log = logging.getLogger(__name__)

DENOISE = tuple(n for n in DENOISE_BACKENDS if n != "auto")  # what make_denoise builds (auto is resolved)
NAMES = {"triton": "triton", "fp8": "fp8w"}  # the denoise stage's backend name (fp8w: FP8 weights only)


@dataclass
class DenoiseChoice:
    fn: Callable | None  # (cache, prefix_pad, state, noise) -> actions; None: the model's own denoise
    name: str
    note: str = ""  # why a fallback happened, shown to the user


def make_denoise(name: str, model) -> DenoiseChoice:
    """The denoise implementation for `name`; the PyTorch path, with a note, when the fused one cannot run."""
    if name not in DENOISE:
        raise ValueError(f"unknown denoise backend {name!r}; choose one of {DENOISE}")
    if name == "bf16":
        return DenoiseChoice(None, "bf16")
    device = next(model.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return _fallback(name, f"needs a CUDA GPU (here {device.type})")
    if name == "fp8" and device.type == "cuda":
        from pi_policy.runtime.prefill.fp8 import fp8_supported

        if not fp8_supported(device):
            return _fallback(name, "FP8 needs compute capability 8.9 or newer")
    try:
        from pi_policy.runtime.expert.fused import FusedExpert

        expert = FusedExpert(model, "fp8" if name == "fp8" else "bf16")
    except Exception as e:  # noqa: BLE001 - no Triton on this platform, say: serve on the PyTorch path
        return _fallback(name, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    return DenoiseChoice(expert.denoise, NAMES[name])


def _fallback(name: str, why: str) -> DenoiseChoice:
    note = f"denoise {name} unavailable ({why}); the PyTorch denoise runs"
    log.warning(note)
    return DenoiseChoice(None, "bf16", note)
