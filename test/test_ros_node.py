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

from pi_policy.ros.node import PolicyNode  # noqa: E402

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
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def publish(self, encoding="rgb8"):
        stamp = self.io.get_clock().now().to_msg()
        for pub in self.cams.values():
            msg = Image(height=8, width=8, encoding=encoding, step=24, data=bytes([100] * 192))
            msg.header.stamp = stamp
            pub.publish(msg)
        js = JointState(name=["j2", "extra", "j0", "j1"], position=[2.0, 9.0, 0.0, 1.0])
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
        self.executor.shutdown()
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


def test_bad_input_is_a_diagnostic_and_the_node_keeps_serving(ros):
    h = Harness(PolicyNode(parameter_overrides=overrides(max_observation_age_s=0.3)))
    try:
        assert h.wait_for(lambda: h.got["traj"])
        h.got["latency"].clear()
        end = time.monotonic() + 5.0
        while time.monotonic() < end and not any(
                a.status[0].level == DiagnosticStatus.ERROR for a in h.got["latency"]):
            h.publish(encoding="bayer_rggb8")
            time.sleep(0.05)
        errors = [a.status[0].message for a in h.got["latency"]
                  if a.status[0].level == DiagnosticStatus.ERROR]
        assert errors and "bayer_rggb8" in " ".join(errors)
        n = len(h.got["traj"])
        assert h.wait_for(lambda: len(h.got["traj"]) > n)  # good frames again: serving again
    finally:
        h.close()


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
