"""The pi_policy ROS 2 node: thin wiring of subscriptions, timers and publishers around PolicyNodeLogic.

A lifecycle (managed) node: `configure` reads the parameters, loads the model (and the TensorRT engine) and
warms it up, capturing CUDA graphs; `activate` subscribes and starts serving; `deactivate` stops; `cleanup`
drops the model. With autostart (default) the node walks itself to active.

Threads: subscriptions run in a Reentrant callback group and only convert and store the latest message;
inference runs in its own MutuallyExclusive group, from a timer (inference_rate_hz > 0) or from a guard
condition that new frames trigger (inference_rate_hz == 0). A tick that finds inference busy is dropped.
The optional action stream has its own timer (control_period_s) and group, so inference never delays it.

Ending: SIGINT, SIGTERM, the lifecycle `shutdown` transition and the end of the parent process (ros2 launch
stopped by SIGTERM or killed: see pi_policy.ros.parent) end the process with exit 0 (a failed autostart with 1).
rclpy's own signal handlers are off: they invalidate the context under a spinning executor. Our handler only sets
`finished`; main then stops spinning, lets running callbacks finish (bounded), tears down in order and exits
without the interpreter's slow finalization. A stop while configuring does not wait for the model load, compile
and warm-up (up to a minute on a GPU, past launch's SIGTERM timeout): nothing has been published yet, so the
process exits at once. `use_sim_time` cannot be changed while the node runs (a switched clock would make every
input stale, silently).

Console script: pi_policy_node = pi_policy.ros.node:main
"""

from __future__ import annotations

import array
import ctypes
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float32MultiArray, Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from pi_policy.node.inputs import clip_text
from pi_policy.node.logic import ERROR, WARN, PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.node.params import NODE_NAME, NodeParams, ParamError
from pi_policy.ros.images import image_converter
from pi_policy.ros.log import ThrottledLog
from pi_policy.ros.params import declare_parameters, read_parameters
from pi_policy.ros.parent import ParentWatch
from pi_policy.ros.stop import StopSignals

STOP_WAIT_S = 3.0  # how long a stopping process waits for running callbacks (a tick, a transition); under
# launch's 5 s before it escalates to SIGTERM. A configure is not waited for.


def camera_qos(params: NodeParams) -> QoSProfile:
    """The camera subscriptions' QoS: keep-last `camera_qos_depth`, volatile, best effort (default) or reliable."""
    reliability = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=params.camera_qos_depth,
                      reliability=reliability[params.camera_qos_reliability], durability=DurabilityPolicy.VOLATILE)


def _py_array(values: np.ndarray, typecode: str) -> array.array:
    # rclpy stores float64[] / float32[] fields as array.array and rejects numpy arrays
    dtype = np.float64 if typecode == "d" else np.float32
    return array.array(typecode, np.ascontiguousarray(values, dtype=dtype).tobytes())


def _message_class(name: str) -> type:
    """'std_msgs/msg/Header' -> the rclpy message class."""
    package, _, cls = name.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), cls)


RCLPY_CLASSES = MessageClasses.resolve(_message_class, _py_array)


class PolicyNode(LifecycleNode):
    """The pi_policy lifecycle node: configure loads the policy, activate serves it, deactivate and cleanup undo."""

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
        self.configuring = False  # a configure (model load, compile, warm-up) is running
        self.add_on_set_parameters_callback(self._refuse_runtime_changes)

    def _refuse_runtime_changes(self, changes) -> SetParametersResult:
        # the node's own parameters are declared read-only; rclpy's use_sim_time is not, so it is refused here
        if any(p.name == "use_sim_time" for p in changes):
            return SetParametersResult(successful=False, reason="use_sim_time cannot change while the node runs "
                                                                "(its inputs would all turn stale); restart the "
                                                                "node with the value it should use")
        return SetParametersResult(successful=True)

    def _configure(self) -> None:
        params = self.params = read_parameters(self)  # before torch is imported: a bad parameter fails fast

        from pi_policy.runtime import build_runner  # torch: imported only when the node is configured
        from pi_policy.runtime.stats import threads_text

        log = self.get_logger()
        log.info(f"loading {params.preset} on {params.device}, prefill backend {params.backend}")
        runner = build_runner(params.runner_spec().replace(progress=True))
        log.info(f"policy ready: cameras {runner.camera_names}, backends {runner.backends}, "
                 f"{threads_text(runner.threads)}")
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
        cameras_qos = camera_qos(p)
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

            self._serving.append(self.create_subscription(msg_type, topic, on_frame, cameras_qos,
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
        else:  # throttled and cut: a flood of (long) prompts must not flood the console
            self.log.info("prompt", f"prompt: {clip_text(msg.data)!r}")

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

    def __init__(self, finished: threading.Event | None = None, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self._setup(finished)
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.0, self._autostart,
                                                      callback_group=self.inference_group)

    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        configured = self.trigger_configure() == TransitionCallbackReturn.SUCCESS
        if self.finished.is_set():
            self.get_logger().info("autostart: asked to stop while configuring; not activating")
        elif not configured:
            # with autostart nobody will retry: exit non-zero so that launch shows the failure
            self.get_logger().fatal("autostart: configure failed; shutting down")
            self.failed = True
            self.finished.set()
        else:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.configuring = True
        try:
            self._configure()
        except Exception as e:  # noqa: BLE001 - a failed configure is reported, the node stays up
            self.get_logger().error(f"configure failed: {type(e).__name__}: {e}")
            return TransitionCallbackReturn.FAILURE
        finally:
            self.configuring = False
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
    _close_unstarted(executor)
    return not waiter.is_alive()


def _close_unstarted(executor) -> None:
    # rclpy makes each ready callback's handler coroutine before it runs; those a stop cancelled would be collected
    # unawaited, and Python warns "coroutine 'Executor._make_handler.<locals>.handler' was never awaited"
    for task, *_ in list(getattr(executor, "_tasks", ())):
        handler = getattr(task, "_handler", None)
        if hasattr(handler, "close") and not task.done() and not task.executing():
            handler.close()


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (the launcher is gone): nothing to say to anyone
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio, where rcutils writes the node's log lines
    except (OSError, AttributeError):
        pass


def _say(text: str) -> None:
    try:
        print(f"pi_policy_node: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _init_error(error: Exception, args: list[str] | None) -> str:
    """One line for a failed rclpy.init: what is wrong with the parameter files it names, else rcl's reason."""
    argv = list(sys.argv[1:] if args is None else args)
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--params-file"]
    for path in files:
        try:
            yaml.safe_load(Path(path).read_text())
        except OSError as e:
            return f"cannot read parameter file {path}: {e.strerror}"
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            return f"parameter file {path} is not valid YAML: {problem}{where}"
    reason = str(error).split(", at /")[0]  # rcl appends the C source locations
    return f"cannot start ROS 2: {reason}"


def run(args: list[str] | None = None) -> int:
    """The node's process: start, serve until asked to stop (or the parent is gone), tear down; the exit code."""
    parent = ParentWatch()
    finished = threading.Event()

    def exit_now(signum: int) -> None:
        _say(f"{signal.Signals(signum).name} again while stopping: exiting now")
        _flush_all()
        os._exit(0)

    StopSignals(finished, exit_now).install()
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as e:  # noqa: BLE001 - RCLError for a bad parameter file or argument: one line, exit 1
        _say(_init_error(e, args))
        return 1
    try:
        node = PolicyNode(finished=finished)
    except (ParamError, ValueError, FileNotFoundError, RuntimeError) as e:
        _say(str(e))
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    while not finished.is_set() and node.context.ok():
        try:
            executor.spin_once(timeout_sec=0.1)  # the timeout bounds how late a signal is noticed
        except Exception as e:  # noqa: BLE001 - one failing callback must not end the node
            node.log.error("executor", f"a callback failed: {type(e).__name__}: {e}")
        if parent.gone():
            finished.set()
    if parent.gone():
        node.get_logger().warning(f"the process that started this node (pid {parent.pid}) has ended; stopping")
    code = 1 if node.failed else 0
    if node.configuring:  # nothing was published yet; the model load and warm-up are not waited for
        node.get_logger().info("asked to stop while configuring: exiting without waiting for the model")
        return code
    if not drain(executor, STOP_WAIT_S):
        _say(f"a callback still runs after {STOP_WAIT_S:.0f} s; exiting without it")
        return code
    node.destroy_node()
    rclpy.try_shutdown()
    return code


def main(args: list[str] | None = None) -> int:
    """Console script pi_policy_node: run(), then exit without the interpreter's finalization.

    Finalizing torch (and CUDA) after the node has stopped takes seconds, during which the signal handlers are
    gone: launch's SIGTERM escalation would then kill the process (-15) although it had stopped cleanly."""
    code = run(args)
    _flush_all()
    os._exit(code)
