"""The fixed-rate action stream: one action per control period out of the newest chunk, for robots that take a
command every period instead of a trajectory.

A chunk observed at `stamp` commands step k at stamp + k * period (node.outputs), so at time `now` the queue sends
step floor((now - stamp) / period) of the newest chunk: a chunk that arrives 60 ms after its observation starts
at the step that is due then, not at its first. When the chunk is used up (dry) or older than the deadline, the
queue sends the configured safe action, or holds the last action it sent; every such period is a miss. Before
the first chunk and after stop() it sends nothing.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

OK, DRY, DEADLINE, WAITING, STOPPED = "ok", "dry", "deadline", "waiting", "stopped"


@dataclass
class StreamStep:
    action: np.ndarray | None  # what to send now; None: send nothing
    status: str  # OK, DRY, DEADLINE (misses), WAITING (no chunk yet) or STOPPED
    index: int = -1  # the chunk step sent (OK only)


class ActionQueue:
    def __init__(self, period_s: float, safe_action: np.ndarray | None = None, deadline_s: float = 0.0):
        if not period_s > 0 or not deadline_s >= 0:
            raise ValueError("the action stream needs period_s > 0 and deadline_s >= 0")
        self.period_s, self.deadline_s = float(period_s), float(deadline_s)
        self.safe_action = None if safe_action is None else np.asarray(safe_action, np.float64).copy()
        self.counts = {"stream_sent": 0, "stream_dry": 0, "stream_deadline_missed": 0}
        self._lock = threading.Lock()
        self._stamp = -math.inf
        self._chunk: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self.running = False

    def start(self) -> None:
        with self._lock:
            self.running = True

    def stop(self) -> None:
        """Send nothing from now on, and forget the chunk: a restart waits for a fresh one."""
        with self._lock:
            self.running = False
            self._stamp, self._chunk, self._last = -math.inf, None, None

    def push(self, stamp: float, actions: np.ndarray) -> bool:
        """Switch to a new chunk (H, A); refused while stopped, or when older than the current one."""
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or not len(actions):
            raise ValueError(f"a chunk must have shape (steps, action_dim), got {actions.shape}")
        if self.safe_action is not None and self.safe_action.shape != actions.shape[1:]:
            raise ValueError(f"safe action has {self.safe_action.size} values, chunks {actions.shape[1]}")
        with self._lock:
            if not self.running or stamp < self._stamp:
                return False
            self._stamp, self._chunk = float(stamp), actions.copy()
            return True

    def next(self, now: float) -> StreamStep:
        """The action for the control period starting at `now`."""
        with self._lock:
            if not self.running:
                return StreamStep(None, STOPPED)
            if self._chunk is None:
                return StreamStep(None, WAITING)
            elapsed = now - self._stamp
            index = max(0, int(math.floor(elapsed / self.period_s + 1e-9)))
            if self.deadline_s and elapsed > self.deadline_s:
                return self._miss(DEADLINE, "stream_deadline_missed")
            if index >= len(self._chunk):
                return self._miss(DRY, "stream_dry")
            self._last = self._chunk[index]
            self.counts["stream_sent"] += 1
            return StreamStep(self._last.copy(), OK, index)

    def _miss(self, status: str, counter: str) -> StreamStep:
        self.counts[counter] += 1
        action = self.safe_action if self.safe_action is not None else self._last
        return StreamStep(None if action is None else action.copy(), status)
