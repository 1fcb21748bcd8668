"""What the ROS node decides, without ROS: inputs -> ObservationAssembler -> Policy -> output messages.

PolicyNodeLogic.from_params is the one wiring from the node's parameters to this logic; the rclpy node and
bag replay both use it, so a bag is replayed exactly as the robot would have run it.

Decisions:
- The trajectory's header stamp is the observation's stamp (the oldest input used; see node.assembler).
- Point positions = the first len(output_joint_names) action dims; no trajectory when that list is empty.
- The diagnostic's level is ERROR when the tick was skipped or inference failed (message says why), WARN when
  total_ms exceeds the latency budget, an optional camera was masked, or an input message was rejected since
  the last tick; OK otherwise. Latency keys appear only when inference ran; `image_converter` (cv_bridge or
  builtin: which one turned sensor_msgs/Image into RGB) on every status.
- A tick that finds inference still running is DROPPED (counted, no diagnostics): ticks never queue.
- The last published chunk is the one being executed. With real-time chunking on, its rest from the new
  observation's stamp on goes into the next inference, with the delay: a fixed number of control periods, or
  ceil(p95 of the recent end-to-end latency, observation stamp to publication, / control period).
- With an action stream, every chunk also goes into the ActionQueue that stream_tick reads once a period; its
  misses (chunk used up, deadline passed) are counted in the diagnostics.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pi_policy.node.action_queue import ActionQueue
from pi_policy.node.assembler import Assembled, ObservationAssembler
from pi_policy.node.compressed import DEFAULT_MAX_SIDE
from pi_policy.node.inputs import (
    MessageError,
    clip_text,
    compressed_image_to_rgb,
    header_stamp_sec,
    image_to_rgb,
    joint_state_to_vector,
)
from pi_policy.node.outputs import MessageFactory
from pi_policy.node.params import NodeParams
from pi_policy.node.rtc_state import DelayEstimator, ExecutingChunk
from pi_policy.observation import STAGES, Policy, PolicyOutput
from pi_policy.runtime.options import RTC_MODES, parse_delay

OK, WARN, ERROR, DROPPED = "OK", "WARN", "ERROR", "DROPPED"


@dataclass
class TickResult:
    level: str
    message: str
    trajectory: Any = None  # JointTrajectory, when inference ran and output joints are configured
    raw: Any = None  # Float32MultiArray, when inference ran and publish_raw
    diagnostics: Any = None  # DiagnosticArray, on every tick that was not dropped
    output: PolicyOutput | None = None
    assembled: Assembled | None = None  # the observation used, or why there was none (errors, warnings)
    input_errors: list[str] = field(default_factory=list)  # messages rejected since the last tick

    @property
    def skip_reasons(self) -> list[str]:
        """Why no chunk came out of this tick: the assembler's errors, or the failure message."""
        if self.output is not None or self.level == DROPPED:
            return []
        if self.assembled is not None and not self.assembled.ok:
            return list(self.assembled.errors)
        return [self.message]


def _ms(x: float) -> str:
    return f"{x:.2f}"


class PolicyNodeLogic:
    def __init__(
        self,
        policy: Policy,
        assembler: ObservationAssembler,
        factory: MessageFactory,
        joint_names: list[str],
        output_joint_names: list[str],
        control_period_s: float,
        latency_budget_ms: float,
        status_name: str = "pi_policy: inference",
        hardware_id: str = "",
        frame_id: str = "",
        publish_raw: bool = True,
        image_converter: Callable[..., np.ndarray] = image_to_rgb,
        image_converter_name: str = "builtin",
        rtc_mode: str = "off",
        delay_steps: int | None = None,
        stream: ActionQueue | None = None,
        stream_type: str = "float64_array",
        max_image_side: int = DEFAULT_MAX_SIDE,
    ):
        unknown = [c for c in assembler.camera_names if c not in policy.camera_names]
        if unknown:
            raise ValueError(f"cameras {unknown} are not inputs of the model ({policy.camera_names})")
        if not joint_names:
            raise ValueError("joint_names is empty: the model needs the robot state")
        for what, names in (("joint_names", joint_names), ("output_joint_names", output_joint_names)):
            if len(names) > policy.action_dim:
                raise ValueError(f"{what} has {len(names)} joints, more than the model's {policy.action_dim}")
            if len(set(names)) != len(names):
                raise ValueError(f"{what} repeats a joint: {names}")
        if not control_period_s > 0 or not latency_budget_ms > 0:
            raise ValueError("control_period_s and latency_budget_ms must be > 0")
        if rtc_mode not in RTC_MODES:
            raise ValueError(f"rtc_mode {rtc_mode!r} is not one of {', '.join(RTC_MODES)}")
        self.policy = policy
        self.assembler = assembler
        self.factory = factory
        self.joint_names = list(joint_names)
        self.output_joint_names = list(output_joint_names)
        self.control_period_s = float(control_period_s)
        self.latency_budget_ms = float(latency_budget_ms)
        self.status_name = status_name
        self.hardware_id = hardware_id
        self.frame_id = frame_id
        self.publish_raw = publish_raw
        self.image_converter = image_converter  # (sensor_msgs/Image, max side) -> RGB; the node may pass cv_bridge's
        self.image_converter_name = image_converter_name
        self.max_image_side = max_image_side  # wider or taller images are refused, compressed ones undecoded
        self.rtc_mode, self.delay_steps = rtc_mode, delay_steps  # delay_steps None: measured
        self.delay = DelayEstimator(control_period_s)
        self.executing: ExecutingChunk | None = None
        self.stream, self.stream_type = stream, stream_type
        self.counts = dict(ticks=0, inferences=0, dropped_ticks=0, skipped_ticks=0, failed_ticks=0,
                           rejected_messages=0)
        self._input_errors: dict[str, str] = {}  # source -> latest rejection, until it sends a good message
        self._busy = threading.Lock()
        self._errors_lock = threading.Lock()

    @classmethod
    def from_params(cls, params: NodeParams, policy: Policy, factory: MessageFactory, node_name: str = "pi_policy",
                    hardware_id: str | None = None, **extra) -> PolicyNodeLogic:
        """The node's parameters -> its assembler and logic: the one wiring, for the rclpy node and bag replay.

        `extra`: the remaining keyword arguments of the constructor (the rclpy node's image converter)."""
        assembler = ObservationAssembler(params.camera_set(), params.max_observation_age_s, params.max_future_skew_s,
                                         params.prompt)
        stream = None
        if params.action_stream_topic:
            stream = ActionQueue(params.control_period_s, params.safe_action or None, params.action_stream_deadline_s)
        return cls(policy, assembler, factory, params.joint_names, params.outputs(), params.control_period_s,
                   params.latency_budget_ms, status_name=f"{node_name}: inference",
                   hardware_id=params.device if hardware_id is None else hardware_id, frame_id=params.frame_id,
                   publish_raw=bool(params.raw_action_topic), rtc_mode=params.rtc_mode,
                   delay_steps=parse_delay(params.inference_delay_steps), stream=stream,
                   stream_type=params.action_stream_type, max_image_side=params.max_image_side, **extra)

    # -- inputs (subscription callbacks): convert, store, never raise --

    def _accept(self, source: str, store: Callable[[], None]) -> str | None:
        try:
            store()
        except Exception as e:  # noqa: BLE001 - any bad message becomes a diagnostic, never a crash
            text = f"{source}: {e}" if isinstance(e, MessageError) else f"{source}: {type(e).__name__}: {e}"
            with self._errors_lock:
                self._input_errors[source] = text
                self.counts["rejected_messages"] += 1
            return text
        with self._errors_lock:
            self._input_errors.pop(source, None)
        return None

    def on_image(self, camera: str, msg, compressed: bool = False) -> str | None:
        def store():
            limit = self.max_image_side
            rgb = compressed_image_to_rgb(msg, limit) if compressed else self.image_converter(msg, limit)
            self.assembler.set_image(camera, header_stamp_sec(msg), rgb)

        return self._accept(f"camera {camera}", store)

    def on_joint_state(self, msg) -> str | None:
        def store():
            self.assembler.set_joints(header_stamp_sec(msg), joint_state_to_vector(msg, self.joint_names))

        return self._accept("joint state", store)

    def on_prompt(self, msg) -> str | None:
        text = msg if isinstance(msg, str) else getattr(msg, "data", None)
        return self._accept("prompt", lambda: self.assembler.set_prompt(text))

    # -- the inference tick (timer or new-frame trigger) --

    def tick(self, now: float, require_new: bool = False) -> TickResult:
        if not self._busy.acquire(blocking=False):
            self.counts["dropped_ticks"] += 1
            return TickResult(DROPPED, "inference still running")
        try:
            if require_new and not self.assembler.has_new_data():
                return TickResult(DROPPED, "no new input since the last inference")
            self.counts["ticks"] += 1
            return self._tick(now)
        except Exception as e:  # noqa: BLE001 - last resort: the node must keep serving
            self.counts["failed_ticks"] += 1
            return self._safe_error(now, f"internal error: {type(e).__name__}: {e}")
        finally:
            self._busy.release()

    def _tick(self, now: float) -> TickResult:
        values: dict[str, str] = {}
        with self._errors_lock:
            input_errors = list(self._input_errors.values())
            self._input_errors.clear()
        assembled = self.assembler.assemble(now)
        if not assembled.ok:
            self.counts["skipped_ticks"] += 1
            reasons = assembled.errors + assembled.warnings + input_errors
            result = self._result(ERROR, "skipped: " + "; ".join(reasons), now, values)
            result.assembled, result.input_errors = assembled, input_errors
            return result
        obs = assembled.observation
        values["observation_age_ms"] = _ms(assembled.age_s * 1e3)
        start = time.perf_counter()
        try:
            output = self.policy.infer(obs, **self._continuation(obs.stamp, values))
            actions = self._check_output(output)
        except Exception as e:  # noqa: BLE001 - a failing model is reported, and the next tick tries again
            self.counts["failed_ticks"] += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            detail = f"{type(e).__name__}: {e} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
            result = self._result(ERROR, f"inference failed: {detail}", now, values)
            result.assembled, result.input_errors = assembled, input_errors
            return result
        wall_s = time.perf_counter() - start
        values["infer_wall_ms"] = _ms(wall_s * 1e3)
        self.counts["inferences"] += 1
        self.delay.add(assembled.age_s + wall_s)  # observation stamp -> chunk published
        values["e2e_ms"] = _ms((assembled.age_s + wall_s) * 1e3)
        self.executing = ExecutingChunk(obs.stamp, actions)
        lat = output.latency
        for stage in STAGES:
            values[f"{stage}_ms"] = _ms(lat.stages_ms[stage]) if stage in lat.stages_ms else "n/a"
        values["total_ms"] = _ms(lat.total_ms)
        values["hz"] = _ms(lat.hz)
        values["host_ms"] = _ms(lat.host_ms)
        for stage in STAGES:
            values[f"backend_{stage}"] = lat.backends.get(stage, "unknown")

        problems = []
        if lat.total_ms > self.latency_budget_ms:
            problems.append(f"over budget: total {lat.total_ms:.1f} ms > {self.latency_budget_ms:.1f} ms")
        problems += assembled.warnings + input_errors
        level = WARN if problems else OK
        summary = f"{lat.total_ms:.1f} ms ({lat.hz:.1f} Hz), {len(obs.images)} cameras"
        result = self._result(level, "; ".join(problems) if problems else f"ok: {summary}", now, values)
        result.output, result.assembled, result.input_errors = output, assembled, input_errors
        n = len(self.output_joint_names)
        if n:
            result.trajectory = self.factory.trajectory(actions[:, :n], self.output_joint_names, obs.stamp,
                                                        self.control_period_s, self.frame_id)
        if self.publish_raw:
            result.raw = self.factory.raw_chunk(actions)
        if self.stream is not None:
            self.stream.push(obs.stamp, actions[:, :n])
        return result

    def _continuation(self, stamp: float, values: dict[str, str]) -> dict:
        """The real-time chunking arguments of the next inference: the executing chunk's rest, and the delay."""
        if self.rtc_mode == "off" or self.executing is None:
            return {}
        rest = self.executing.remainder(stamp, self.control_period_s)
        delay = self.delay_steps if self.delay_steps is not None else self.delay.steps()
        if rest is None or delay is None:
            return {}
        values["rtc_delay_steps"] = str(delay)
        return {"prev_chunk": rest, "delay": delay}

    def stream_tick(self, now: float):
        """The action stream's message for the control period starting at `now`, or None (nothing to send)."""
        if self.stream is None:
            return None
        step = self.stream.next(now)
        if step.action is None:
            return None
        return self.factory.stream_action(self.stream_type, step.action, self.output_joint_names, now, self.frame_id)

    def _check_output(self, output: PolicyOutput) -> np.ndarray:
        actions = getattr(output, "actions", None)
        if not isinstance(actions, np.ndarray) or actions.ndim != 2 or actions.shape[0] == 0:
            desc = actions.shape if isinstance(actions, np.ndarray) else type(actions).__name__
            raise ValueError(f"policy returned actions of shape {desc}, expected (horizon, action_dim)")
        if actions.shape[1] < len(self.output_joint_names):
            raise ValueError(f"policy returned {actions.shape[1]} action dims, fewer than the "
                             f"{len(self.output_joint_names)} output joints")
        if not np.isfinite(actions).all():
            raise ValueError("policy returned non-finite actions")
        if not hasattr(output, "latency"):
            raise ValueError("policy output has no latency record")
        return actions.astype(np.float32, copy=False)

    def _result(self, level: str, message: str, now: float, values: dict[str, str]) -> TickResult:
        values = dict(values)
        values["prompt"] = clip_text(self.assembler.prompt)
        values["image_converter"] = self.image_converter_name
        values.update({k: str(v) for k, v in self.counts.items()})
        if self.stream is not None:
            values.update({k: str(v) for k, v in self.stream.counts.items()})
        status = self.factory.status(level, self.status_name, message, self.hardware_id, values)
        return TickResult(level, message, diagnostics=self.factory.diagnostics(now, [status]))

    def _safe_error(self, now: float, message: str) -> TickResult:
        try:
            return self._result(ERROR, message, now, {})
        except Exception:  # noqa: BLE001 - even the diagnostic could not be built (e.g. now is NaN)
            return TickResult(ERROR, message)
