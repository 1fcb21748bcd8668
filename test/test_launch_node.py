"""launch_testing test: launch/thor.launch.py brings up the node (tiny preset, CPU), which serves a ROS graph.

Runs where ROS 2 is installed (`colcon test` after `colcon build`: the node is started as the installed
`pi_policy_node` executable); skipped elsewhere.
"""

import tempfile
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("launch_testing")
pytest.importorskip("launch_ros")

import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import launch_testing.markers  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from pi_policy.node.params import load_params_yaml  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "thor.launch.py"
NAMESPACE = "pi_policy_launch_test"  # the node's relative topics resolve under /pi_policy_launch_test/
CAMERAS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
JOINTS = ["j0", "j1", "j2"]
PARAMS = {
    "preset": "tiny",
    "device": "cpu",
    "backend": "bf16",
    "camera_names": CAMERAS,
    "camera_topics": [f"cameras/{c}/image_raw" for c in CAMERAS],
    "joint_names": JOINTS,
    "joint_state_topic": "joint_states",
    "prompt": "pick up the cube",
    "inference_rate_hz": 10.0,
    "max_observation_age_s": 1.0,
    "action_topic": "policy/joint_trajectory",
    "latency_topic": "policy/latency",
    "latency_budget_ms": 1.0e6,  # a slow CI machine is not what this test is about
}
LATENCY_KEYS = ("vision_ms", "embed_prefix_ms", "prefill_ms", "denoise_ms", "total_ms", "hz")
TIMEOUT_S = 60.0  # model build, warm-up and the first inference on CPU


def absolute(topic: str) -> str:
    return f"/{NAMESPACE}/{topic}"


@pytest.mark.launch_test
@launch_testing.markers.keep_alive
def generate_test_description():
    # the directory lives as long as the test process (TemporaryDirectory cleans up when collected)
    param_dir = tempfile.TemporaryDirectory(prefix="pi_policy_launch_test_")
    param_file = Path(param_dir.name) / "tiny_cpu.yaml"
    param_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": PARAMS}}))
    load_params_yaml(param_file)  # a bad file fails here, with the reason, not as a silent node
    include = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
        launch_arguments={"config": str(param_file), "namespace": NAMESPACE}.items(),
    )
    return LaunchDescription([include, launch_testing.actions.ReadyToTest()]), {"param_dir": param_dir}


class TestNodeServes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.try_shutdown()

    def setUp(self):
        self.node = rclpy.create_node("pi_policy_launch_test_io")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)

    def tearDown(self):
        self.executor.shutdown()
        self.node.destroy_node()

    def publish_inputs(self, cams, joints, tick: int) -> None:
        stamp = self.node.get_clock().now().to_msg()
        for i, pub in enumerate(cams):
            msg = Image(height=8, width=8, encoding="rgb8", is_bigendian=0, step=8 * 3,
                        data=bytes([(40 * i + tick) % 256] * (8 * 8 * 3)))
            msg.header.stamp = stamp
            pub.publish(msg)
        js = JointState(name=JOINTS, position=[0.1, -0.2, 0.3])
        js.header.stamp = stamp
        joints.publish(js)

    def test_trajectory_and_latency_are_published(self):
        trajectories, latencies = [], []
        action_topic, latency_topic = absolute(PARAMS["action_topic"]), absolute(PARAMS["latency_topic"])
        self.node.create_subscription(JointTrajectory, action_topic, trajectories.append, 10)
        self.node.create_subscription(DiagnosticArray, latency_topic, latencies.append, 10)
        # the node subscribes with sensor-data QoS (best effort), so publish the same way
        cams = [self.node.create_publisher(Image, absolute(t), qos_profile_sensor_data)
                for t in PARAMS["camera_topics"]]
        joints = self.node.create_publisher(JointState, absolute(PARAMS["joint_state_topic"]),
                                            qos_profile_sensor_data)

        def has_stage_latencies(array: DiagnosticArray) -> bool:
            return any(set(LATENCY_KEYS) <= {kv.key for kv in status.values} for status in array.status)

        deadline = time.monotonic() + TIMEOUT_S
        tick = 0
        while time.monotonic() < deadline and not (trajectories and any(map(has_stage_latencies, latencies))):
            self.publish_inputs(cams, joints, tick)
            tick += 1
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                self.executor.spin_once(timeout_sec=0.01)

        messages = [s.message for a in latencies[-3:] for s in a.status]
        self.assertTrue(trajectories, f"no JointTrajectory on {action_topic} within "
                                      f"{TIMEOUT_S:.0f} s; last latency statuses: {messages}")
        self.assertTrue(any(map(has_stage_latencies, latencies)),
                        f"no latency diagnostic with {LATENCY_KEYS} on {latency_topic}; "
                        f"last statuses: {messages}")
        traj = trajectories[-1]
        self.assertEqual(list(traj.joint_names), JOINTS)
        self.assertGreater(len(traj.points), 0)
        self.assertTrue(all(len(p.positions) == len(JOINTS) for p in traj.points))


@launch_testing.post_shutdown_test()
class TestNodeShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        # the node catches the SIGINT that launch sends at shutdown and exits 0
        launch_testing.asserts.assertExitCodes(proc_info)
