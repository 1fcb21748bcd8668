"""Denoise backends: the PyTorch expert (the reference) or the fused Triton expert, with a visible fallback.

The PyTorch expert is the model's own denoise loop (float32 on a CPU, compiled on CUDA); `triton` runs the fused
kernels with bf16 weights, `fp8w` with float8_e4m3fn expert weights (per-output-channel scales, bf16
activations); `persistent` and `persistent-fp8w` run the same expert as one persistent kernel per denoise
(persistent.py). The fused expert needs a CUDA GPU, or Triton's interpreter (TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import os

from pi_policy.runtime.choice import TORCH, Implementation

# implementation -> (expert, weights)
FUSED = {"triton": ("fused", "bf16"), "fp8w": ("fused", "fp8"), "persistent": ("persistent", "bf16"),
         "persistent-fp8w": ("persistent", "fp8")}


def make_denoise(impl: str, model, keep_bf16: tuple[str, ...] = ()) -> Implementation:
    """The denoise implementation `impl` (torch, or one of FUSED; with FP8 weights, the cells named in `keep_bf16`
    stay bf16); the PyTorch loop, with the reason, when a fused one cannot run here (the note says why)."""
    if impl == TORCH:
        return Implementation(None)
    expert, weights = FUSED[impl]
    device = next(model.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return _fallback(impl, f"needs a CUDA GPU (here {device.type})")
    if weights == "fp8" and device.type == "cuda":
        from pi_policy.runtime.prefill.fp8_linear import fp8_supported

        if not fp8_supported(device):
            return _fallback(impl, "FP8 needs compute capability 8.9 or newer")
    try:
        if expert == "persistent":
            from pi_policy.runtime.expert.persistent import PersistentExpert

            fn = PersistentExpert(model, weights, keep_bf16).denoise
        else:
            from pi_policy.runtime.expert.fused import FusedExpert

            fn = FusedExpert(model, weights, keep_bf16).denoise
    except Exception as e:  # noqa: BLE001 - no Triton on this platform, say: serve on the PyTorch path
        return _fallback(impl, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    return Implementation(fn, impl)


def _fallback(impl: str, why: str) -> Implementation:
    return Implementation(None, TORCH, why)
