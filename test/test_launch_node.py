"""launch_testing: launch/thor.launch.py brings up the node (tiny preset, CPU) and it serves a real ROS 2 graph.

What a robot integrator checks by hand, scripted: the trajectory and latency contents, every kind of bad input in
turn (the node says why on /policy/latency and serves again when good inputs return), the lifecycle transitions,
and exit code 0 when launch stops it (SIGINT). Runs under pytest (launch_testing's plugin) or
`launch_test test/test_launch_node.py` where ROS 2 is sourced and the package registered (README "Run on a
robot"); skipped elsewhere.
"""

import tempfile
import time
import unittest
import zlib
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("launch_testing")
pytest.importorskip("launch_ros")

import cv2  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import launch_testing.markers  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.time import Time  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from pi_policy.node.params import load_params_yaml  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "thor.launch.py"
NAMESPACE = "pi_policy_launch_test"  # the node's relative topics resolve under /pi_policy_launch_test/
NODE = f"/{NAMESPACE}/pi_policy_node"
CAMERAS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
TOPICS = ["cameras/base/image_raw", "cameras/left/image_raw/compressed", "cameras/right/image_raw"]
JOINTS = ["j0", "j1", "j2"]
PARAMS = {
    "preset": "tiny",
    "device": "cpu",
    "backend": "bf16",
    "camera_names": CAMERAS,
    "camera_topics": TOPICS,
    "joint_names": JOINTS,
    "joint_state_topic": "joint_states",
    "prompt": "pick up the cube",
    "inference_rate_hz": 10,  # an integer for a double, as people write it: the node takes it as 10.0
    "max_observation_age_s": 0.5,
    "control_period_s": 0.02,
    "action_topic": "policy/joint_trajectory",
    "latency_topic": "policy/latency",
    "latency_budget_ms": 1.0e6,  # a slow CI machine is not what this test is about
}
LATENCY_KEYS = ("vision_ms", "embed_prefix_ms", "prefill_ms", "denoise_ms", "total_ms", "hz", "image_converter")
TIMEOUT_S = 90.0  # model build, warm-up and the first inference on a busy 2-core CPU


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


class Inputs:
    """Publishes the three cameras (one as JPEG) and joint states; `bad` replaces one part with a broken one."""

    def __init__(self, node):
        self.node = node
        # the node subscribes with sensor-data QoS (best effort), so publish the same way
        self.raw = {c: node.create_publisher(Image, absolute(t), qos_profile_sensor_data)
                    for c, t in zip(CAMERAS, TOPICS, strict=True) if not t.endswith("/compressed")}
        self.jpeg = node.create_publisher(CompressedImage, absolute(TOPICS[1]), qos_profile_sensor_data)
        self.joints = node.create_publisher(JointState, absolute(PARAMS["joint_state_topic"]),
                                            qos_profile_sensor_data)
        pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        self.jpeg_bytes = cv2.imencode(".jpg", pixels)[1].tobytes()
        self.rgb_bytes = pixels.tobytes()
        # a PNG of a hundred bytes declaring 16384 x 16384 (a decompression bomb), and a BMP sent as JPEG
        ihdr = b"IHDR" + (16384).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
        self.bomb_bytes = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
        self.bmp_bytes = b"BM" + bytes(60)
        self.compressed = {"corrupt_jpeg": b"not a jpeg", "truncated_jpeg": self.jpeg_bytes[:len(self.jpeg_bytes) // 2],
                           "bomb": self.bomb_bytes, "bmp": self.bmp_bytes}

    def publish(self, bad: str = "", skip_camera: str = "") -> None:
        now = self.node.get_clock().now().nanoseconds
        offset_s = {"old": -5.0, "future": 5.0}.get(bad, 0.0)
        t = 0 if bad == "zero_stamp" else now + int(offset_s * 1e9)
        stamp = Time(nanoseconds=t).to_msg()
        for camera, pub in self.raw.items():
            if camera == skip_camera:
                continue
            msg = Image(height=8, width=8, encoding="rgb8", step=24, data=self.rgb_bytes)
            if camera == "base_0_rgb":
                if bad in ("bayer_rggb8", "16UC1"):
                    msg.encoding = bad
                    msg.step = 8 if bad == "bayer_rggb8" else 16
                    msg.data = bytes(8 * msg.step)
                elif bad == "short_buffer":
                    msg.data = self.rgb_bytes[:100]
            msg.header.stamp = stamp
            pub.publish(msg)
        jpeg = CompressedImage(format="jpeg", data=self.compressed.get(bad, self.jpeg_bytes))
        jpeg.header.stamp = stamp
        self.jpeg.publish(jpeg)
        position = {"nan_joint": [0.1, float("nan"), 0.3]}.get(bad, [0.1, -0.2, 0.3])
        names = JOINTS[:2] + ["other"] if bad == "missing_joint" else JOINTS
        js = JointState(name=names, position=position)
        js.header.stamp = stamp
        self.joints.publish(js)


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
        self.trajectories, self.latencies = [], []
        self.node.create_subscription(JointTrajectory, absolute(PARAMS["action_topic"]), self.trajectories.append,
                                      10)
        self.node.create_subscription(DiagnosticArray, absolute(PARAMS["latency_topic"]), self.latencies.append, 10)
        self.inputs = Inputs(self.node)

    def tearDown(self):
        self.executor.shutdown()
        self.node.destroy_node()

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.01)

    def feed_until(self, done, timeout: float = TIMEOUT_S, **inputs) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.inputs.publish(**inputs)
            self.spin_for(0.05)
            if done():
                return True
        return False

    def statuses(self):
        return [s for a in self.latencies for s in a.status]

    def last_messages(self) -> list[str]:
        return [s.message for s in self.statuses()[-3:]]

    def serving_again(self) -> None:
        n = len(self.trajectories)
        self.assertTrue(self.feed_until(lambda: len(self.trajectories) > n + 1),
                        f"no new trajectory after good inputs returned; last statuses: {self.last_messages()}")

    def call(self, srv_type, name: str, request):
        client = self.node.create_client(srv_type, f"{NODE}/{name}")
        try:
            self.assertTrue(client.wait_for_service(timeout_sec=30.0), f"no service {NODE}/{name}")
            future = client.call_async(request)
            self.executor.spin_until_future_complete(future, timeout_sec=TIMEOUT_S)
            self.assertTrue(future.done(), f"{NODE}/{name} did not answer")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def transition(self, transition_id: int, expected_state: str) -> None:
        response = self.call(ChangeState, "change_state", ChangeState.Request(
            transition=Transition(id=transition_id)))
        self.assertTrue(response.success, f"transition {transition_id} failed")
        state = self.call(GetState, "get_state", GetState.Request()).current_state.label
        self.assertEqual(state, expected_state)

    def test_1_trajectory_and_latency_contents(self):
        def has_all_keys():
            return any(set(LATENCY_KEYS) <= {kv.key for kv in s.values} for s in self.statuses())

        self.assertTrue(self.feed_until(lambda: len(self.trajectories) >= 2 and has_all_keys()),
                        f"no trajectory and full latency status within {TIMEOUT_S:.0f} s; "
                        f"last statuses: {self.last_messages()}")
        traj = self.trajectories[-1]
        self.assertEqual(list(traj.joint_names), JOINTS)
        self.assertEqual(len(traj.points), 50)  # the tiny preset's horizon
        for k, point in enumerate(traj.points):
            self.assertEqual(len(point.positions), len(JOINTS))
            self.assertTrue(np.isfinite(point.positions).all())
            t = point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
            self.assertAlmostEqual(t, (k + 1) * PARAMS["control_period_s"], places=6)
        stamp = traj.header.stamp.sec + traj.header.stamp.nanosec * 1e-9
        self.assertLess(abs(time.time() - stamp), 5.0)  # the stamp of the inputs it answers
        status = next(s for s in reversed(self.statuses()) if set(LATENCY_KEYS) <= {kv.key for kv in s.values})
        self.assertEqual(status.level, DiagnosticStatus.OK, status.message)
        values = {kv.key: kv.value for kv in status.values}
        self.assertIn(values["image_converter"], ("cv_bridge", "builtin"))
        self.assertGreater(float(values["total_ms"]), 0.0)
        self.assertEqual(values["prompt"], PARAMS["prompt"])

    def test_2_every_bad_input_in_turn_then_serving_again(self):
        self.assertTrue(self.feed_until(lambda: self.trajectories), "the node never served")
        cases = [  # README "Run on a robot": the bad inputs that must never stop the node
            (dict(bad="bayer_rggb8"), "unknown image encoding 'bayer_rggb8'"),
            (dict(bad="16UC1"), "16UC1 is a depth encoding"),
            (dict(bad="short_buffer"), "needs 192 bytes, got 100"),
            (dict(bad="corrupt_jpeg"), "cannot decode compressed image"),
            (dict(bad="truncated_jpeg"), "cannot decode compressed image (jpeg): 8x8 JPEG: "),
            (dict(bad="bomb"), "is 16384x16384, larger than max_image_side 4096"),
            (dict(bad="bmp"), "BMP data; accepted formats: JPEG, PNG"),
            (dict(bad="nan_joint"), "non-finite positions for: j1"),
            (dict(bad="missing_joint"), "missing joints: j2"),
            (dict(bad="old"), "is stale by"),
            (dict(bad="future"), "in the future"),
            (dict(bad="zero_stamp"), "zero stamp"),
            (dict(skip_camera="right_wrist_0_rgb"), "camera right_wrist_0_rgb is stale"),  # a camera stops
        ]
        for inputs, text in cases:
            with self.subTest(text):
                self.latencies.clear()
                self.assertTrue(self.feed_until(lambda text=text: any(text in s.message for s in self.statuses()),
                                                timeout=30.0, **inputs),
                                f"no diagnostic saying {text!r}; last statuses: {self.last_messages()}")
                self.serving_again()

    def test_3_lifecycle_transitions(self):
        self.assertTrue(self.feed_until(lambda: self.trajectories), "the node never served")
        self.transition(Transition.TRANSITION_DEACTIVATE, "inactive")
        self.spin_for(0.5)  # a tick that was running may still land
        n = len(self.trajectories)
        self.feed_until(lambda: False, timeout=1.5)
        self.assertEqual(len(self.trajectories), n, "an inactive node published")
        self.transition(Transition.TRANSITION_CLEANUP, "unconfigured")
        self.transition(Transition.TRANSITION_CONFIGURE, "inactive")  # loads the model again
        self.transition(Transition.TRANSITION_ACTIVATE, "active")
        self.serving_again()


@launch_testing.post_shutdown_test()
class TestNodeShutdown(unittest.TestCase):
    def test_exit_code_and_clean_output(self, proc_info, proc_output):
        # launch ends the node with SIGINT: exit 0, without a traceback or rclpy's "never retrieved" noise, and the
        # bad frames were reported in the node's log only, not by the image decoders on stderr
        launch_testing.asserts.assertExitCodes(proc_info)
        text = "".join(out.text.decode(errors="replace") for proc in proc_output.processes()
                       for out in proc_output[proc])
        for noise in ("Traceback", "never retrieved", "never awaited", "Logger severity cannot be changed",
                      "Corrupt JPEG data", "Premature end of JPEG", "[ WARN:"):
            self.assertNotIn(noise, text)
