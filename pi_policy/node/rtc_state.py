"""What the node remembers for real-time chunking: the chunk the robot is executing, and how many control periods
pass between an observation and its chunk reaching the robot (the delay the next chunk must cover).

Chunk step k of a chunk observed at `stamp` is commanded at stamp + k * control period (and reached one period
later, see node.outputs); between steps the robot moves linearly, as joint_trajectory_controller interpolates
positions-only points.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


def sample_chunk(actions: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """actions (H, A) at fractional step positions (n,) in [0, H - 1], linearly interpolated: (n, A), float32 or
    float64 as the actions are."""
    steps = np.asarray(steps, np.float64)
    lo = np.clip(np.floor(steps).astype(np.int64), 0, len(actions) - 1)
    hi = np.minimum(lo + 1, len(actions) - 1)
    frac = (steps - lo)[:, None]
    a = np.asarray(actions)
    out = a[lo].astype(np.float64) * (1.0 - frac) + a[hi].astype(np.float64) * frac
    return out.astype(np.result_type(a.dtype, np.float32))


@dataclass
class ExecutingChunk:
    """A published chunk, robot units: the plan the robot follows until the next one arrives."""

    stamp: float  # observation stamp: step k is commanded at stamp + k * period
    actions: np.ndarray  # (H, A)

    def remainder(self, stamp: float, period_s: float) -> np.ndarray | None:
        """The plan at stamp + j * period for j = 0, 1, ... while it lasts: what a chunk observed at `stamp` should
        continue, row j aligned with its step j. None when nothing is left (or `stamp` is older than this chunk)."""
        offset = (stamp - self.stamp) / period_s
        last = len(self.actions) - 1
        if offset < -1e-9 or offset > last + 1e-9:
            return None
        n = int(math.floor(last - offset + 1e-9)) + 1
        return sample_chunk(self.actions, np.clip(offset + np.arange(n), 0, last))


class DelayEstimator:
    """The delay in control periods: ceil(percentile of the recent end-to-end latencies / control period).

    End to end is from an observation's stamp to its chunk being published (observation age + inference), the
    time during which the robot keeps executing the previous chunk. A high percentile, so that the frozen prefix
    covers the late chunks too.
    """

    def __init__(self, period_s: float, window: int = 50, percentile: float = 95.0):
        if not period_s > 0 or window < 1 or not 0 < percentile <= 100:
            raise ValueError("DelayEstimator needs period_s > 0, window >= 1 and 0 < percentile <= 100")
        self.period_s, self.percentile = float(period_s), float(percentile)
        self.latencies: deque[float] = deque(maxlen=window)

    def add(self, latency_s: float) -> None:
        if math.isfinite(latency_s) and latency_s >= 0:
            self.latencies.append(float(latency_s))

    def latency_s(self) -> float | None:
        return float(np.percentile(self.latencies, self.percentile)) if self.latencies else None

    def steps(self) -> int | None:
        """The delay in whole control periods; None before the first measurement."""
        latency = self.latency_s()
        return None if latency is None else int(math.ceil(latency / self.period_s - 1e-9))
