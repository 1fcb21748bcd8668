"""Prefill backends: the choice of implementation for the prefill stage, and the visible fallback when one can't run.

bf16 is the model's own prefill; fp8 (PyTorch FP8 GEMMs over quantized copies of the LLM blocks) and tensorrt
(an engine built from the FP8 ONNX export) live in their own modules and are imported only when chosen.
"""

from __future__ import annotations

import logging

from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.options import PREFILL_BACKENDS
from pi_policy.runtime.prefill.choice import PrefillChoice

log = logging.getLogger(__name__)

__all__ = ["PrefillChoice", "make_prefill"]


def make_prefill(backend: str, model: PiModel, engine_path: str | None = None,
                 checkpoint: str | None = None, calibration=None, fp8_options: dict | None = None
                 ) -> PrefillChoice:
    if backend == "bf16":
        return PrefillChoice(None, "bf16")
    if backend == "fp8":
        from pi_policy.runtime.prefill.fp8 import build_fp8_prefill

        return build_fp8_prefill(model, calibration=calibration, **(fp8_options or {}))
    if backend == "tensorrt":
        from pi_policy.runtime.prefill.tensorrt import load_tensorrt_prefill

        return load_tensorrt_prefill(model, engine_path, checkpoint)
    raise ValueError(f"unknown prefill backend {backend!r}; choose one of {', '.join(PREFILL_BACKENDS)}")
