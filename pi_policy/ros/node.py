"""The pi_policy ROS 2 node: thin wiring of subscriptions, timers and publishers around PolicyNodeLogic.

A lifecycle (managed) node: `configure` reads the parameters, loads the model (and the TensorRT engine) and
warms it up, capturing CUDA graphs; `activate` subscribes and starts serving; `deactivate` stops; `cleanup`
drops the model. With autostart (default) the node walks itself to active.

Threads: subscriptions run in a Reentrant callback group and only convert and store the latest message;
inference runs in its own MutuallyExclusive group, from a timer (inference_rate_hz > 0) or from a guard
condition that new frames trigger (inference_rate_hz == 0). A tick that finds inference busy is dropped.
The optional action stream has its own timer (control_period_s) and group, so inference never delays it.

Console script: pi_policy_node = pi_policy.ros.node:main
"""

from __future__ import annotations

import array

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import LoggingSeverity
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Float64MultiArray, Header, MultiArrayDimension, MultiArrayLayout, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from pi_policy.node.logic import ERROR, WARN, PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.node.params import NODE_NAME, PARAMS, NodeParams, ParamError, params_from_dict

_PARAM_TYPES = {
    "string": Parameter.Type.STRING,
    "integer": Parameter.Type.INTEGER,
    "double": Parameter.Type.DOUBLE,
    "bool": Parameter.Type.BOOL,
    "string_array": Parameter.Type.STRING_ARRAY,
    "double_array": Parameter.Type.DOUBLE_ARRAY,
}


def _py_array(values: np.ndarray, typecode: str) -> array.array:
    # rclpy stores float64[] / float32[] fields as array.array and rejects numpy arrays
    dtype = np.float64 if typecode == "d" else np.float32
    return array.array(typecode, np.ascontiguousarray(values, dtype=dtype).tobytes())


RCLPY_CLASSES = MessageClasses(
    Time=Time, Duration=Duration, Header=Header, JointTrajectory=JointTrajectory,
    JointTrajectoryPoint=JointTrajectoryPoint, DiagnosticArray=DiagnosticArray,
    DiagnosticStatus=DiagnosticStatus, KeyValue=KeyValue, Float32MultiArray=Float32MultiArray,
    MultiArrayLayout=MultiArrayLayout, MultiArrayDimension=MultiArrayDimension, float_array=_py_array,
    Float64MultiArray=Float64MultiArray, JointState=JointState,
)


def declare_parameters(node: Node) -> None:
    for p in PARAMS:
        # an empty list default cannot carry its type in rclpy, so those are declared typed but unset
        value = _PARAM_TYPES[p.type] if p.default == [] else p.default
        node.declare_parameter(p.name, value, ParameterDescriptor(description=p.description, read_only=True))


def read_parameters(node: Node) -> NodeParams:
    values = {}
    for p in PARAMS:
        try:
            value = node.get_parameter(p.name).value
        except ParameterUninitializedException:
            continue
        values[p.name] = list(value) if p.type.endswith("_array") else value
    return params_from_dict(values)


class _PolicyServing:
    """configure / activate / deactivate / cleanup: the serving half of the lifecycle node."""

    def _setup(self) -> None:
        declare_parameters(self)
        self.params: NodeParams | None = None
        self.logic: PolicyNodeLogic | None = None
        self.inference_group = MutuallyExclusiveCallbackGroup()
        self.input_group = ReentrantCallbackGroup()
        self._serving: list = []  # subscriptions and timers that exist only while active
        self._last_diagnostics = None
        self._guard = None

    def _configure(self) -> None:
        from pi_policy.runtime import build_runner  # torch: imported only when the node is configured

        params = self.params = read_parameters(self)
        log = self.get_logger()
        log.info(f"loading {params.preset} on {params.device}, prefill backend {params.backend}")
        runner = build_runner(**params.runner_kwargs(), progress=True)
        log.info(f"policy ready: cameras {runner.camera_names}, backends {getattr(runner, 'backends', {})}")
        if getattr(runner, "backend_note", ""):  # a fallback (engine refused, compiler missing): say it loudly
            log.warning(runner.backend_note)
        self.logic = PolicyNodeLogic.from_params(params, runner, MessageFactory(RCLPY_CLASSES), self.get_name())
        make = getattr(self, "create_lifecycle_publisher", None) or self.create_publisher
        latest = QoSProfile(depth=1)
        self.action_pub = make(JointTrajectory, params.action_topic, latest)
        self.raw_pub = None
        if params.raw_action_topic:
            self.raw_pub = make(Float32MultiArray, params.raw_action_topic, latest)
        self.latency_pub = make(DiagnosticArray, params.latency_topic, 10)
        self.diagnostics_pub = make(DiagnosticArray, "/diagnostics", 10)
        self.stream_pub = None
        if params.action_stream_topic:
            kind = JointState if params.action_stream_type == "joint_state" else Float64MultiArray
            self.stream_pub = make(kind, params.action_stream_topic, latest)

    def _activate(self) -> None:
        p, logic = self.params, self.logic
        for camera, topic, compressed in p.cameras():
            msg_type = CompressedImage if compressed else Image

            def on_frame(msg, camera=camera, compressed=compressed):
                error = logic.on_image(camera, msg, compressed)
                if error:
                    self._log(WARN, error)
                elif self._guard is not None:
                    self._guard.trigger()

            self._serving.append(self.create_subscription(msg_type, topic, on_frame, qos_profile_sensor_data,
                                                          callback_group=self.input_group))
        inputs = self.input_group
        self._serving.append(self.create_subscription(JointState, p.joint_state_topic, self._on_joints,
                                                      qos_profile_sensor_data, callback_group=inputs))
        self._serving.append(self.create_subscription(String, p.prompt_topic, self._on_prompt,
                                                      QoSProfile(depth=1), callback_group=inputs))
        if p.inference_rate_hz > 0:
            self._serving.append(self.create_timer(1.0 / p.inference_rate_hz, self._tick,
                                                   callback_group=self.inference_group))
        else:
            self._guard = self.create_guard_condition(lambda: self._tick(require_new=True),
                                                      callback_group=self.inference_group)
        self._serving.append(self.create_timer(1.0, self._publish_diagnostics, callback_group=inputs))
        if self.stream_pub is not None:
            logic.stream.start()
            self._serving.append(self.create_timer(p.control_period_s, self._stream_tick,
                                                   callback_group=MutuallyExclusiveCallbackGroup()))
        self.get_logger().info(f"serving: {len(p.camera_names)} cameras -> {p.action_topic}, "
                               f"latency on {p.latency_topic}")

    def _deactivate(self) -> None:
        if self.logic is not None and self.logic.stream is not None:
            self.logic.stream.stop()  # first: an inference finishing now cannot restart the stream
        for entity in self._serving:
            if hasattr(entity, "cancel"):
                entity.cancel()
                self.destroy_timer(entity)
            else:
                self.destroy_subscription(entity)
        self._serving = []
        if self._guard is not None:
            self.destroy_guard_condition(self._guard)
            self._guard = None

    def _cleanup(self) -> None:
        for pub in (self.action_pub, self.raw_pub, self.latency_pub, self.diagnostics_pub, self.stream_pub):
            if pub is not None:
                destroy = getattr(self, "destroy_lifecycle_publisher", None) or self.destroy_publisher
                destroy(pub)
        self.logic = None

    # -- callbacks --

    def _on_joints(self, msg: JointState) -> None:
        error = self.logic.on_joint_state(msg)
        if error:
            self._log(WARN, error)

    def _on_prompt(self, msg: String) -> None:
        error = self.logic.on_prompt(msg)
        if error:
            self._log(WARN, error)
        else:
            self.get_logger().info(f"prompt: {msg.data!r}")

    def _tick(self, require_new: bool = False) -> None:
        result = self.logic.tick(self.get_clock().now().nanoseconds * 1e-9, require_new=require_new)
        if result.trajectory is not None:
            self.action_pub.publish(result.trajectory)
        if result.raw is not None and self.raw_pub is not None:
            self.raw_pub.publish(result.raw)
        if result.diagnostics is not None:
            self.latency_pub.publish(result.diagnostics)
            self._last_diagnostics = result.diagnostics
        if result.level in (WARN, ERROR):
            self._log(result.level, result.message)

    def _stream_tick(self) -> None:
        msg = self.logic.stream_tick(self.get_clock().now().nanoseconds * 1e-9)
        if msg is not None:
            self.stream_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        # /diagnostics is read by aggregators and rqt_robot_monitor at about 1 Hz, as diagnostic_updater does
        if self._last_diagnostics is not None:
            self.diagnostics_pub.publish(self._last_diagnostics)

    def _log(self, level: str, message: str) -> None:
        severity = LoggingSeverity.ERROR if level == ERROR else LoggingSeverity.WARN
        self.get_logger().log(message, severity, throttle_duration_sec=2.0)


class PolicyNode(_PolicyServing, LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self._setup()
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.0, self._autostart,
                                                      callback_group=self.inference_group)

    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()
        else:  # with autostart nobody will retry: exit non-zero so that launch shows the failure
            self.get_logger().fatal("autostart: configure failed; shutting down")
            self.autostart_failed = True
            rclpy.try_shutdown(context=self.context)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # noqa: BLE001 - a failed configure is reported, the node stays up
            self.get_logger().error(f"configure failed: {type(e).__name__}: {e}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._activate()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.logic is not None:
            self._deactivate()
        return TransitionCallbackReturn.SUCCESS


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = PolicyNode()
    except (ParamError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"pi_policy_node: {e}")
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()  # no inference callback may publish on a destroyed publisher
        node.destroy_node()
        rclpy.try_shutdown()
    return 1 if getattr(node, "autostart_failed", False) else 0


if __name__ == "__main__":
    raise SystemExit(main())
