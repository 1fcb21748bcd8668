"""SIGINT and SIGTERM for the node's process: the first asks for an orderly stop, one much later forces the exit.

A Ctrl-C in the terminal of `ros2 launch` reaches the node twice: directly (the terminal signals the whole
process group) and again a moment later, forwarded by launch. That repeat is the same request and must not cut
the orderly stop short. A signal that comes `repeat_s` or more after the first (launch escalating to SIGTERM
after its 5 s, or an operator pressing Ctrl-C again) means the stop takes too long: the process exits at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

REPEAT_SIGNAL_S = 2.0


class StopSignals:
    """A signal handler: sets `finished` on the first stop signal; calls `exit_now(signum)` on a late repeat."""

    def __init__(self, finished: threading.Event, exit_now: Callable[[int], None],
                 repeat_s: float = REPEAT_SIGNAL_S, clock: Callable[[], float] = time.monotonic):
        self.finished, self.exit_now, self.repeat_s, self.clock = finished, exit_now, repeat_s, clock
        self.first: float | None = None

    def __call__(self, signum: int, frame=None) -> None:
        now = self.clock()
        if self.first is None:
            self.first = now
            self.finished.set()
        elif now - self.first >= self.repeat_s:
            self.exit_now(signum)

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)
