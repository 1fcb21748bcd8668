"""The node's messages about its inputs: one call site per severity, throttled per message kind, never raising.

rclpy binds a `log()` call site to the first severity it sees and raises `ValueError` when that site logs another one
(humble to rolling), which killed the node at the first WARN after an ERROR. Here `info`, `warn` and `error` each
call the logger from their own line with no rclpy filters, the throttle is ours (per severity and kind, so a flood of
one camera's bad frames does not hide another camera's, nor a flood of prompts), and a logger that fails anyway
falls back to stderr.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


class ThrottledLog:
    def __init__(self, logger, period_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.period_s = period_s
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}  # messages throttled since the last one shown
        self._lock = threading.Lock()

    # Each severity calls the logger from its own line (its own lambda): rclpy's call sites are per line.
    def info(self, kind: str, message: str) -> bool:
        """Log at INFO unless one of this kind was logged less than period_s ago; True if it was logged."""
        return self._log("INFO", kind, message, lambda text: self.logger.info(text))

    def warn(self, kind: str, message: str) -> bool:
        """Log a warning unless one of this kind was logged less than period_s ago; True if it was logged."""
        return self._log("WARN", kind, message, lambda text: self.logger.warning(text))

    def error(self, kind: str, message: str) -> bool:
        """Log an error unless one of this kind was logged less than period_s ago; True if it was logged."""
        return self._log("ERROR", kind, message, lambda text: self.logger.error(text))

    def _log(self, severity: str, kind: str, message: str, emit: Callable[[str], object]) -> bool:
        text = self._admit(severity, kind, message)
        if text is None:
            return False
        try:
            emit(text)
        except Exception as e:  # noqa: BLE001 - a log call must never take the node down
            self._fallback(severity, text, e)
        return True

    def _admit(self, severity: str, kind: str, message: str) -> str | None:
        key, now = (severity, kind), self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            held = self._held.pop(key, 0)
        return f"{message} (+{held} more like this since the last)" if held else message

    @staticmethod
    def _fallback(severity: str, text: str, error: Exception) -> None:
        print(f"[{severity}] {text} (logger failed: {type(error).__name__}: {error})", file=sys.stderr, flush=True)
