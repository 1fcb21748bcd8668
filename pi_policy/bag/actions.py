"""Recorded actions as a time series: from an action topic or from future joint positions, gaps found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pi_policy.bag.reader import BagMessage, TopicReport, read_messages, stamp_ns
from pi_policy.node.inputs import MessageError, joint_state_to_vector


@dataclass
class ActionSeries:
    """Recorded actions as a time series in the configured joint order, sampled by linear interpolation.

    A sample is valid only inside the recording and where the two samples around it are at most
    `max_gap_s` apart, so a dropped stretch of the recording never counts as a target.
    """

    source: str
    times: np.ndarray  # (N,) seconds, increasing
    values: np.ndarray  # (N, J)
    max_gap_s: float
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, end) seconds

    def sample(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values at times t: ((len(t), J) float64, valid (len(t),) bool). Invalid rows are zero."""
        t = np.asarray(t, np.float64)
        n_joints = self.values.shape[1] if self.values.ndim == 2 else 0
        out = np.zeros((len(t), n_joints))
        if len(self.times) < 2:
            return out, np.zeros(len(t), bool)
        right = np.clip(np.searchsorted(self.times, t, side="left"), 1, len(self.times) - 1)
        span = self.times[right] - self.times[right - 1]
        valid = (t >= self.times[0]) & (t <= self.times[-1]) & (span <= self.max_gap_s)
        for j in range(n_joints):
            out[:, j] = np.interp(t, self.times, self.values[:, j])
        out[~valid] = 0.0
        return out, valid


def find_gaps(times: np.ndarray, factor: float = 3.0, min_gap_s: float = 0.0) -> tuple[float, list[tuple]]:
    """Median period of a sorted time series and the stretches longer than factor x that period."""
    if len(times) < 3:
        return float("inf"), []
    dt = np.diff(times)
    period = float(np.median(dt))
    limit = max(factor * period, min_gap_s)
    return period, [(float(times[i]), float(times[i + 1])) for i in np.nonzero(dt > limit)[0]]


def build_action_series(source: str, times: list[float], rows: list[np.ndarray], gap_factor: float = 5.0,
                        replace: list[bool] | None = None) -> ActionSeries:
    """Sort samples by time; where `replace[i]` is set, sample i drops earlier-sent samples at or after it.

    `replace` carries trajectory-controller semantics: a new multi-point trajectory replaces the rest
    of the previous one.
    """
    if replace is not None and any(replace):
        kept_t: list[float] = []
        kept_v: list[np.ndarray] = []
        for t, v, rep in zip(times, rows, replace, strict=True):
            while rep and kept_t and kept_t[-1] >= t:
                kept_t.pop()
                kept_v.pop()
            kept_t.append(t)
            kept_v.append(v)
        times, rows = kept_t, kept_v
    order = np.argsort(np.asarray(times, np.float64), kind="stable")
    t = np.asarray(times, np.float64)[order]
    v = np.asarray(rows, np.float64)[order] if rows else np.zeros((0, 0))
    # Duplicate stamps would make interpolation ill-defined: keep the last recorded sample for each.
    if len(t):
        last = np.append(np.diff(t) > 0, True)
        t, v = t[last], v[last]
    period, gaps = find_gaps(t, gap_factor)
    return ActionSeries(source, t, v, gap_factor * period if np.isfinite(period) else 0.0, gaps)


ACTION_TYPES = ("trajectory_msgs/msg/JointTrajectory", "sensor_msgs/msg/JointState",
                "std_msgs/msg/Float32MultiArray", "std_msgs/msg/Float64MultiArray")


def action_samples(bm: BagMessage, joint_names: list[str]) -> list[tuple[float, np.ndarray]]:
    """Samples (time s, joint vector in joint_names order) carried by one recorded action message.

    JointTrajectory and JointState are matched by joint name (with the node's joint state mapping);
    a multi-array's first len(joint_names) values are taken in order, at the message's log time.
    """
    msg = bm.msg
    if bm.msgtype == "sensor_msgs/msg/JointState":
        return [(stamp_ns(msg, bm.log_ns) / 1e9, joint_state_to_vector(msg, joint_names))]
    if bm.msgtype == "trajectory_msgs/msg/JointTrajectory":
        if not msg.points:
            raise MessageError("joint trajectory has no points")
        t0 = stamp_ns(msg, bm.log_ns) / 1e9
        names = list(msg.joint_names)
        return [(t0 + p.time_from_start.sec + p.time_from_start.nanosec * 1e-9,
                 joint_state_to_vector(SimpleNamespace(name=names, position=p.positions), joint_names))
                for p in msg.points]
    if bm.msgtype in ACTION_TYPES:
        data = np.asarray(msg.data, np.float64)
        if data.size < len(joint_names):
            raise MessageError(f"action array has {data.size} values, need {len(joint_names)} (one per joint)")
        if not np.isfinite(data[: len(joint_names)]).all():
            raise MessageError("action array has non-finite values")
        return [(bm.log_ns / 1e9, data[: len(joint_names)].astype(np.float32))]
    raise MessageError(f"unsupported action message type {bm.msgtype}; use one of {', '.join(ACTION_TYPES)}")


def load_action_series(bag: str | Path, topic: str, source: str,
                       joint_names: list[str]) -> tuple[ActionSeries, TopicReport]:
    """The recorded actions on `topic` as a time series in joint_names order, and what could not be read."""
    report = TopicReport()
    times: list[float] = []
    rows: list[np.ndarray] = []
    replace: list[bool] = []
    for bm in read_messages(bag, [topic]):
        report.messages += 1
        if bm.msg is None:
            report.problem("undecodable", bm.error, bm.log_ns / 1e9)
            continue
        try:
            samples = action_samples(bm, joint_names)
        except MessageError as exc:
            report.problem("invalid", str(exc), bm.log_ns / 1e9)
            continue
        for i, (t, v) in enumerate(samples):
            times.append(t)
            rows.append(v)
            replace.append(i == 0 and len(samples) > 1)
    series = build_action_series(source, times, rows, replace=replace)
    if series.values.size == 0:
        series.values = np.zeros((0, len(joint_names)))
    return series, report
