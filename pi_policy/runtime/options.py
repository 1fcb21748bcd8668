"""The runtime's vocabulary: backend names, compile switches and their defaults, torch-free.

Parameter checks, argument parsers and the launch file import this without loading torch. A backend names the
implementation of the prefill; CUDA graphs and torch.compile are separate switches. `eager` is kept as a backend
name for the command line and parameter files: it means bf16 with neither graphs nor compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pi_policy.observation import STAGES

PREFILL_BACKENDS = ("bf16", "fp8", "tensorrt")
BACKEND_CHOICES = (*PREFILL_BACKENDS, "eager")  # what --backend and the `backend` parameter accept
# The denoise loop: bf16 is the PyTorch action expert (torch.compile'd on CUDA); triton and fp8 are the fused Triton
# expert with bf16 or FP8 (e4m3, per-output-channel) weights.
DENOISE_BACKENDS = ("bf16", "triton", "fp8")
DEFAULT_DENOISE = "bf16"  # measured: the fused kernels do not beat the compiled PyTorch expert yet
# Measured on an H100 (docs/performance.md): compiling prefill and denoise halves them; vision is faster uncompiled.
DEFAULT_COMPILE = ("prefill", "denoise")


@dataclass(frozen=True)
class RunMode:
    prefill: str  # one of PREFILL_BACKENDS
    cuda_graphs: bool
    compile_stages: tuple[str, ...] | None  # None: DEFAULT_COMPILE on CUDA


def resolve_backend(name: str, cuda_graphs: bool = True, compile_stages: tuple[str, ...] | None = None) -> RunMode:
    """A backend name (or the `eager` alias) and the switches -> what the runner runs."""
    if name == "eager":
        return RunMode("bf16", False, ())
    if name not in PREFILL_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return RunMode(name, cuda_graphs, compile_stages)


def parse_stages(text: str | None) -> tuple[str, ...] | None:
    """`--compile prefill,denoise` -> stages; 'none' -> (); None -> None (the default)."""
    if text is None:
        return None
    if text == "none":
        return ()
    stages = tuple(s for s in text.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad} for --compile; choose from {', '.join(STAGES)} or none")
    return stages
