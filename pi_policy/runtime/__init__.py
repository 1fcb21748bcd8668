"""The staged runtime: the runner spec, static buffers, CUDA graphs, per-stage timing, and the implementations of
the stages (prefill backends in `prefill/`, the fused denoise expert in `expert/`, the rules that choose among
them in `choice`).

Torch loads on first use of the runner or the factory, so that `spec`, `choice`, `options` and `stats` import on
any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pi_policy.runtime.factory import build_model, build_runner
    from pi_policy.runtime.runner import PolicyRunner

__all__ = ["PolicyRunner", "build_model", "build_runner"]


def __getattr__(name: str):
    if name in ("build_model", "build_runner"):
        from pi_policy.runtime import factory

        return getattr(factory, name)
    if name == "PolicyRunner":
        from pi_policy.runtime.runner import PolicyRunner

        return PolicyRunner
    raise AttributeError(f"module 'pi_policy.runtime' has no attribute {name!r}")
