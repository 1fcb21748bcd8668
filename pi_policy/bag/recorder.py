"""What one pass over a bag leaves behind: every tick's time, why a tick was skipped or warned, each scored chunk
beside the recorded actions it is compared with, the stage latencies, and (for --write-bag) what was published."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pi_policy.bag.metrics import Trace
from pi_policy.bag.reader import TopicReport
from pi_policy.bag.reasons import ByTick
from pi_policy.observation import STAGES, LatencyRecord


@dataclass
class Output:
    """What the node published at one tick, for --write-bag."""

    log_ns: int  # tick time plus the inference's host latency
    trajectory: object | None  # trajectory_msgs/JointTrajectory
    diagnostics: object | None  # diagnostic_msgs/DiagnosticArray


@dataclass
class Replay:
    """One pass over the bag."""

    name: str  # the pass: a backend, or a real-time chunking mode
    trace: Trace
    tick_times: np.ndarray  # (T,) every tick, seconds
    evaluated: list[int]  # indices of the scored ticks
    skipped: ByTick
    warnings: ByTick
    obs_age_s: np.ndarray  # (N,) for the scored ticks
    topics: dict[str, TopicReport]
    arrival: dict[str, list[float]]  # topic -> log times (s) of the messages read
    outputs: list[Output] = field(default_factory=list)
    stage_backends: dict[str, str] = field(default_factory=dict)  # what ran each stage, as the policy says


class ReplayRecorder:
    """Collects a pass tick by tick; `replay()` turns it into a Replay.

    Each tick is opened with `tick()`, then closed by at most one of `skip()` or `score()`; `warn()` and
    `publish()` may come with either.
    """

    def __init__(self, name: str, joint_names: list[str], horizon: int, control_period_s: float, step_offset: int):
        self.name, self.joint_names, self.horizon = name, list(joint_names), horizon
        self.control_period_s, self.step_offset = control_period_s, step_offset
        self.tick_times: list[float] = []
        self.evaluated: list[int] = []
        self.skipped: ByTick = {}
        self.warnings: ByTick = {}
        self.outputs: list[Output] = []
        self.stage_backends: dict[str, str] = {}
        self._stamps: list[float] = []
        self._ages: list[float] = []
        self._predicted: list[np.ndarray] = []
        self._recorded: list[np.ndarray] = []
        self._valid: list[np.ndarray] = []
        self._latency: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self.tick_times)

    @property
    def current(self) -> int:
        return len(self.tick_times) - 1

    def tick(self, t_s: float) -> int:
        self.tick_times.append(t_s)
        return self.current

    def skip(self, reasons: list[str]) -> None:
        self.skipped[self.current] = list(reasons)

    def warn(self, reasons: list[str]) -> None:
        if reasons:
            self.warnings[self.current] = list(reasons)

    def publish(self, output: Output) -> None:
        self.outputs.append(output)

    def score(self, stamp: float, age_s: float, chunk: np.ndarray, target: np.ndarray, valid: np.ndarray,
              latency: LatencyRecord) -> None:
        """A scored chunk: its first len(joint_names) dims against the recorded actions where `valid`."""
        self.evaluated.append(self.current)
        self._stamps.append(stamp)
        self._ages.append(age_s)
        self._predicted.append(chunk[:, :len(self.joint_names)].astype(np.float64))
        self._recorded.append(target.astype(np.float32).astype(np.float64))  # actions are float32 robot units
        self._valid.append(valid)
        self.stage_backends = self.stage_backends or dict(latency.backends)
        row = dict(latency.stages_ms) | {"total": latency.total_ms, "host": latency.host_ms}
        for key in set(self._latency) | set(row):  # a stage missing at some ticks reads NaN there
            self._latency.setdefault(key, [np.nan] * (len(self.evaluated) - 1)).append(row.get(key, np.nan))

    def trace(self) -> Trace:
        h, j = self.horizon, len(self.joint_names)
        order = [k for k in STAGES if k in self._latency] + sorted(k for k in self._latency if k not in STAGES)
        return Trace(
            backend=self.name, joint_names=list(self.joint_names), control_period_s=self.control_period_s,
            step_offset=self.step_offset, ticks=np.asarray(self.evaluated, np.int64),
            times=np.asarray(self._stamps, np.float64),
            predicted=np.asarray(self._predicted).reshape(-1, h, j),
            recorded=np.asarray(self._recorded).reshape(-1, h, j),
            valid=np.asarray(self._valid, bool).reshape(-1, h),
            latency_ms={k: np.asarray(self._latency[k], np.float64) for k in order},
        )

    def replay(self, topics: dict[str, TopicReport], arrival: dict[str, list[float]]) -> Replay:
        return Replay(self.name, self.trace(), np.asarray(self.tick_times, np.float64), self.evaluated, self.skipped,
                      self.warnings, np.asarray(self._ages, np.float64), topics, arrival, self.outputs,
                      self.stage_backends)
