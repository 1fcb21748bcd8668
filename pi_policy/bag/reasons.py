"""Why ticks were skipped or warned: the replay's own reasons, and grouping reasons that differ only in their
numbers into counts with a real example and the first times, as the reports show them."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

NO_ACTIONS = "not scored: no recorded actions cover the chunk (past the recording or in a gap)"
BUSY = "dropped: the previous inference was still running (realtime replay)"

ByTick = dict[int, list[str]]  # tick index -> reasons


def reason_key(reason: str) -> str:
    """Group reasons that differ only in their numbers ('stale by 12 ms' and 'stale by 40 ms')."""
    return re.sub(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", "N", reason)


def skip_counts(by_tick: ByTick) -> dict[str, int]:
    """How many ticks each (number-free) reason skipped; a tick with two reasons counts for both."""
    counts = Counter(reason_key(r) for reasons in by_tick.values() for r in reasons)
    return dict(counts.most_common())


def reason_details(by_tick: ByTick, tick_times: np.ndarray, t0: float = 0.0, first: int = 3) -> dict[str, dict]:
    """skip_counts' groups, each with its count, its first real reason (numbers and all) and the times (s since
    t0) of its first few ticks: what a reader needs to find the problem in the bag."""
    details: dict[str, dict] = {}
    for i in sorted(by_tick):
        for reason in by_tick[i]:
            d = details.setdefault(reason_key(reason), {"count": 0, "example": reason, "first_s": []})
            d["count"] += 1
            if len(d["first_s"]) < first:
                d["first_s"].append(round(float(tick_times[i]) - t0, 3))
    return dict(sorted(details.items(), key=lambda kv: -kv[1]["count"]))
