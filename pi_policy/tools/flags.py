"""The command line's model flags, declared once, and their translation into a RunnerSpec or node parameters.

Commands that build a runner from flags (demo, bench, verify, calibrate, build-engine) take them with defaults and
get a RunnerSpec from `spec_from_args`. Commands that read the node's parameter file (eval-bag, serve) take the same
flags as overrides of the file, plus `--set PARAM=VALUE` for any parameter, parsed once by `param_overrides`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from pi_policy.cameras import DEFAULT_CAMERAS, CameraSet
from pi_policy.model.config import PRESETS
from pi_policy.policy_config import AUTO, STATE_INPUTS, conversion_value, mask_value, state_input_value
from pi_policy.policy_config import CONFIGS as POLICY_CONFIGS
from pi_policy.robot_transforms import CONVERSIONS
from pi_policy.runtime.options import BACKEND_CHOICES, DENOISE_BACKENDS, VISION_BACKENDS, parse_stages
from pi_policy.runtime.spec import FP8_DYNAMIC, FP8_LINEARS, PROMPT_FORMATS, FP8Options, RunnerSpec, SpecError
from pi_policy.tools.errors import UsageError, existing


@dataclass(frozen=True)
class Flag:
    """One model flag: its RunnerSpec field and the node parameter it overrides. The flag's value is the
    parameter's (text, as in the parameter file); `to_spec` turns it into the spec field's value."""

    name: str
    field: str
    param: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    to_spec: Callable[[Any], Any] | None = None


def parse_keep_bf16(text: str) -> tuple[str, ...]:
    """`gate_up,down:0-5,7,wo:1` -> ("gate_up", "down:0-5,7", "wo:1"): a part without a matrix continues the last."""
    out: list[str] = []
    for part in (x for x in text.replace(" ", "").split(",") if x):
        if part[0].isdigit() and out and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return tuple(out)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated whole numbers, got {text!r}") from None


MODEL_FLAGS = (
    Flag("--preset", "preset", "preset", f"model preset: {', '.join(PRESETS)}"),
    Flag("--checkpoint", "checkpoint", "checkpoint",
         "safetensors checkpoint (file or folder, openpi's or LeRobot's); none or '' = random weights"),
    Flag("--norm-stats", "norm_stats", "norm_stats",
         "openpi norm_stats.json or LeRobot checkpoint folder (default: found beside the checkpoint)"),
    Flag("--tokenizer", "tokenizer", "tokenizer",
         "PaliGemma SentencePiece model (default: found beside the checkpoint)"),
    Flag("--prompt-format", "prompt_format", "prompt_format",
         "how the checkpoint's trainer wrote prompts (auto: detected beside it)", choices=PROMPT_FORMATS),
    Flag("--seed", "seed", "seed", "seed for random weights, inputs and the denoising noise", type=int),
    Flag("--device", "device", "device", "torch device: cpu, cuda or cuda:N"),
    Flag("--backend", "backend", "backend", "prefill backend; eager = bf16 without CUDA graphs or torch.compile",
         choices=BACKEND_CHOICES),
    Flag("--denoise", "denoise", "denoise_backend",
         "denoise backend: auto (the fused Triton expert on a GPU, PyTorch elsewhere or with real-time chunking), "
         "bf16 (the PyTorch expert), triton or fp8 (the fused expert, bf16 or FP8 weights), persistent or "
         "persistent-fp8 (the fused expert as one persistent kernel)", choices=DENOISE_BACKENDS),
    Flag("--engine", "engine_path", "engine_path", "TensorRT engine for --backend tensorrt"),
    Flag("--threads", "threads", "threads", "PyTorch CPU threads; 0 = a quarter of the cores, 1 to 4 (more threads "
         "stall when other programs share the cores)", type=int),
    Flag("--denoise-keep-bf16", "denoise_keep_bf16", "denoise_keep_bf16",
         "with FP8 expert weights: comma-separated matrices kept bf16, each in every layer or in some "
         "(qkv, wo, gate_up, down or all; e.g. gate_up,down:0-5)", type=parse_keep_bf16),
    Flag("--vision", "vision", "vision_backend",
         "vision tower: bf16 (the model's) or fp8 (its linears and the projector in FP8)", choices=VISION_BACKENDS),
    Flag("--batch-sizes", "batch_sizes", "batch_sizes",
         "comma-separated batch sizes the runner has buffers and CUDA graphs for (1 is always among them), e.g. "
         "1,2,4,8: infer_batch runs several robots' observations at once", type=parse_batch_sizes),
    Flag("--policy-config", "policy_config", "policy_config",
         f"openpi training config the checkpoint was trained with: {', '.join(POLICY_CONFIGS)}"),
    Flag("--action-horizon", "action_horizon", "action_horizon", "action steps per chunk (default: the policy "
         "config's, the checkpoint's, the preset's)", type=int, to_spec=lambda v: v or None),
    Flag("--denoise-steps", "denoise_steps", "denoise_steps", "flow-matching denoise steps (default: the "
         "checkpoint's, else 10)", type=int, to_spec=lambda v: v or None),
    Flag("--max-token-len", "max_token_len", "max_token_len", "prompt length in tokens (default: the policy config's, "
         "the checkpoint's, the preset's)", type=int, to_spec=lambda v: v or None),
    Flag("--discrete-state-input", "discrete_state_input", "discrete_state_input",
         "pi0.5: write the state into the prompt", choices=STATE_INPUTS, to_spec=state_input_value),
    Flag("--delta-action-mask", "delta_action_mask", "delta_action_mask",
         "action dims relative to the state, openpi's make_bool_mask notation (e.g. 6,-1,6,-1), or none",
         to_spec=mask_value),
    Flag("--robot-conversion", "robot_conversion", "robot_conversion",
         "joint convention conversion in and out (aloha: openpi's adapt_to_pi)", choices=(AUTO, *CONVERSIONS),
         to_spec=conversion_value),
)
_BY_NAME = {f.name: f for f in MODEL_FLAGS}
# what eval-bag and serve let the command line override in the node parameter file (besides --set)
CONFIG_FLAGS = ("--preset", "--checkpoint", "--prompt-format", "--device", "--backend", "--denoise", "--threads",
                "--policy-config", "--action-horizon", "--denoise-steps")


def default_device() -> str:
    import torch  # the commands that build a model import torch anyway

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                        repeat: tuple[str, ...] = (), skip: tuple[str, ...] = (), cameras: bool = True) -> None:
    """The model flags with defaults (`defaults`: spec field -> value, over RunnerSpec's own); flags in `repeat`
    may be given several times (bench compares them; the first is the baseline); --cameras N and --no-progress."""
    base = RunnerSpec()
    for flag in MODEL_FLAGS:
        if flag.name in skip:
            continue
        default = (defaults or {}).get(flag.field, getattr(base, flag.field))
        if flag.name in repeat:
            p.add_argument(flag.name, action="append", type=flag.type, choices=flag.choices, dest=flag.field,
                           help=f"{flag.help}; repeat to compare (the first is the baseline; default {default})")
        else:
            shown = "" if default in (None, "") else f" (default: {default})"
            p.add_argument(flag.name, type=flag.type, choices=flag.choices, default=default, dest=flag.field,
                           help=flag.help + shown)
    if cameras:
        p.add_argument("--cameras", type=int, default=None, metavar="N",
                       help=f"camera views the runner (or engine) is built for, 1-{len(DEFAULT_CAMERAS)} (default: "
                            "the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_fp8_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the fp8 prefill and the fp8 vision tower."""
    p.add_argument("--fp8-keep-bf16", default="", metavar="LINEARS",
                   help=f"fp8: comma-separated prefill linears left in bf16 ({','.join(FP8_LINEARS)})")
    p.add_argument("--fp8-exact-accum", action="store_true",
                   help="fp8: exact accumulation in the FP8 GEMMs (use_fast_accum=False; slower)")
    p.add_argument("--fp8-per-channel", action="store_true", help="fp8: per-output-channel weight scales")
    p.add_argument("--fp8-dynamic", default="tensor", choices=FP8_DYNAMIC,
                   help="fp8: without static scales, one activation scale per tensor (the default) or per row (token; "
                        "keeps each robot of a batch independent of the others)")
    p.add_argument("--fp8-fused-quant", action="store_true",
                   help="fp8: quantize the prefill's activations inside the RMSNorm and GeGLU kernels that produce "
                        "them (Triton, CUDA GPU) instead of in a pass of their own; not measured on a GPU yet")
    p.add_argument("--fp8-calibration", default=None, metavar="JSON",
                   help="fp8: static activation scales (vision and prefill) from pi-policy calibrate (default: "
                        "dynamic scales)")


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", default=None, metavar="STAGES",
                   help="comma-separated stages to torch.compile; default prefill,denoise on CUDA; 'none' for none")


def camera_set(n: int | None) -> CameraSet:
    """The first n of the model's cameras (all of them when n is None)."""
    if n is None:
        return CameraSet()
    if not 1 <= n <= len(DEFAULT_CAMERAS):
        raise UsageError(f"--cameras must be 1..{len(DEFAULT_CAMERAS)}, got {n}")
    return CameraSet.of(DEFAULT_CAMERAS[:n])


PATH_FLAGS = ("checkpoint", "norm_stats", "tokenizer", "engine_path")


def check_paths(args: argparse.Namespace) -> None:
    """The files the command line names must exist (a usage error otherwise, before any model is built)."""
    for flag in MODEL_FLAGS:
        if flag.field in PATH_FLAGS and getattr(args, flag.field, None):
            value = getattr(args, flag.field)
            for path in value if isinstance(value, list) else [value]:
                existing(path, flag.name)
    if getattr(args, "fp8_calibration", None):
        existing(args.fp8_calibration, "--fp8-calibration")


def spec_from_args(args: argparse.Namespace, **fixed) -> RunnerSpec:
    """The RunnerSpec the flags describe; `fixed`: fields the command sets itself (a repeated flag's value, say).
    A value the spec refuses, or a file that is not there, is a usage error."""
    check_paths(args)
    values: dict[str, Any] = {}
    for flag in MODEL_FLAGS:
        if flag.field in vars(args):
            value = getattr(args, flag.field)
            value = value[0] if isinstance(value, list) else value
            values[flag.field] = flag.to_spec(value) if flag.to_spec is not None and value is not None else value
    for name in ("checkpoint", "norm_stats", "tokenizer", "engine_path"):
        values[name] = values.get(name) or None
    if "cameras" in vars(args):
        values["cameras"] = camera_set(args.cameras)
    if "compile" in vars(args):
        try:
            values["compile_stages"] = parse_stages(args.compile)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if "fp8_keep_bf16" in vars(args):
        values["fp8"] = FP8Options(tuple(x for x in args.fp8_keep_bf16.split(",") if x), not args.fp8_exact_accum,
                                   args.fp8_per_channel, args.fp8_calibration, args.fp8_dynamic,
                                   args.fp8_fused_quant)
    values["progress"] = not getattr(args, "no_progress", False)
    values = {k: v for k, v in values.items() if v is not None or k in ("checkpoint", "norm_stats", "tokenizer",
                                                                          "engine_path")}
    try:
        return RunnerSpec(**(values | fixed)).validate()
    except SpecError as e:
        raise UsageError(str(e)) from None


def add_config_overrides(p: argparse.ArgumentParser, flags: tuple[str, ...], repeat: tuple[str, ...] = ()) -> None:
    """Model flags that override the node parameter file's values, and --set for any parameter."""
    for name in flags:
        flag = _BY_NAME[name]
        if name in repeat:
            p.add_argument(name, action="append", type=flag.type, choices=flag.choices, dest=flag.field,
                           help=f"{flag.help}; repeat to compare (the first is the baseline). Default: the config's")
        else:
            p.add_argument(name, type=flag.type, choices=flag.choices, dest=flag.field,
                           help=f"override the config's {flag.param}: {flag.help}")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", dest="overrides",
                   help="override any node parameter; VALUE in YAML syntax (e.g. max_observation_age_s=0.3, "
                        "required_cameras=[base_0_rgb]); PARAM= (nothing after =) is the empty string")


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set PARAM=VALUE items -> parameter values; VALUE is YAML, and an empty VALUE the empty string."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected PARAM=VALUE")
        try:
            values[key.strip()] = "" if raw.strip() == "" else yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item!r}: VALUE is not YAML ({' '.join(str(e).split())})") from None
    return values


def param_overrides(args: argparse.Namespace, repeat: tuple[str, ...] = ()) -> dict[str, Any]:
    """The node parameters the command line sets: --set items, then the model flags given (which win); a repeated
    flag sets its first value."""
    check_paths(args)
    values = parse_set(args.overrides)
    for flag in MODEL_FLAGS:
        value = getattr(args, flag.field, None)
        if value is not None:
            values[flag.param] = value[0] if flag.name in repeat and isinstance(value, list) else value
    return values
