"""The runtime's vocabulary: backend names, compile switches, real-time chunking settings, torch-free.

The rules that turn these names into what runs each stage live in pi_policy.runtime.choice.

Parameter checks, argument parsers and the launch file import this without loading torch. A backend names the
implementation of the prefill; CUDA graphs and torch.compile are separate switches. `eager` is kept as a backend
name for the command line and parameter files: it means bf16 with neither graphs nor compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pi_policy.observation import STAGES

PREFILL_BACKENDS = ("bf16", "fp8", "tensorrt")
VISION_BACKENDS = ("bf16", "fp8")  # fp8: the SigLIP tower's and the projector's linears in FP8
BACKEND_CHOICES = (*PREFILL_BACKENDS, "eager")  # what --backend and the `backend` parameter accept
# The denoise loop: bf16 is the PyTorch action expert (torch.compile'd on CUDA); triton and fp8 are the fused Triton
# expert with bf16 or FP8 (e4m3, per-output-channel) weights, persistent and persistent-fp8 the same expert as one
# persistent kernel; auto picks (pi_policy.runtime.choice.plan_denoise).
DENOISE_BACKENDS = ("auto", "bf16", "triton", "fp8", "persistent", "persistent-fp8")
FP8_DENOISE = ("fp8", "persistent-fp8")  # the ones with FP8 expert weights, whose cells may be kept bf16
EXPERT_MATRICES = ("qkv", "wo", "gate_up", "down")  # the action expert's matrices per layer


def kept_cells(keep_bf16, depth: int) -> frozenset[tuple[int, str]]:
    """The (layer, matrix) cells of the action expert that stay bf16 under FP8 weights. Each entry names a matrix
    (of EXPERT_MATRICES, or `all`) in every layer, or in some: `down`, `gate_up:0-5`, `all:0`, `wo:3,7`."""
    cells = set()
    for entry in keep_bf16:
        name, _, layers = str(entry).partition(":")
        if name not in (*EXPERT_MATRICES, "all"):
            raise ValueError(f"keep_bf16 entry {entry!r}: the matrix is one of {', '.join(EXPERT_MATRICES)} or all")
        chosen = range(depth) if not layers else _layers(layers, depth, entry)
        cells |= {(i, m) for i in chosen for m in (EXPERT_MATRICES if name == "all" else (name,))}
    return frozenset(cells)


def _layers(text: str, depth: int, entry: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) >= depth or int(hi or lo) < int(lo):
            raise ValueError(f"keep_bf16 entry {entry!r}: layers are N, N-M or a comma list of them, below {depth}")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
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


RTC_MODES = ("off", "inpaint", "guided")  # real-time chunking: pi_policy.model.rtc
PREFIX_SCHEDULES = ("zeros", "ones", "linear", "exp")


@dataclass(frozen=True)
class RTCSettings:
    """How a new chunk continues the one the robot is executing (docs/smooth-control.md).

    mode: off (plain denoise), inpaint (the steps executed before the chunk arrives are held to the previous
    chunk inside the Euler loop) or guided (they are pulled there by vector-Jacobian guidance).
    execution_horizon: steps of the new chunk pulled toward the previous one; after the frozen delay the
    weights fall from 1 to 0 at this step, following prefix_schedule.
    max_guidance_weight: the cap on the guidance weight (guided only; the paper's beta).
    """

    mode: str = "off"
    execution_horizon: int = 25
    prefix_schedule: str = "exp"
    max_guidance_weight: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in RTC_MODES:
            raise ValueError(f"rtc mode {self.mode!r} is not one of {', '.join(RTC_MODES)}")
        if self.prefix_schedule not in PREFIX_SCHEDULES:
            raise ValueError(f"prefix schedule {self.prefix_schedule!r} is not one of {', '.join(PREFIX_SCHEDULES)}")
        if isinstance(self.execution_horizon, bool) or not isinstance(self.execution_horizon, int) \
                or self.execution_horizon < 1:
            raise ValueError(f"execution_horizon must be a whole number >= 1, got {self.execution_horizon!r}")
        if not self.max_guidance_weight >= 0:
            raise ValueError(f"max_guidance_weight must be >= 0, got {self.max_guidance_weight}")

    @property
    def on(self) -> bool:
        return self.mode != "off"


def parse_delay(text: str) -> int | None:
    """`inference_delay_steps` / `--delay`: 'auto' -> None (measured), or a whole number of control periods >= 0."""
    text = str(text).strip()
    if text == "auto":
        return None
    if not text.isdigit():
        raise ValueError(f"inference delay must be 'auto' or a whole number of control periods >= 0, got {text!r}")
    return int(text)
