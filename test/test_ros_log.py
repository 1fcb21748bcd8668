"""The node's throttled logging: per severity and kind, a count of what was held back, never raising."""

import pytest

from pi_policy.ros.log import ThrottledLog


class Recorder:
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(("INFO", text))

    def warning(self, text):
        self.lines.append(("WARN", text))

    def error(self, text):
        self.lines.append(("ERROR", text))


def test_throttled_per_severity_and_kind_with_a_count():
    now = [0.0]
    rec = Recorder()
    log = ThrottledLog(rec, period_s=2.0, clock=lambda: now[0])
    assert log.error("tick", "skipped: no image yet")
    assert log.warn("camera a", "bad encoding")
    assert log.warn("camera b", "bad encoding")  # another camera is not hidden by the first
    assert not log.warn("camera a", "bad encoding")
    assert not log.warn("camera a", "bad encoding")
    assert log.warn("tick", "over budget")  # the same kind at another severity is its own stream
    now[0] = 2.5
    assert log.warn("camera a", "bad encoding")
    assert rec.lines == [("ERROR", "skipped: no image yet"), ("WARN", "bad encoding"), ("WARN", "bad encoding"),
                         ("WARN", "over budget"), ("WARN", "bad encoding (+2 more like this since the last)")]


def test_info_is_throttled_like_the_rest():
    now = [0.0]
    rec = Recorder()
    log = ThrottledLog(rec, period_s=2.0, clock=lambda: now[0])
    shown = [log.info("prompt", f"prompt: 'task {i}'") for i in range(50)]
    assert shown == [True] + [False] * 49
    assert log.warn("prompt", "prompt must be a string")  # a rejected prompt is its own stream
    now[0] = 3.0
    assert log.info("prompt", "prompt: 'task 50'")
    assert rec.lines == [("INFO", "prompt: 'task 0'"), ("WARN", "prompt must be a string"),
                         ("INFO", "prompt: 'task 50' (+49 more like this since the last)")]


def test_a_failing_logger_goes_to_stderr_instead_of_raising(capsys):
    class Broken:
        def warning(self, text):
            raise ValueError("Logger severity cannot be changed between calls.")

        error = warning

    log = ThrottledLog(Broken())
    assert log.error("tick", "first") and log.warn("tick", "second")
    err = capsys.readouterr().err
    assert "[ERROR] first" in err and "[WARN] second" in err and "ValueError" in err


def test_rclpy_logger_takes_errors_and_warnings_in_turn():
    rclpy_logging = pytest.importorskip("rclpy.logging")
    logger = rclpy_logging.get_logger("pi_policy_log_test")
    # what the node did before: one throttled call site for both severities, which rclpy refuses
    def old_style(severity):
        logger.log("x", severity, throttle_duration_sec=0.0)

    old_style(rclpy_logging.LoggingSeverity.ERROR)
    with pytest.raises(ValueError, match="severity cannot be changed"):
        old_style(rclpy_logging.LoggingSeverity.WARN)
    log = ThrottledLog(logger, period_s=0.0)
    for _ in range(2):
        assert log.error("tick", "an error") and log.warn("tick", "a warning")
