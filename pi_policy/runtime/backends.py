"""Prefill backends: which implementation runs the prefill stage, and the visible fallback when one can't run."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..model.pi0 import PiModel

log = logging.getLogger(__name__)

BACKENDS = ("bf16", "eager", "fp8", "tensorrt")


@dataclass
class PrefillChoice:
    fn: object | None  # None: the model's own prefill
    name: str
    note: str = ""  # why a fallback happened, shown to the user


def make_prefill(backend: str, model: PiModel, engine_path: str | None = None,
                 checkpoint: str | None = None, calibration=None, fp8_options: dict | None = None
                 ) -> PrefillChoice:
    if backend in ("bf16", "eager"):
        return PrefillChoice(None, "bf16")
    if backend == "fp8":
        from .fp8 import build_fp8_prefill

        return build_fp8_prefill(model, calibration=calibration, **(fp8_options or {}))
    if backend == "tensorrt":
        from .tensorrt_backend import load_tensorrt_prefill

        return load_tensorrt_prefill(model, engine_path, checkpoint)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
