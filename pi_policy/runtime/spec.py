"""RunnerSpec: one frozen, torch-free description of a runner, built once and passed down.

The node's parameters (`NodeParams.runner_spec()`), the command line (`tools.flags.spec_from_args`) and the
server's config each produce one; `build_runner(spec)` is the one constructor. `validate()` gives the one-line
errors a user sees before any model is built. Adding a runner setting means one field here (with its check in
`validate`), one flag in `tools/flags.py`, one parameter row in `node/params.py`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from pi_policy.cameras import CameraSet
from pi_policy.model.config import PRESETS
from pi_policy.policy_config import CONFIGS as POLICY_CONFIGS
from pi_policy.policy_config import PolicyOverrides, get_policy_config
from pi_policy.runtime.options import (
    BACKEND_CHOICES,
    DENOISE_BACKENDS,
    FP8_DENOISE,
    VISION_BACKENDS,
    RTCSettings,
    kept_cells,
    parse_stages,
)

PROMPT_FORMATS = ("auto", "openpi", "lerobot")  # auto + pi_policy.model.tokenizer.PROMPT_FORMATS (no torch here)
FP8_LINEARS = ("wqkv", "wo", "mlp.gate_up", "mlp.down")
FP8_DYNAMIC = ("row", "tensor")  # pi_policy.runtime.prefill.fp8.DYNAMIC
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class SpecError(ValueError):
    """A runner description that cannot be built; the message lists every problem, one per line."""


@dataclass(frozen=True)
class FP8Options:
    """The options of the fp8 prefill (pi_policy.runtime.prefill.fp8.build_fp8_prefill) and of the fp8 vision tower
    (pi_policy.runtime.vision.fp8.build_fp8_vision: all but keep_bf16 and fused_quant).

    The defaults are the measured configuration (one dynamic scale per tensor, quantized in a pass of its own);
    per-row scales (`dynamic="row"`, which keep each robot of a batch independent of the others) and quantization
    inside the RMSNorm / GeGLU kernels (`fused_quant`) are options until a GPU measures them."""

    keep_bf16: tuple[str, ...] = ()  # prefill linears left in bf16 in every block
    fast_accum: bool = True  # use_fast_accum of the FP8 GEMMs
    per_channel: bool = False  # per-output-channel weight scales
    calibration: str | None = None  # static activation scales (pi-policy calibrate's JSON); None: dynamic
    dynamic: str = "tensor"  # without static scales: one activation scale per tensor or per row (token)
    fused_quant: bool = False  # quantize inside the RMSNorm / GeGLU kernels that produce the activations (prefill)

    def kwargs(self) -> dict:
        """build_fp8_prefill's keyword arguments (calibration aside)."""
        return {"keep_bf16": self.keep_bf16, "fast_accum": self.fast_accum, "per_channel": self.per_channel,
                "dynamic": self.dynamic, "fuse_producers": self.fused_quant}

    def vision_kwargs(self) -> dict:
        """build_fp8_vision's keyword arguments (calibration aside)."""
        return {"fast_accum": self.fast_accum, "per_channel": self.per_channel, "dynamic": self.dynamic}


@dataclass(frozen=True)
class RunnerSpec:
    # the model and what turns robot data into its inputs
    preset: str = "tiny"
    checkpoint: str | None = None  # safetensors file or checkpoint folder; None: random weights (seed)
    norm_stats: str | None = None  # None: found beside the checkpoint
    tokenizer: str | None = None  # None: found beside the checkpoint, else the byte tokenizer (tiny only)
    prompt_format: str = "auto"
    require_assets: bool = True  # False (latency benchmarks): a checkpoint without statistics or tokenizer runs
    seed: int = 0  # random weights and the denoising noise
    cameras: CameraSet = field(default_factory=CameraSet)  # the runner is built for cameras.served
    action_dim: int | None = None  # the robot's (unpadded) action dims; None: the named config's, else the stats'
    # the policy around the model (pi_policy.policy_config); None: the named config's, the checkpoint's, the preset's
    policy_config: str | None = None  # openpi's training config name (pi0_aloha, pi05_droid, ...)
    action_horizon: int | None = None
    denoise_steps: int | None = None
    max_token_len: int | None = None
    discrete_state_input: bool | None = None  # pi0.5: the state written into the prompt
    delta_action_mask: tuple[int, ...] | None = None  # openpi's make_bool_mask notation; () = absolute actions
    robot_conversion: str | None = None  # none or aloha (openpi's adapt_to_pi)
    # where and how each stage runs
    device: str = "cpu"
    backend: str = "bf16"  # the prefill: bf16, fp8, tensorrt, or eager (bf16 without graphs or compilation)
    engine_path: str | None = None  # TensorRT engine (backend tensorrt)
    denoise: str = "auto"  # auto, bf16 (PyTorch), triton or fp8 (the fused Triton expert), persistent(-fp8)
    denoise_keep_bf16: tuple[str, ...] = ()  # FP8 expert weights: matrices (and layers) kept bf16 (kept_cells)
    vision: str = "bf16"  # bf16 (the model's SigLIP tower) or fp8 (its linears and the projector in FP8)
    cuda_graphs: bool = True
    compile_stages: tuple[str, ...] | None = None  # None: the default (prefill and denoise on CUDA)
    rtc: RTCSettings = field(default_factory=RTCSettings)
    fp8: FP8Options = field(default_factory=FP8Options)
    threads: int = 0  # PyTorch CPU threads; 0: auto (runtime.threads)
    # several robots: buffers and CUDA graphs per batch size (infer_batch runs the smallest that holds a batch)
    batch_sizes: tuple[int, ...] = (1,)
    # start-up
    warmup: bool = True
    progress: bool = True

    def replace(self, **changes) -> RunnerSpec:
        return dataclasses.replace(self, **changes)

    @property
    def num_cameras(self) -> int:
        return len(self.cameras.served)

    def problems(self) -> list[str]:
        out = []
        if self.preset not in PRESETS:
            out.append(f"unknown preset '{self.preset}'; choose one of {', '.join(sorted(PRESETS))}")
        if self.prompt_format not in PROMPT_FORMATS:
            out.append(f"prompt_format '{self.prompt_format}' is not one of {', '.join(PROMPT_FORMATS)}")
        if not _DEVICE.match(self.device):
            out.append(f"device '{self.device}' is not cpu, cuda or cuda:N")
        if self.backend not in BACKEND_CHOICES:
            out.append(f"backend '{self.backend}' is not one of {', '.join(BACKEND_CHOICES)}")
        if self.denoise not in DENOISE_BACKENDS:
            out.append(f"denoise_backend '{self.denoise}' is not one of {', '.join(DENOISE_BACKENDS)}")
        if self.denoise_keep_bf16:
            if self.denoise not in FP8_DENOISE:
                out.append(f"denoise_keep_bf16 applies to the FP8 denoise backends ({', '.join(FP8_DENOISE)}), "
                           f"not {self.denoise}")
            try:
                kept_cells(self.denoise_keep_bf16, PRESETS[self.preset].expert.depth if self.preset in PRESETS else 1)
            except ValueError as e:
                out.append(f"denoise_{e}")
        if self.vision not in VISION_BACKENDS:
            out.append(f"vision_backend '{self.vision}' is not one of {', '.join(VISION_BACKENDS)}")
        if self.fp8.dynamic not in FP8_DYNAMIC:
            out.append(f"fp8 dynamic scaling '{self.fp8.dynamic}' is not one of {', '.join(FP8_DYNAMIC)}")
        if self.backend == "tensorrt" and not self.engine_path:
            out.append("backend tensorrt needs engine_path")
        if self.compile_stages is not None:
            try:
                parse_stages(",".join(self.compile_stages) or "none")
            except ValueError as e:
                out.append(str(e))
        out += self.cameras.problems()
        if PRESETS.get(self.preset) is not None and self.num_cameras > PRESETS[self.preset].num_cameras:
            out.append(f"preset {self.preset} takes at most {PRESETS[self.preset].num_cameras} cameras, "
                       f"got {list(self.cameras.served)}")
        for name in ("seed", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                out.append(f"{name} must be a whole number >= 0, got {value!r}")
        if self.policy_config is not None:
            if self.policy_config not in POLICY_CONFIGS:
                try:
                    get_policy_config(self.policy_config)
                except ValueError as e:
                    out.append(str(e))
            elif self.preset in PRESETS and POLICY_CONFIGS[self.policy_config].pi05 != PRESETS[self.preset].pi05:
                cfg = POLICY_CONFIGS[self.policy_config]
                out.append(f"policy_config {cfg.name} is a {cfg.kind} configuration, but preset {self.preset} is "
                           f"{'pi05' if PRESETS[self.preset].pi05 else 'pi0'}")
        out += self.policy_overrides().problems()
        bad = [x for x in self.fp8.keep_bf16 if x not in FP8_LINEARS]
        if bad:
            out.append(f"fp8 keep_bf16 {bad}: choose from {', '.join(FP8_LINEARS)}")
        if not isinstance(self.rtc, RTCSettings):
            out.append(f"rtc must be RTCSettings, got {type(self.rtc).__name__}")
        sizes = self.batch_sizes
        if not isinstance(sizes, tuple) or not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                             for n in sizes):
            out.append(f"batch_sizes must be whole numbers >= 1, got {sizes!r}")
        elif max(sizes) > 1:
            if isinstance(self.rtc, RTCSettings) and self.rtc.on:
                out.append(f"real-time chunking runs one robot at a time: batch_sizes {list(sizes)} need rtc off")
            if self.backend == "tensorrt":
                out.append(f"the TensorRT prefill engine runs batch 1: batch_sizes {list(sizes)} need the bf16 or fp8 "
                           "prefill")
        return out

    def policy_overrides(self) -> PolicyOverrides:
        """The policy settings given explicitly."""
        return PolicyOverrides(self.action_horizon, self.denoise_steps, self.max_token_len, self.discrete_state_input,
                               self.delta_action_mask, self.robot_conversion, self.action_dim)

    def validate(self) -> RunnerSpec:
        """self, or a SpecError listing every problem."""
        problems = self.problems()
        if problems:
            raise SpecError("invalid runner settings:\n  " + "\n  ".join(problems))
        return self
