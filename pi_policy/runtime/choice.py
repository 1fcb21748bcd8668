"""Which implementation runs each stage: every rule that picks one, and the record of what was picked.

`plan_stages(spec, on_gpu, dtype)` applies the rules before anything is built: the `eager` alias, CUDA graphs only
on a GPU, torch.compile's default stages, no compilation around a TensorRT engine, `auto` denoise, real-time
chunking on the PyTorch loop, no compiled velocity under a fused expert. What cannot be built or fails its first
run at warm-up is replaced by `fall_back` / `uncompiled`, which keep the reason as the record's note. Labels
(`bf16-graph-compiled`, `triton-graph`, `bf16-graph+rtc-inpaint`) are derived from the fields, never parsed:
tools compare fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pi_policy.observation import STAGES
from pi_policy.runtime.options import DEFAULT_COMPILE, resolve_backend

TORCH = "torch"  # the model's own PyTorch code, in the model's dtype
# denoise backend -> implementation (fp8w: FP8 weights only; persistent: the whole loop in one kernel)
FUSED_DENOISE = {"triton": "triton", "fp8": "fp8w", "persistent": "persistent", "persistent-fp8": "persistent-fp8w"}


@dataclass(frozen=True)
class StageChoice:
    """What ran one stage.

    impl: torch (the model's code), fp8 (vision, prefill), tensorrt (prefill), triton or fp8w (the fused denoise
    expert), persistent or persistent-fp8w (the same as one persistent kernel).
    dtype: the model's dtype name (bf16 on a GPU, float32 on a CPU).
    graph: replayed as a CUDA graph; compiled: torch.compile'd; rtc: the real-time chunking mode (denoise).
    note: why this is not what was asked for (a fallback), shown to the user; empty when it is.
    """

    stage: str
    impl: str = TORCH
    dtype: str = "bf16"
    graph: bool = False
    compiled: bool = False
    rtc: str = "off"
    note: str = ""

    @property
    def label(self) -> str:
        name = self.dtype if self.impl == TORCH else self.impl
        text = f"{name}-{'graph' if self.graph else 'eager'}" + ("-compiled" if self.compiled else "")
        return text + (f"+rtc-{self.rtc}" if self.rtc != "off" else "")

    @property
    def fused(self) -> bool:
        return self.stage == "denoise" and self.impl != TORCH


def plan_stages(spec, on_gpu: bool, dtype: str) -> dict[str, StageChoice]:
    """The implementation of each stage for `spec` (a RunnerSpec) on this device, before anything is built."""
    mode = resolve_backend(spec.backend, spec.cuda_graphs, spec.compile_stages)
    graph = mode.cuda_graphs and on_gpu
    compiled = set(DEFAULT_COMPILE if mode.compile_stages is None else mode.compile_stages) if on_gpu else set()
    if mode.prefill == "tensorrt":  # the engine is already compiled; torch.compile would only graph-break on it
        compiled.discard("prefill")
    choices = {s: StageChoice(s, dtype=dtype, graph=graph, compiled=s in compiled) for s in STAGES}
    if mode.prefill != "bf16":
        choices["prefill"] = dataclasses.replace(choices["prefill"], impl=mode.prefill)
    if spec.vision != "bf16":
        choices["vision"] = dataclasses.replace(choices["vision"], impl=spec.vision)
    choices["denoise"] = plan_denoise(choices["denoise"], spec.denoise, on_gpu, spec.rtc.mode)
    return choices


def plan_denoise(base: StageChoice, name: str, on_gpu: bool, rtc_mode: str = "off") -> StageChoice:
    """auto: the fused expert on a GPU (measured faster than the compiled PyTorch expert at the same accuracy),
    PyTorch elsewhere. Real-time chunking steers the PyTorch loop, so it runs there whatever was asked."""
    rtc = dataclasses.replace(base, rtc=rtc_mode)
    if name == "auto":
        name = "triton" if on_gpu and rtc_mode == "off" else "bf16"
    if name == "bf16":
        return rtc
    if rtc_mode != "off":
        return dataclasses.replace(rtc, note=f"denoise {name}: real-time chunking ({rtc_mode}) runs on the PyTorch "
                                             "denoise loop; the fused expert is off")
    return dataclasses.replace(base, impl=FUSED_DENOISE[name], compiled=False)  # the kernels replace the velocity


def fall_back(choice: StageChoice, why: str) -> StageChoice:
    """The PyTorch implementation of the stage, with the reason the chosen one could not run."""
    asked = {impl: name for name, impl in FUSED_DENOISE.items()}.get(choice.impl, choice.impl)  # the user's word
    note = f"{choice.stage} {asked} unavailable ({why}); the PyTorch {choice.stage} runs"
    return dataclasses.replace(choice, impl=TORCH, note=_join(choice.note, note))


def uncompiled(choice: StageChoice, why: str) -> StageChoice:
    note = f"torch.compile failed, stages run uncompiled: {why}"
    return dataclasses.replace(choice, compiled=False, note=_join(choice.note, note))


def notes(choices: dict[str, StageChoice]) -> str:
    """Every stage's note, once each, in stage order: what the user is told at start-up."""
    return "; ".join(dict.fromkeys(c.note for c in choices.values() if c.note))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


@dataclass
class Implementation:
    """What a backend module built for a stage: the callable (None: the model's own code), which implementation it
    is, and why it is not the one asked for (a fallback) or what the user should know about it."""

    fn: object | None
    impl: str = TORCH
    note: str = ""
