"""The node's process ends with the process that started it (ros2 launch, ros2 run, a supervisor).

`ros2 launch` stopped with SIGTERM (or killed) exits at once and leaves its children running, re-parented to
init; a policy node left so would go on driving the robot with nobody to stop it. On Linux the kernel sends
this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), which the node's own handler turns into an
orderly stop; everywhere, `gone()` tells when the parent process id changed, which main's loop checks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _request_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentWatch:
    """The parent process at construction; on Linux, `signum` arrives when it dies."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.pid = os.getppid()
        self.signalled = _request_death_signal(signum)

    def gone(self) -> bool:
        """True once the parent has ended (this process was re-parented), also if it ended before we asked."""
        return os.getppid() != self.pid
