"""`ros2 launch pi_policy thor.launch.py` and `pi_policy_node` from the command line, as an operator runs them.

The launch process and the node must end together: launch stopped by SIGTERM or killed takes the node with it
(it used to keep publishing, re-parented to init); Ctrl-C while the node is still configuring ends both without
launch's escalation to SIGTERM; a node that fails makes `ros2 launch` fail; a bad parameter file or path is one
line, not a traceback. Runs where ROS 2 is sourced and the package registered (README "Verified under a real
ROS 2"); the nodes are the tiny preset on the CPU. Timeouts are generous: nothing here measures speed.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy")
pytest.importorskip("launch_ros")

PARAMS = {
    "preset": "tiny",
    "device": "cpu",
    "camera_names": ["base_0_rgb"],
    "camera_topics": ["camera/image_raw"],
    "joint_names": ["j0", "j1"],
    "inference_rate_hz": 5.0,
    "latency_budget_ms": 1.0e6,
}
START_S = 180.0  # several nodes importing torch and building the model at once on a busy 2-core CPU
END_S = 60.0


def ros2() -> str:
    path = shutil.which("ros2")
    if path is None:
        pytest.fail("ROS 2 is importable but the ros2 command is not on PATH")
    return path


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie nobody reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


class Run:
    """One command in its own session (a terminal's Ctrl-C reaches its whole process group), output collected."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0"))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = START_S) -> None:
        wait_until(lambda: text in self.text or self.proc.poll() is not None, timeout)
        assert text in self.text, f"no {text!r} within {timeout:.0f} s:\n{self.text[-3000:]}"

    def node_pid(self) -> int:
        line = next(line for line in self.lines if "process started with pid [" in line)
        return int(line.split("pid [")[1].split("]")[0])

    def finish(self, timeout: float = END_S) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def kill(self) -> None:  # cleanup after a failed test: only what this test started
        pids = [self.node_pid()] if any("process started with pid [" in line for line in self.lines) else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def files():
    with tempfile.TemporaryDirectory(prefix="pi_policy_launch_cli_") as d:
        root = Path(d)

        def write(name: str, extra: dict | None = None, text: str | None = None) -> str:
            path = root / name
            path.write_text(text if text is not None else
                            yaml.safe_dump({"/**": {"ros__parameters": {**PARAMS, **(extra or {})}}}))
            return str(path)

        # a checkpoint index that is a named pipe: reading it blocks until a writer comes, as a model load from a
        # slow or hung disk does, so the node stays in configure for as long as the test needs
        hung = root / "hung" / "model.safetensors.index.json"
        hung.parent.mkdir()
        os.mkfifo(hung)
        yield {
            "good": write("good.yaml"),
            "hung": write("hung.yaml", {"checkpoint": str(hung)}),
            "typo": write("typo.yaml", {"infrence_rate_hz": 5.0}),
            "broken": write("broken.yaml", text="/**:\n  ros__parameters:\n    preset: [tiny\n"),
            "missing": str(root / "no_such_file.yaml"),
        }


def launch(config: str, namespace: str) -> Run:
    return Run([ros2(), "launch", "pi_policy", "thor.launch.py", f"config:={config}", f"namespace:={namespace}"])


@pytest.fixture(scope="module")
def serving(files):
    """Three launches started together (one still configuring for good), each told to stop in its own way."""
    runs = {"sigterm": launch(files["good"], "cli_sigterm"), "sigkill": launch(files["good"], "cli_sigkill"),
            "configuring": launch(files["hung"], "cli_configuring")}
    yield runs
    for run in runs.values():
        run.kill()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_node_ends_with_its_launch_process(serving, how):
    run = serving["sigterm" if how == signal.SIGTERM else "sigkill"]
    run.wait_for("serving:")
    node = run.node_pid()
    os.kill(run.proc.pid, how)  # launch alone: it does not stop its children on SIGTERM, nor can it on SIGKILL
    run.finish()
    assert wait_until(lambda: not alive(node), END_S), \
        f"the node (pid {node}) still runs after its launch process ended:\n{run.text[-2000:]}"


def test_ctrl_c_while_configuring_ends_both_without_escalation(serving):
    run = serving["configuring"]
    run.wait_for("loading tiny on cpu")  # the node is in configure, its model load stuck on the pipe
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: launch and node both get SIGINT
    time.sleep(0.05)  # launch forwards it: the node's second SIGINT, a moment later, repeats the request; it is
    try:  # not "stop now" (which skipped the orderly stop and its message)
        os.kill(run.node_pid(), signal.SIGINT)
    except ProcessLookupError:  # the node has already ended
        pass
    assert run.finish() == 0, run.text[-3000:]
    text = run.text
    assert "asked to stop while configuring" in text and "process has finished cleanly" in text, text[-3000:]
    assert "escalating to 'SIGTERM'" not in text, text[-3000:]  # launch's 5 s wait was not used up
    assert "Traceback" not in text and "never awaited" not in text


def test_a_node_that_fails_fails_the_launch(files):
    run = launch(files["typo"], "cli_typo")
    try:
        assert run.finish(START_S) != 0, run.text[-3000:]
        assert "unknown parameter 'infrence_rate_hz' (did you mean 'inference_rate_hz'?)" in run.text
        assert "pi_policy_node-1 exited with code 1" in run.text
    finally:
        run.kill()


def test_a_missing_parameter_file_is_named(files):
    run = launch(files["missing"], "cli_missing")
    try:
        assert run.finish(START_S) != 0
        assert f"parameter file not found: {files['missing']}" in run.text, run.text[-3000:]
        assert "joint_names" not in run.text and "process started" not in run.text
    finally:
        run.kill()


def test_a_broken_parameter_file_is_one_line(files):
    run = Run([ros2(), "run", "pi_policy", "pi_policy_node", "--ros-args", "--params-file", files["broken"]])
    try:
        assert run.finish(START_S) == 1
        assert f"pi_policy_node: parameter file {files['broken']} is not valid YAML: " in run.text, run.text
        assert "(line 4, column 1)" in run.text and "Traceback" not in run.text
    finally:
        run.kill()
