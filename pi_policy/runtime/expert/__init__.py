"""Denoise backends: the PyTorch expert (the reference) or the fused Triton expert, with a visible fallback.

The PyTorch expert is the model's own denoise loop (float32 on a CPU, compiled on CUDA); `triton` runs the fused
kernels with bf16 weights, `fp8w` with float8_e4m3fn expert weights (per-output-channel scales, bf16
activations). The fused expert needs a CUDA GPU, or Triton's interpreter (TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import os

from pi_policy.runtime.choice import TORCH, Implementation


def make_denoise(impl: str, model) -> Implementation:
    """The denoise implementation `impl` (torch, triton, fp8w); the PyTorch loop, with the reason, when a fused one
    cannot run here (the note says why)."""
    if impl == TORCH:
        return Implementation(None)
    device = next(model.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return _fallback(impl, f"needs a CUDA GPU (here {device.type})")
    if impl == "fp8w" and device.type == "cuda":
        from pi_policy.runtime.prefill.fp8 import fp8_supported

        if not fp8_supported(device):
            return _fallback(impl, "FP8 needs compute capability 8.9 or newer")
    try:
        from pi_policy.runtime.expert.fused import FusedExpert

        expert = FusedExpert(model, "fp8" if impl == "fp8w" else "bf16")
    except Exception as e:  # noqa: BLE001 - no Triton on this platform, say: serve on the PyTorch path
        return _fallback(impl, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    return Implementation(expert.denoise, impl)


def _fallback(impl: str, why: str) -> Implementation:
    return Implementation(None, TORCH, why)
