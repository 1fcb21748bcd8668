"""The node process's stop signals: a repeat right after the first (launch forwarding a terminal's Ctrl-C) is the
same request; only one much later cuts the orderly stop short. Plain Python: runs without ROS."""

import signal
import threading

from pi_policy.ros.stop import REPEAT_SIGNAL_S, StopSignals


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def handler():
    finished, forced, clock = threading.Event(), [], Clock()
    return StopSignals(finished, forced.append, clock=clock), finished, forced, clock


def test_the_first_signal_asks_for_an_orderly_stop():
    stop, finished, forced, _ = handler()
    stop(signal.SIGINT)
    assert finished.is_set() and forced == []


def test_a_repeat_soon_after_is_the_same_request():
    stop, finished, forced, clock = handler()
    stop(signal.SIGINT)  # the terminal's Ctrl-C
    clock.now += 0.05
    stop(signal.SIGINT)  # the same Ctrl-C, forwarded by launch
    clock.now += REPEAT_SIGNAL_S * 0.9
    stop(signal.SIGINT)
    assert finished.is_set() and forced == []


def test_a_late_repeat_exits_at_once():
    stop, _, forced, clock = handler()
    stop(signal.SIGINT)
    clock.now += 5.0  # launch's escalation to SIGTERM after its 5 s
    stop(signal.SIGTERM)
    assert forced == [signal.SIGTERM]


def test_install_sets_both_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop, *_ = handler()
    try:
        stop.install()
        assert signal.getsignal(signal.SIGINT) is stop and signal.getsignal(signal.SIGTERM) is stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)
