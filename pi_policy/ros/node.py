"""The pi_policy ROS 2 node: thin wiring of subscriptions, timers and publishers around PolicyNodeLogic.

A lifecycle (managed) node: `configure` reads the parameters, loads the model (and the TensorRT engine) and
warms it up, capturing CUDA graphs; `activate` subscribes and starts serving; `deactivate` stops; `cleanup`
drops the model. With autostart (default) the node walks itself to active.

Threads: subscriptions run in a Reentrant callback group and only convert and store the latest message;
inference runs in its own MutuallyExclusive group, from a timer (inference_rate_hz > 0) or from a guard
condition that new frames trigger (inference_rate_hz == 0). A tick that finds inference busy is dropped.
The optional action stream has its own timer (control_period_s) and group, so inference never delays it.

Ending: SIGINT, SIGTERM and the lifecycle `shutdown` transition end the process with exit 0 (a failed autostart
with 1). rclpy's own signal handlers are off: they invalidate the context under a spinning executor. Our handler
only sets `finished`; main then stops spinning, lets running callbacks finish (bounded), and tears down in order.

Console script: pi_policy_node = pi_policy.ros.node:main
"""

from __future__ import annotations

import array
import os
import signal
import sys
import threading

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Float64MultiArray, Header, MultiArrayDimension, MultiArrayLayout, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from pi_policy.node.logic import ERROR, WARN, PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.node.params import NODE_NAME, NodeParams, ParamError
from pi_policy.ros.images import image_converter
from pi_policy.ros.log import ThrottledLog
from pi_policy.ros.params import declare_parameters, read_parameters

STOP_WAIT_S = 10.0  # how long an ending process waits for running callbacks (a configure in progress) to return


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


class _PolicyServing:
    """configure / activate / deactivate / cleanup: the serving half of the lifecycle node."""

    def _setup(self, finished: threading.Event | None) -> None:
        declare_parameters(self)
        self.finished = finished or threading.Event()  # set: the process should end (main() watches it)
        self.failed = False  # a failed autostart: exit 1
        self.log = ThrottledLog(self.get_logger())
        self.params: NodeParams | None = None
        self.logic: PolicyNodeLogic | None = None
        self.inference_group = MutuallyExclusiveCallbackGroup()
        self.input_group = ReentrantCallbackGroup()
        self._serving: list = []  # subscriptions and timers that exist only while active
        self._last_diagnostics = None
        self._guard = None
        self._tick_lock = threading.Lock()  # held while publishing; deactivate waits on it
        self._active = False

    def _configure(self) -> None:
        params = self.params = read_parameters(self)  # before torch is imported: a bad parameter fails fast

        from pi_policy.runtime import build_runner  # torch: imported only when the node is configured

        log = self.get_logger()
        log.info(f"loading {params.preset} on {params.device}, prefill backend {params.backend}")
        runner = build_runner(params.runner_spec().replace(progress=True))
        log.info(f"policy ready: cameras {runner.camera_names}, backends {runner.backends}")
        if runner.backend_note:  # a fallback (engine refused, compiler missing): say it loudly
            log.warning(runner.backend_note)
        converter_name, converter = image_converter()
        log.info(f"sensor_msgs/Image converter: {converter_name}")
        self.logic = PolicyNodeLogic.from_params(params, runner, MessageFactory(RCLPY_CLASSES), self.get_name(),
                                                 image_converter=converter, image_converter_name=converter_name)
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
                    self.log.warn(f"camera {camera}", error)
                elif (guard := self._guard) is not None:
                    try:
                        guard.trigger()
                    except Exception:  # noqa: BLE001 - destroyed by a deactivate that ran meanwhile
                        pass

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
        self._active = True
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
        with self._tick_lock:  # a tick that already started finishes; one that starts later returns at once
            self._active = False

    def _cleanup(self) -> None:
        for pub in (self.action_pub, self.raw_pub, self.latency_pub, self.diagnostics_pub, self.stream_pub):
            if pub is not None:
                destroy = getattr(self, "destroy_lifecycle_publisher", None) or self.destroy_publisher
                destroy(pub)
        self.logic = None

    # -- callbacks --

    def _on_joints(self, msg: JointState) -> None:
        logic = self.logic
        error = logic.on_joint_state(msg) if logic is not None else None
        if error:
            self.log.warn("joint state", error)

    def _on_prompt(self, msg: String) -> None:
        logic = self.logic
        error = logic.on_prompt(msg) if logic is not None else None
        if error:
            self.log.warn("prompt", error)
        else:
            self.get_logger().info(f"prompt: {msg.data!r}")

    def _tick(self, require_new: bool = False) -> None:
        with self._tick_lock:
            if not self._active:  # deactivated while this tick waited
                return
            result = self.logic.tick(self.get_clock().now().nanoseconds * 1e-9, require_new=require_new)
            if result.trajectory is not None:
                self.action_pub.publish(result.trajectory)
            if result.raw is not None and self.raw_pub is not None:
                self.raw_pub.publish(result.raw)
            if result.diagnostics is not None:
                self.latency_pub.publish(result.diagnostics)
                self._last_diagnostics = result.diagnostics
        if result.level == ERROR:
            self.log.error("tick", result.message)
        elif result.level == WARN:
            self.log.warn("tick", result.message)

    def _stream_tick(self) -> None:
        msg = self.logic.stream_tick(self.get_clock().now().nanoseconds * 1e-9)
        if msg is not None:
            self.stream_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        # /diagnostics is read by aggregators and rqt_robot_monitor at about 1 Hz, as diagnostic_updater does
        with self._tick_lock:
            if self._active and self._last_diagnostics is not None:
                self.diagnostics_pub.publish(self._last_diagnostics)


class PolicyNode(_PolicyServing, LifecycleNode):
    def __init__(self, finished: threading.Event | None = None, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self._setup(finished)
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.0, self._autostart,
                                                      callback_group=self.inference_group)

    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            # with autostart nobody will retry: exit non-zero so that launch shows the failure
            self.get_logger().fatal("autostart: configure failed; shutting down")
            self.failed = True
            self.finished.set()
        elif self.finished.is_set():
            self.get_logger().info("autostart: asked to stop while configuring; not activating")
        else:
            self.trigger_activate()

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
        self._deactivate()
        self.get_logger().info("lifecycle shutdown: the process ends")
        self.finished.set()  # finalized is final: nothing can configure this node again
        return TransitionCallbackReturn.SUCCESS


def drain(executor: MultiThreadedExecutor, timeout_s: float) -> bool:
    """Run no new callbacks and wait up to timeout_s for the running ones; True when none is left."""
    pool = getattr(executor, "_executor", None)  # rclpy's ThreadPoolExecutor; its shutdown() does not wait
    if pool is None:
        return executor.shutdown(timeout_sec=timeout_s)
    waiter = threading.Thread(target=pool.shutdown, kwargs=dict(wait=True, cancel_futures=True), daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    # only now may the executor destroy its guard condition, which a finishing callback still triggers
    executor.shutdown(timeout_sec=0)
    return not waiter.is_alive()


def main(args=None) -> int:
    finished = threading.Event()

    def on_signal(signum, frame):
        if finished.is_set():  # a second signal: the first one's orderly stop takes too long
            os._exit(0)
        finished.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = PolicyNode(finished=finished)
    except (ParamError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"pi_policy_node: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    while not finished.is_set() and node.context.ok():
        try:
            executor.spin_once(timeout_sec=0.1)  # the timeout bounds how late a signal is noticed
        except Exception as e:  # noqa: BLE001 - one failing callback must not end the node
            node.log.error("executor", f"a callback failed: {type(e).__name__}: {e}")
    code = 1 if node.failed else 0
    if not drain(executor, STOP_WAIT_S):
        print(f"pi_policy_node: a callback (configure?) still runs after {STOP_WAIT_S:.0f} s; exiting without it",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    node.destroy_node()
    rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
