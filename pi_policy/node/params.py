"""Every parameter of the pi_policy node, declared once as data (default, ROS type, description), and the checker
for ROS 2 parameter files that applies the node's own rules.

Types are the ROS 2 ones: "string", "integer", "double", "bool", "string_array", "double_array",
"integer_array". A double
(or a double array) written with integers (`10` for `10.0`) is that double, as ROS users write them (the node
accepts it too, although rclpy alone would not); an unknown name (a typo) is an error, here and in the node.
Empty lists cannot be written in a parameter file; leave the parameter out to keep its default.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pi_policy.cameras import DEFAULT_CAMERAS, CameraSet
from pi_policy.model.config import PRESETS
from pi_policy.node.compressed import DEFAULT_MAX_SIDE, MAX_SIDE_LIMIT
from pi_policy.policy_config import CONFIGS as POLICY_CONFIGS
from pi_policy.policy_config import conversion_value, mask_value, state_input_value
from pi_policy.runtime.options import RTCSettings, parse_delay
from pi_policy.runtime.spec import FP8Options, RunnerSpec

NODE_NAME = "pi_policy_node"
_ROS_TYPES = {"str": "string", "int": "integer", "float": "double", "bool": "bool",
              "list[str]": "string_array", "list[float]": "double_array", "list[int]": "integer_array"}
STREAM_TYPES = ("float64_array", "joint_state")
QOS_RELIABILITY = ("best_effort", "reliable")


def _p(default, doc: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class NodeParams:
    # model
    preset: str = _p("pi0", "Model preset: pi0, pi05, or tiny (CPU demo).")
    checkpoint: str = _p("", "Model weights: a safetensors file, or a checkpoint folder (openpi's or LeRobot's; "
                             "statistics, tokenizer and config are looked up beside the weights); empty = random, "
                             "for preset tiny only.")
    norm_stats: str = _p("", "Normalization statistics: openpi's norm_stats.json or a LeRobot checkpoint folder "
                             "(policy_preprocessor.json); empty = found beside the checkpoint (an error if none is).")
    tokenizer: str = _p("", "PaliGemma SentencePiece model; empty = found beside the checkpoint or in openpi's / "
                            "Hugging Face's cache, else the built-in byte tokenizer (tiny only).")
    prompt_format: str = _p("auto", "How the trainer wrote prompts: auto (detected beside the checkpoint; openpi "
                                    "without one), openpi or lerobot.")
    device: str = _p("cuda", "Torch device: cuda, cuda:N or cpu.")
    backend: str = _p("bf16", "Prefill backend: bf16, eager (no CUDA graphs), fp8 or tensorrt; the other "
                              "stages run bf16 with CUDA graphs.")
    engine_path: str = _p("", "TensorRT engine for the prefill when backend is tensorrt.")
    denoise_backend: str = _p("auto", "Denoise backend: auto (triton on a CUDA GPU, bf16 elsewhere or with RTC on), "
                                      "bf16 (the PyTorch action expert, compiled on CUDA), triton (fused Triton "
                                      "expert), fp8 (fused, FP8 expert weights), persistent or persistent-fp8 (the "
                                      "fused expert as one persistent kernel); a fused one that cannot run falls "
                                      "back to bf16 with a warning.")
    denoise_keep_bf16: list[str] = _p([], "With FP8 expert weights (fp8, persistent-fp8): matrices kept bf16, each "
                                          "in every layer or in some: qkv, wo, gate_up, down or all, e.g. "
                                          "[gate_up, 'down:0-5'].")
    vision_backend: str = _p("bf16", "Vision backend: bf16 (the SigLIP tower as the model runs it) or fp8 (its "
                                     "linears and the projector in FP8). Verify FP8 with your checkpoint first: "
                                     "pi-policy verify --combinations (docs/fp8.md).")
    fp8_calibration: str = _p("", "Static FP8 activation scales for the fp8 prefill and vision, written by "
                                  "pi-policy calibrate; empty = dynamic scales, one per tensor.")
    model_camera_names: list[str] = _p([], "Camera names the model was trained with, in its order; empty = the "
                                           "preset's (base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb). The "
                                           "runner is built for the subscribed ones only.")
    action_dim: int = _p(0, "Robot action dims (unpadded); 0 = policy_config's, else the statistics'.")
    # the policy around the model (README: Use your checkpoint); auto / 0: policy_config's, else the checkpoint's
    # config.json, else the preset's
    policy_config: str = _p("", "openpi training config the checkpoint was trained with (pi0_aloha, pi05_droid, "
                                "pi05_libero, ...): sets the settings below as openpi does; empty = none.")
    action_horizon: int = _p(0, "Action steps per chunk; 0 = auto.")
    denoise_steps: int = _p(0, "Flow-matching denoise steps (fewer run faster); 0 = auto.")
    max_token_len: int = _p(0, "Prompt length in tokens; 0 = auto.")
    discrete_state_input: str = _p("auto", "pi0.5: write the state into the prompt, 'true' or 'false' (quoted); "
                                           "auto.")
    delta_action_mask: str = _p("auto", "Action dims predicted relative to the state, in openpi's make_bool_mask "
                                        "notation ('6,-1,6,-1'), or none; auto.")
    robot_conversion: str = _p("auto", "Joint convention conversion in and out: aloha (openpi's adapt_to_pi) or "
                                       "none; auto.")
    seed: int = _p(0, "Seed for random weights and the denoising noise.")
    threads: int = _p(0, "PyTorch CPU threads; 0 = a quarter of the usable cores, 1 to 4 (more threads stall when "
                         "other programs share the cores).")
    warmup: bool = _p(True, "Warm up (and capture CUDA graphs) while configuring, before serving.")
    batch_sizes: list[int] = _p([1], "Batch sizes the runner has buffers and CUDA graphs for (1 is always among "
                                     "them): the node serves one robot; pi-policy serve runs several robots' "
                                     "requests at once (left at [1], its serve section's max_batch sets 1, 2, 4, "
                                     "... up to it).")
    # inputs
    camera_names: list[str] = _p(list(DEFAULT_CAMERAS),
                                 "Model camera name of each subscribed camera (parallel to camera_topics).")
    camera_topics: list[str] = _p(["cameras/base/image_raw", "cameras/left_wrist/image_raw",
                                   "cameras/right_wrist/image_raw"],
                                  "Image topic of each camera. A topic ending in /compressed is subscribed "
                                  "as sensor_msgs/CompressedImage, any other as sensor_msgs/Image.")
    required_cameras: list[str] = _p([], "Cameras without which a tick is skipped; empty = all. Others are "
                                         "masked out when missing or stale.")
    camera_qos_reliability: str = _p("best_effort", "Camera subscriptions' reliability: best_effort (sensor data: "
                                                    "lost frames are not resent) or reliable (the cameras must "
                                                    "publish reliable too). Large images: use /compressed topics.")
    camera_qos_depth: int = _p(5, "Camera subscriptions' queue depth (frames kept per camera until the node "
                                  "reads them; the node uses the latest).")
    max_image_side: int = _p(DEFAULT_MAX_SIDE, f"Largest width or height of a camera image, raw or compressed "
                                               f"(at most {MAX_SIDE_LIMIT}); a JPEG or PNG declaring more is refused "
                                               "before it is decoded.")
    joint_names: list[str] = _p([], "Joint names in the model's state order, looked up by name.")
    joint_state_topic: str = _p("joint_states", "sensor_msgs/JointState topic.")
    prompt: str = _p("", "Task instruction given to the policy.")
    prompt_topic: str = _p("policy/prompt", "std_msgs/String topic that replaces the prompt live.")
    inference_rate_hz: float = _p(10.0, "Inference ticks per second; 0 = run whenever a new frame arrives.")
    max_observation_age_s: float = _p(0.2, "Inputs older than this (by header stamp) are stale.")
    max_future_skew_s: float = _p(0.05, "Stamps further than this in the future are rejected (clock skew).")
    # outputs
    action_topic: str = _p("policy/joint_trajectory", "trajectory_msgs/JointTrajectory output topic.")
    raw_action_topic: str = _p("policy/action_chunk", "std_msgs/Float32MultiArray of the whole chunk "
                                                       "(horizon x action_dim); empty = not published.")
    output_joint_names: list[str] = _p([], "Joint names of the first action dims; empty = joint_names.")
    control_period_s: float = _p(0.02, "Time between action steps: point k is at (k + 1) * control_period_s.")
    frame_id: str = _p("", "header.frame_id of the published trajectory.")
    latency_topic: str = _p("policy/latency", "diagnostic_msgs/DiagnosticArray published every tick.")
    latency_budget_ms: float = _p(100.0, "Total latency above which the tick's diagnostic is WARN.")
    autostart: bool = _p(True, "Configure and activate at startup (lifecycle node); false: wait for the lifecycle "
                                "transitions (ros2 lifecycle set).")
    # smooth control across chunks (docs/smooth-control.md)
    rtc_mode: str = _p(RTCSettings.mode, "Real-time chunking: off, inpaint (the steps executed before a new chunk "
                                         "arrives are held to the previous chunk while denoising) or guided "
                                         "(pulled there by vector-Jacobian guidance; slower).")
    execution_horizon: int = _p(RTCSettings.execution_horizon,
                                "RTC: steps of a new chunk pulled toward the rest of the executing one; after the "
                                "delay the pull falls to 0 at this step.")
    prefix_schedule: str = _p(RTCSettings.prefix_schedule, "RTC: how the pull falls after the delay: zeros (none), "
                                                           "ones (none until the horizon), linear or exp.")
    max_guidance_weight: float = _p(RTCSettings.max_guidance_weight, "RTC guided: the cap on the guidance weight.")
    inference_delay_steps: str = _p("auto", "RTC: control periods between an observation and its chunk reaching "
                                            "the robot. 'auto' = the p95 of the measured end-to-end latency, or a "
                                            "whole number such as '4' (a string: quote it in YAML).")
    action_stream_topic: str = _p("", "Fixed-rate action stream: the current action every control_period_s on "
                                      "this topic; empty = off.")
    action_stream_type: str = _p("float64_array", "Action stream message: float64_array (std_msgs/Float64MultiArray) "
                                                  "or joint_state (sensor_msgs/JointState, output joints by name).")
    safe_action: list[float] = _p([], "Action stream: sent when the chunk runs out or misses its deadline, one value "
                                      "per output joint; empty = hold the last action.")
    action_stream_deadline_s: float = _p(0.0, "Action stream: the longest a chunk may drive the robot after its "
                                              "observation before the stream holds; 0 = its whole horizon.")

    def validate(self) -> NodeParams:
        problems = []
        if len(self.camera_names) != len(self.camera_topics):
            problems.append(f"camera_names has {len(self.camera_names)} entries but camera_topics has "
                            f"{len(self.camera_topics)}; they are parallel lists")
        for what in ("camera_topics", "joint_names", "output_joint_names"):
            names = getattr(self, what)
            if len(set(names)) != len(names):
                problems.append(f"{what} has repeated entries: {names}")
            if any(not n for n in names):
                problems.append(f"{what} has an empty entry")
        try:
            problems += self.runner_spec().problems()  # the cameras, the model and its backends
        except ValueError as e:  # RTC settings, the policy settings' text
            problems.append(str(e))
        if self.fp8_calibration and "fp8" not in (self.backend, self.vision_backend):
            problems.append("fp8_calibration is set, but neither backend nor vision_backend is fp8")
        if not self.prompt and self.policy_config in POLICY_CONFIGS:  # openpi's InjectDefaultPrompt
            self.prompt = POLICY_CONFIGS[self.policy_config].default_prompt
        if not self.joint_names:
            problems.append("joint_names is empty: list the robot's joints in the model's state order")
        if not self.checkpoint and self.preset in PRESETS and not self.preset.startswith("tiny"):
            problems.append(f"checkpoint is empty: a {self.preset} with random weights must not drive a "
                            "robot (set checkpoint, or use preset tiny for a demo)")
        positive = ("max_observation_age_s", "control_period_s", "latency_budget_ms")
        for name in positive:
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("inference_rate_hz", "max_future_skew_s"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("action_topic", "joint_state_topic", "latency_topic"):
            if not getattr(self, name):
                problems.append(f"{name} is empty")
        try:
            parse_delay(self.inference_delay_steps)
        except ValueError as e:
            problems.append(f"inference_delay_steps: {e}")
        if self.camera_qos_reliability not in QOS_RELIABILITY:
            problems.append(f"camera_qos_reliability '{self.camera_qos_reliability}' is not one of "
                            f"{', '.join(QOS_RELIABILITY)}")
        if not self.camera_qos_depth >= 1:
            problems.append(f"camera_qos_depth must be >= 1, got {self.camera_qos_depth}")
        if not 1 <= self.max_image_side <= MAX_SIDE_LIMIT:
            problems.append(f"max_image_side must be in 1..{MAX_SIDE_LIMIT}, got {self.max_image_side}")
        if self.action_stream_type not in STREAM_TYPES:
            problems.append(f"action_stream_type '{self.action_stream_type}' is not one of {', '.join(STREAM_TYPES)}")
        if self.safe_action and len(self.safe_action) != len(self.outputs()):
            problems.append(f"safe_action has {len(self.safe_action)} values but there are {len(self.outputs())} "
                            "output joints")
        if not self.action_stream_deadline_s >= 0:
            problems.append(f"action_stream_deadline_s must be >= 0, got {self.action_stream_deadline_s}")
        if problems:
            raise ParamError("invalid pi_policy parameters:\n  " + "\n  ".join(problems))
        return self

    def cameras(self) -> list[tuple[str, str, bool]]:
        """(camera name, topic, compressed) for each subscribed camera."""
        return [(n, t, is_compressed_topic(t)) for n, t in zip(self.camera_names, self.camera_topics, strict=True)]

    def camera_set(self) -> CameraSet:
        """The model's cameras, the subscribed ones and the required ones (pi_policy.cameras)."""
        return CameraSet.of(self.camera_names, self.model_camera_names, self.required_cameras)

    def outputs(self) -> list[str]:
        return self.output_joint_names or self.joint_names

    def rtc_settings(self) -> RTCSettings:
        return RTCSettings(self.rtc_mode, self.execution_horizon, self.prefix_schedule, self.max_guidance_weight)

    def runner_spec(self) -> RunnerSpec:
        """The runner these parameters describe (raises ValueError for bad RTC settings; validate() lists all)."""
        return RunnerSpec(preset=self.preset, checkpoint=self.checkpoint or None, norm_stats=self.norm_stats or None,
                          tokenizer=self.tokenizer or None, prompt_format=self.prompt_format, seed=self.seed,
                          cameras=self.camera_set(), action_dim=self.action_dim or None,
                          policy_config=self.policy_config or None, action_horizon=self.action_horizon or None,
                          denoise_steps=self.denoise_steps or None, max_token_len=self.max_token_len or None,
                          discrete_state_input=state_input_value(self.discrete_state_input),
                          delta_action_mask=mask_value(self.delta_action_mask),
                          robot_conversion=conversion_value(self.robot_conversion), device=self.device,
                          backend=self.backend, engine_path=self.engine_path or None, denoise=self.denoise_backend,
                          denoise_keep_bf16=tuple(self.denoise_keep_bf16),
                          vision=self.vision_backend, fp8=FP8Options(calibration=self.fp8_calibration or None),
                          rtc=self.rtc_settings(), threads=self.threads, warmup=self.warmup,
                          batch_sizes=tuple(self.batch_sizes))


def is_compressed_topic(topic: str) -> bool:
    """A topic ending in /compressed carries sensor_msgs/CompressedImage (image_transport's naming)."""
    return topic.rstrip("/").endswith("/compressed")


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    type: str  # ROS parameter type name
    description: str


PARAMS: list[Param] = [
    Param(f.name, getattr(NodeParams(), f.name), _ROS_TYPES[f.type], f.metadata["doc"])
    for f in fields(NodeParams)
]
_BY_NAME = {p.name: p for p in PARAMS}


class ParamError(ValueError):
    pass


def _check_type(p: Param, value: Any, empty_ok: bool = False) -> Any:
    def bad(expected: str) -> ParamError:
        return ParamError(f"parameter '{p.name}' must be {expected}, got {value!r} ({type(value).__name__})")

    if p.type == "string":
        if not isinstance(value, str):
            raise bad("a string (quote it in YAML)")
    elif p.type == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif p.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif p.type == "double":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("a finite number")
    elif p.type in ("string_array", "double_array", "integer_array"):
        if p.type == "string_array" and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise bad("a list of strings")
        if p.type == "integer_array" and (not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise bad("a list of integers")
        if p.type == "double_array":
            numbers = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value)
            if not numbers:
                raise bad("a list of numbers")
            value = [float(v) for v in value]  # integers are doubles, as for a double
            if not all(math.isfinite(v) for v in value):
                raise bad("a list of finite numbers")
        if not value and not (empty_ok and p.default == []):
            raise ParamError(f"parameter '{p.name}' is an empty list, which ROS parameter files cannot hold; "
                             "leave it out to keep its default")
        value = list(value)
    return value


def params_from_dict(values: dict[str, Any], command_line: Collection[str] = ()) -> NodeParams:
    """Defaults overlaid with `values` (parameter name -> value), type-checked, then validated.

    `command_line`: the names whose values the command line set (--set): there an empty list, which a ROS
    parameter file cannot hold, is allowed where it is the default (`--set required_cameras=[]`: every camera)."""
    errors = []
    checked = {}
    for name, value in values.items():
        if name not in _BY_NAME:
            close = difflib.get_close_matches(name, _BY_NAME, n=1)
            errors.append(f"unknown parameter '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            continue
        try:
            checked[name] = _check_type(_BY_NAME[name], value, empty_ok=name in command_line)
        except ParamError as e:
            errors.append(str(e))
    if errors:
        raise ParamError("invalid pi_policy parameters:\n  " + "\n  ".join(errors))
    return NodeParams(**checked).validate()


def _flatten(prefix: str, d: dict, out: dict) -> None:
    # nested mappings under ros__parameters are dotted parameter names in ROS
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(name + ".", v, out)
        else:
            out[name] = v


def _matches(key: str, node_name: str) -> bool:
    key = key.strip()
    return key in ("/**", node_name) or key.endswith("/" + node_name)


def read_param_values(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """The values a ROS 2 parameter file (`/**:` or `<node_name>:` with `ros__parameters:`) sets, unvalidated.

    Callers that apply overrides first (eval-bag's --checkpoint, say) validate afterwards.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"cannot read parameter file {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ParamError(f"{path}: expected a mapping of node names to 'ros__parameters'")
    values: dict[str, Any] = {}
    found = False
    # wildcard sections first, so that a section naming the node wins, as in ROS
    for key in sorted(doc, key=lambda k: "*" not in str(k)):
        section = doc[key]
        if not _matches(str(key), node_name):
            continue
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
            raise ParamError(f"{path}: section '{key}' needs a 'ros__parameters' mapping")
        _flatten("", section["ros__parameters"], values)
        found = True
    if not found:
        raise ParamError(f"{path}: no section for node '{node_name}' (use '/**:' or '{node_name}:')")
    return values


def load_params_yaml(path: str | Path, node_name: str = NODE_NAME) -> NodeParams:
    """Read and validate a ROS 2 parameter file for this node."""
    values = read_param_values(path, node_name)
    try:
        return params_from_dict(values)
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
