"""Plain-PyTorch pi0 / pi0.5: configs, SigLIP, Gemma, the staged model, checkpoints, tokenizer, preprocessing.

The configs import without torch (parameter checks and the runner spec read the presets); the model loads torch
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import PRESETS, GemmaConfig, PiConfig, SiglipConfig, get_config

if TYPE_CHECKING:
    from .pi0 import KVCache, PiModel, cast_for_inference, init_random

__all__ = ["PRESETS", "GemmaConfig", "KVCache", "PiConfig", "PiModel", "SiglipConfig", "cast_for_inference",
           "get_config", "init_random"]
_TORCH = ("KVCache", "PiModel", "cast_for_inference", "init_random")


def __getattr__(name: str):
    if name in _TORCH:
        from . import pi0

        return getattr(pi0, name)
    raise AttributeError(f"module 'pi_policy.model' has no attribute {name!r}")
