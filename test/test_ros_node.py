"""The rclpy node end to end with the tiny model on CPU (runs where rclpy is installed: `colcon test`)."""

import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Float32MultiArray, Float64MultiArray  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from pi_policy.ros.node import PolicyNode, drain  # noqa: E402

CAMS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
JOINTS = ["j0", "j1", "j2"]


@pytest.fixture
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


def overrides(**extra):
    values = dict(preset="tiny", device="cpu", camera_names=CAMS,
                  camera_topics=[f"cam/{c}" for c in CAMS], joint_names=JOINTS, prompt="pick",
                  inference_rate_hz=20.0, max_observation_age_s=1.0, latency_budget_ms=1e6)
    values.update(extra)
    return [Parameter(k, value=v) for k, v in values.items()]


class Harness:
    """Spins the policy node and a test node that feeds inputs and records outputs."""

    def __init__(self, node):
        self.node = node
        self.io = rclpy.create_node("pi_policy_test_io")
        self.got = {"traj": [], "raw": [], "latency": []}
        self.io.create_subscription(JointTrajectory, "policy/joint_trajectory", self.got["traj"].append, 10)
        self.io.create_subscription(Float32MultiArray, "policy/action_chunk", self.got["raw"].append, 10)
        self.io.create_subscription(DiagnosticArray, "policy/latency", self.got["latency"].append, 10)
        self.cams = {c: self.io.create_publisher(Image, f"cam/{c}", qos_profile_sensor_data) for c in CAMS}
        self.joints = self.io.create_publisher(JointState, "joint_states", qos_profile_sensor_data)
        self.executor = MultiThreadedExecutor()
        self.executor.add_node(node)
        self.executor.add_node(self.io)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.spin, daemon=True)
        self.thread.start()

    def spin(self):  # as main() spins; an exception from a callback ends the thread, which the tests check
        while not self.stop.is_set():
            self.executor.spin_once(timeout_sec=0.1)

    def publish(self, encoding="rgb8", position=(2.0, 9.0, 0.0, 1.0)):
        stamp = self.io.get_clock().now().to_msg()
        for pub in self.cams.values():
            msg = Image(height=8, width=8, encoding=encoding, step=24, data=bytes([100] * 192))
            msg.header.stamp = stamp
            pub.publish(msg)
        js = JointState(name=["j2", "extra", "j0", "j1"], position=list(position))
        js.header.stamp = stamp
        self.joints.publish(js)

    def wait_for(self, predicate, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.publish()
            if predicate():
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self.stop.set()
        self.thread.join()
        assert drain(self.executor, 30.0)  # as main() ends: running callbacks finish before anything is destroyed
        self.node.destroy_node()
        self.io.destroy_node()


def test_node_serves_trajectories_and_latency(ros):
    h = Harness(PolicyNode(parameter_overrides=overrides()))
    try:
        assert h.wait_for(lambda: h.got["traj"] and any(
            a.status[0].level == DiagnosticStatus.OK for a in h.got["latency"]))
        traj = h.got["traj"][-1]
        assert list(traj.joint_names) == JOINTS and len(traj.points) > 0
        assert traj.points[0].time_from_start.nanosec == 20_000_000
        ok = next(a for a in h.got["latency"] if a.status[0].level == DiagnosticStatus.OK)
        keys = {kv.key for kv in ok.status[0].values}
        for k in ("vision_ms", "embed_prefix_ms", "prefill_ms", "denoise_ms", "total_ms", "hz",
                  "observation_age_ms", "backend_prefill"):
            assert k in keys
        assert h.got["raw"]
    finally:
        h.close()


def test_errors_and_warnings_in_turn_leave_the_node_serving(ros):
    # rclpy raises when one log call site changes severity; the node used to die at its first WARN after an ERROR
    h = Harness(PolicyNode(parameter_overrides=overrides(max_observation_age_s=0.3, latency_budget_ms=1e-3)))
    nan_joint = (2.0, 9.0, float("nan"), 1.0)
    phases = [  # (what is published, the level every tick then has, its message)
        (None, DiagnosticStatus.ERROR, "no image yet"),
        ({}, DiagnosticStatus.WARN, "over budget"),  # every inference is over a 1 us budget
        ({"position": nan_joint}, DiagnosticStatus.ERROR, "non-finite"),
        ({}, DiagnosticStatus.WARN, "over budget"),
        ({"encoding": "bayer_rggb8"}, DiagnosticStatus.ERROR, "bayer_rggb8"),
        ({}, DiagnosticStatus.WARN, "over budget"),
    ]
    try:
        for inputs, level, text in phases:
            h.got["latency"].clear()
            n = len(h.got["traj"])
            end = time.monotonic() + 60.0
            while time.monotonic() < end and not any(
                    a.status[0].level == level and text in a.status[0].message for a in h.got["latency"]):
                if inputs is not None:
                    h.publish(**inputs)
                time.sleep(0.05)
            seen = [a.status[0].message for a in h.got["latency"][-3:]]
            assert h.thread.is_alive(), "the executor died"
            assert any(a.status[0].level == level and text in a.status[0].message for a in h.got["latency"]), \
                (text, seen)
            if level == DiagnosticStatus.WARN:
                assert len(h.got["traj"]) > n, "no trajectory while inputs were good"
    finally:
        h.close()


def test_integer_for_a_double_and_unknown_parameters(ros):
    from pi_policy.node.params import ParamError
    from pi_policy.ros.params import read_parameters

    node = PolicyNode(parameter_overrides=overrides(inference_rate_hz=20, autostart=False))
    try:
        assert node.get_parameter("inference_rate_hz").value == 20.0
        assert read_parameters(node).inference_rate_hz == 20.0
    finally:
        node.destroy_node()
    node = PolicyNode(parameter_overrides=overrides(infrence_rate_hz=5.0, autostart=False))
    try:
        with pytest.raises(ParamError, match=r"unknown parameter 'infrence_rate_hz' \(did you mean "
                                             r"'inference_rate_hz'\?\)"):
            read_parameters(node)
    finally:
        node.destroy_node()
    with pytest.raises(ParamError, match=r"parameter 'control_period_s' must be a double, got 'fast' \(string\)"):
        PolicyNode(parameter_overrides=overrides(control_period_s="fast", autostart=False))


def test_action_stream_publishes_at_the_control_rate_and_stops_on_deactivate(ros):
    node = PolicyNode(parameter_overrides=overrides(action_stream_topic="policy/command", control_period_s=0.05,
                                                    safe_action=[0.0, 0.0, 0.0]))
    h = Harness(node)
    stream = []
    h.io.create_subscription(Float64MultiArray, "policy/command", stream.append, 10)
    try:
        assert h.wait_for(lambda: len(stream) >= 3)
        assert all(len(m.data) == len(JOINTS) for m in stream)
        assert h.wait_for(lambda: any("stream_sent" in {kv.key for kv in a.status[0].values}
                                      for a in h.got["latency"]))
        node.trigger_deactivate()
        time.sleep(0.5)
        n = len(stream)
        time.sleep(0.5)
        assert len(stream) == n  # stopped
    finally:
        h.close()


def test_use_sim_time_cannot_change_while_the_node_runs(ros):
    # a switched clock made every input stale: the node published nothing, silently, until it was set back
    node = PolicyNode(parameter_overrides=overrides(autostart=False))
    try:
        (result,) = node.set_parameters([Parameter("use_sim_time", value=True)])
        assert not result.successful and "use_sim_time cannot change while the node runs" in result.reason
        assert node.get_parameter("use_sim_time").value is False
        (result,) = node.set_parameters([Parameter("inference_rate_hz", value=5.0)])
        assert not result.successful  # the node's own parameters stay read-only
    finally:
        node.destroy_node()


@pytest.mark.parametrize("reliability", ["best_effort", "reliable"])
def test_camera_subscriptions_take_the_qos_parameters(ros, reliability):
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    node = PolicyNode(parameter_overrides=overrides(camera_qos_reliability=reliability, camera_qos_depth=2))
    h = Harness(node)
    if reliability == "reliable":  # a reliable subscription hears reliable publishers only
        h.cams = {c: h.io.create_publisher(Image, f"cam/{c}", QoSProfile(depth=2)) for c in CAMS}

    def subscribed(topic):
        return [i.qos_profile for i in h.io.get_subscriptions_info_by_topic(topic) if i.node_name == node.get_name()]

    try:
        assert h.wait_for(lambda: subscribed(f"/cam/{CAMS[0]}") and h.got["traj"])
        (qos,) = subscribed(f"/cam/{CAMS[0]}")
        expected = ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        assert qos.reliability == expected
        (joints,) = subscribed("/joint_states")
        assert joints.reliability == ReliabilityPolicy.BEST_EFFORT  # only the cameras change
    finally:
        h.close()


def test_a_flood_of_prompts_is_throttled_and_cut(ros, capfd):
    from std_msgs.msg import String

    node = PolicyNode(parameter_overrides=overrides())
    h = Harness(node)
    prompts = h.io.create_publisher(String, "policy/prompt", 100)
    try:
        assert h.wait_for(lambda: h.got["traj"])
        capfd.readouterr()
        long_prompt = "stack the cups " * 70_000  # about 1 MB
        for i in range(60):
            prompts.publish(String(data=long_prompt if i % 2 else f"task {i}"))
        assert h.wait_for(lambda: any(kv.value.startswith("stack the cups") for a in h.got["latency"]
                                      for kv in a.status[0].values if kv.key == "prompt"))
        time.sleep(1.0)
        lines = [line for line in capfd.readouterr().err.splitlines() if "prompt: " in line]
        assert 1 <= len(lines) <= 3, len(lines)  # one per 2 s, with the count of those held back
        assert all(len(line) < 400 for line in lines)
        shown = [kv.value for a in h.got["latency"] for kv in a.status[0].values if kv.key == "prompt"]
        assert max(len(v) for v in shown) < 300 and any("(1050000 characters)" in v for v in shown)
    finally:
        h.close()


def test_a_stop_leaves_no_unawaited_callback_coroutines(ros):
    # rclpy makes a handler coroutine for each callback it hands to its thread pool; those still queued when a stop
    # cancels them were collected unawaited ("coroutine 'Executor._make_handler.<locals>.handler' was never
    # awaited", printed at exit)
    import gc
    import warnings

    from rclpy.callback_groups import ReentrantCallbackGroup

    node = rclpy.create_node("pi_policy_drain_test")
    group = ReentrantCallbackGroup()
    for _ in range(8):
        node.create_timer(0.001, lambda: time.sleep(0.2), callback_group=group)
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    time.sleep(0.05)  # every timer is due
    for _ in range(6):  # two run, the others wait in the pool's queue
        executor.spin_once(timeout_sec=1.0)
    assert drain(executor, 10.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del executor
        node.destroy_node()
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
