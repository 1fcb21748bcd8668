"""launch_testing: how a launched node process ends, by exit code and output (tiny preset, CPU).

Five nodes start together, each in its own namespace: SIGTERM while serving, the lifecycle `shutdown` transition,
SIGINT while still configuring (exit 0 each, with no traceback and no rclpy "never retrieved" noise), and two bad
parameter files (exit 1 with a one-line reason). SIGINT while serving is test_launch_node.py's ending.
"""

import os
import signal
import tempfile
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
from launch import LaunchDescription  # noqa: E402
from launch_ros.actions import Node  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402

PARAMS = {
    "preset": "tiny",
    "device": "cpu",
    "camera_names": ["base_0_rgb"],
    "camera_topics": ["camera/image_raw"],
    "joint_names": ["j0", "j1"],
    "inference_rate_hz": 10.0,
    "latency_budget_ms": 1.0e6,
}
CASES = {  # namespace -> parameters that differ from PARAMS
    "sigterm": {},
    "lifecycle": {},
    "configuring": {},
    "typo": {"infrence_rate_hz": 5.0},
    "badtype": {"control_period_s": "fast"},
}
TIMEOUT_S = 90.0  # five nodes starting at once on a busy 2-core CPU


@pytest.mark.launch_test
@launch_testing.markers.keep_alive
def generate_test_description():
    param_dir = tempfile.TemporaryDirectory(prefix="pi_policy_shutdown_test_")
    nodes = {}
    for ns, extra in CASES.items():
        path = Path(param_dir.name) / f"{ns}.yaml"
        path.write_text(yaml.safe_dump({"/**": {"ros__parameters": {**PARAMS, **extra}}}))
        nodes[ns] = Node(package="pi_policy", executable="pi_policy_node", name="pi_policy_node", namespace=ns,
                         parameters=[str(path)], output="screen", additional_env={"PYTHONUNBUFFERED": "1"})
    return LaunchDescription([*nodes.values(), launch_testing.actions.ReadyToTest()]), {
        "param_dir": param_dir, **nodes}


class TestEnding(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.try_shutdown()

    def test_sigterm_while_serving(self, proc_output, proc_info, sigterm):
        proc_output.assertWaitFor("serving:", process=sigterm, timeout=TIMEOUT_S)
        os.kill(proc_info[sigterm].pid, signal.SIGTERM)
        proc_info.assertWaitForShutdown(process=sigterm, timeout=30)

    def test_0_sigint_while_configuring(self, proc_output, proc_info, configuring):  # first: still configuring
        proc_output.assertWaitFor("loading tiny on cpu", process=configuring, timeout=TIMEOUT_S)
        os.kill(proc_info[configuring].pid, signal.SIGINT)
        proc_info.assertWaitForShutdown(process=configuring, timeout=30)

    def test_lifecycle_shutdown_ends_the_process(self, proc_output, proc_info, lifecycle):
        proc_output.assertWaitFor("serving:", process=lifecycle, timeout=TIMEOUT_S)
        node = rclpy.create_node("pi_policy_shutdown_test_io")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            client = node.create_client(ChangeState, "/lifecycle/pi_policy_node/change_state")
            self.assertTrue(client.wait_for_service(timeout_sec=30.0))
            future = client.call_async(ChangeState.Request(
                transition=Transition(id=Transition.TRANSITION_ACTIVE_SHUTDOWN)))
            executor.spin_until_future_complete(future, timeout_sec=30.0)
            self.assertTrue(future.done() and future.result().success)
        finally:
            executor.shutdown()
            node.destroy_node()
        proc_info.assertWaitForShutdown(process=lifecycle, timeout=30)

    def test_bad_parameter_files_end_with_one_line(self, proc_info, typo, badtype):
        proc_info.assertWaitForShutdown(process=typo, timeout=TIMEOUT_S)
        proc_info.assertWaitForShutdown(process=badtype, timeout=TIMEOUT_S)


@launch_testing.post_shutdown_test()
class TestExitCodes(unittest.TestCase):
    def output(self, proc_output, process) -> str:
        return "".join(out.text.decode(errors="replace") for out in proc_output[process])

    def test_clean_endings_exit_0(self, proc_info, proc_output, sigterm, lifecycle, configuring):
        for process in (sigterm, lifecycle, configuring):
            launch_testing.asserts.assertExitCodes(proc_info, [0], process=process)
            text = self.output(proc_output, process)
            for noise in ("Traceback", "never retrieved", "never awaited", "RCLError"):
                self.assertNotIn(noise, text)
        self.assertIn("lifecycle shutdown: the process ends", self.output(proc_output, lifecycle))
        # configure finishes and the node does not activate, or the process ends without waiting for it
        self.assertRegex(self.output(proc_output, configuring),
                         r"asked to stop while configuring(; not activating|: exiting without waiting)")

    def test_bad_parameters_exit_1_with_the_reason(self, proc_info, proc_output, typo, badtype):
        launch_testing.asserts.assertExitCodes(proc_info, [1], process=typo)
        launch_testing.asserts.assertExitCodes(proc_info, [1], process=badtype)
        self.assertIn("unknown parameter 'infrence_rate_hz' (did you mean 'inference_rate_hz'?)",
                      self.output(proc_output, typo))
        text = self.output(proc_output, badtype)
        self.assertIn("parameter 'control_period_s' must be a double, got 'fast' (string)", text)
        self.assertNotIn("Traceback", text)

