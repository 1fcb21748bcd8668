"""Shared fixtures and session setup: deterministic torch, log capture, and the ROS 2 side of a test run.

Where ROS 2 is sourced, the session takes a ROS_DOMAIN_ID no other test run on this machine holds and keeps launch's
log files out of ~/.ros. With PI_POLICY_REQUIRE_ROS=1 (CI's ROS run) a test skipped because rclpy or launch could
not be imported fails the run: there the ROS tests must run, not skip.
"""

import contextlib
import logging
import os
import re
import tempfile

import pytest
import torch

_ROS_SKIP = re.compile(r"could not import '(rclpy|launch|launch_ros|launch_testing)['.]")
_ros_skips: list[str] = []


def pytest_configure(config):
    if "ROS_DOMAIN_ID" not in os.environ:
        try:
            from domain_coordinator import domain_id  # part of ROS 2's launch_testing
        except ImportError:
            domain_id = None
        if domain_id is not None:
            stack = contextlib.ExitStack()  # the ID stays reserved until the session ends
            os.environ["ROS_DOMAIN_ID"] = str(stack.enter_context(domain_id()))
            config.add_cleanup(stack.close)
    if "ROS_LOG_DIR" not in os.environ:
        log_dir = tempfile.TemporaryDirectory(prefix="pi_policy_ros_log_")
        os.environ["ROS_LOG_DIR"] = log_dir.name
        config.add_cleanup(log_dir.cleanup)


def _note_ros_skip(report) -> None:
    text = str(report.longrepr)
    if report.skipped and _ROS_SKIP.search(text):
        _ros_skips.append(f"{report.nodeid}: {text.splitlines()[-1] if text else ''}")


def pytest_collectreport(report):
    _note_ros_skip(report)


def pytest_runtest_logreport(report):
    _note_ros_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PI_POLICY_REQUIRE_ROS") == "1" and _ros_skips:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line("PI_POLICY_REQUIRE_ROS=1 but these ROS tests were skipped:", red=True)
        for line in _ros_skips:
            reporter.write_line(f"  {line}", red=True)
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def captured_log():
    """`with captured_log("pi_policy.model.x") as log: ...`, then `log.text`: what that logger said, WARNING and up.

    The handler sits on the logger itself. caplog's sits on the root logger, which sees nothing once ROS's `launch`
    is imported (launch_testing's pytest plugin imports it): loggers created afterwards do not propagate.
    """

    @contextlib.contextmanager
    def capture(name: str, level: int = logging.WARNING):
        logger, handler = logging.getLogger(name), _Records()
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(level)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)

    return capture
