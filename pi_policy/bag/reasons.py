"""Why ticks were skipped or warned: the replay's own reasons, and grouping reasons that differ only in their
numbers into counts with a real example and the first times, as the reports show them."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

NO_ACTIONS = "not scored: no recorded actions cover the chunk (past the recording or in a gap)"
BUSY = "dropped: the previous inference was still running"

ByTick = dict[int, list[str]]  # tick index -> reasons


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def reason_key(reason: str) -> str:
    """Group reasons that differ only in their numbers ('stale by 12 ms' and 'stale by 40 ms')."""
    return NUMBER.sub("N", reason)


def magnitude(reason: str) -> float:
    """A reason's first number ('stale by 1300 ms' -> 1300): how bad it was; -inf without a number."""
    found = NUMBER.search(reason)
    return abs(float(found.group())) if found else float("-inf")


def skip_counts(by_tick: ByTick) -> dict[str, int]:
    """How many ticks each (number-free) reason skipped; a tick with two reasons counts for both."""
    counts = Counter(reason_key(r) for reasons in by_tick.values() for r in reasons)
    return dict(counts.most_common())


def reason_details(by_tick: ByTick, tick_times: np.ndarray, t0: float = 0.0, first: int = 3) -> dict[str, dict]:
    """skip_counts' groups, each with its count, its first real reason (numbers and all), its worst (the largest
    first number: 'stale by 1300 ms' rather than the first tick's 'stale by 30 ms') and the times (s since t0) of
    its first few ticks: what a reader needs to find the problem in the bag."""
    details: dict[str, dict] = {}
    for i in sorted(by_tick):
        for reason in by_tick[i]:
            d = details.setdefault(reason_key(reason), {"count": 0, "example": reason, "worst": reason, "first_s": []})
            d["count"] += 1
            if magnitude(reason) > magnitude(d["worst"]):
                d["worst"] = reason
            if len(d["first_s"]) < first:
                d["first_s"].append(round(float(tick_times[i]) - t0, 3))
    return dict(sorted(details.items(), key=lambda kv: -kv[1]["count"]))
