"""How many CPU threads PyTorch computes with: a setting (`threads`, `--threads`), 0 meaning a count that stays fast
when other programs share the cores.

PyTorch's intra-op threads wait for each other at every operation; when another process holds a core, one of them
is descheduled and the others spin until it returns. On a 2-core machine with two busy processes beside it, the
tiny model took 3.9 s per inference with 2 threads and 0.13 s with 1. So the default leaves most cores to the
rest of the machine: a quarter of the usable cores, 1 to 4.
"""

from __future__ import annotations

import os

AUTO_MAX = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    """`threads` when > 0; 0 (auto): a quarter of the usable cores, at least 1, at most AUTO_MAX."""
    if threads > 0:
        return threads
    return max(1, min(AUTO_MAX, usable_cores() // 4))


def apply_threads(threads: int) -> int:
    """Set PyTorch's intra-op thread count (threads that first run torch after this take it too); returns it."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
