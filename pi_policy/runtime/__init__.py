"""The staged runtime: static buffers, CUDA graphs, per-stage timing, prefill backends."""

from .factory import build_model, build_runner
from .runner import DEFAULT_CAMERAS, PolicyRunner

__all__ = ["DEFAULT_CAMERAS", "PolicyRunner", "build_model", "build_runner"]
