"""Read rosbag2 directories (mcap or sqlite3) with rosbags: topics, decoded messages, recorded actions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore

from pi_policy.messages import MessageError, joint_state_to_vector

TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)


class BagError(Exception):
    """The bag cannot be evaluated at all: missing, unreadable or empty."""


@dataclass
class BagInfo:
    path: Path
    storage: str
    start_ns: int
    end_ns: int  # time of the last message
    topics: dict[str, str]  # topic -> message type
    counts: dict[str, int]

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass
class BagMessage:
    topic: str
    log_ns: int  # when the message was recorded (receive time)
    msgtype: str
    msg: object | None  # None when the bytes could not be decoded
    error: str | None = None


def _open(path: Path) -> Reader:
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags raises several types for bad metadata, db or mcap files
        raise BagError(f"cannot read bag {path}: {exc}") from None
    return reader


def inspect_bag(path: str | Path) -> BagInfo:
    """Open the bag and summarize it; raises BagError if it cannot be read or holds no messages."""
    path = Path(path)
    reader = _open(path)
    try:
        counts = {topic: info.msgcount for topic, info in reader.topics.items()}
        topics = {c.topic: c.msgtype for c in reader.connections}
        if not topics or reader.message_count == 0:
            raise BagError(f"bag {path} holds no messages")
        files = sorted(p.suffix for p in path.iterdir()) if path.is_dir() else [path.suffix]
        storage = "mcap" if ".mcap" in files else "sqlite3" if ".db3" in files else "unknown"
        # end_time is one past the last message.
        return BagInfo(path, storage, reader.start_time, reader.end_time - 1, topics, counts)
    finally:
        reader.close()


def decode(rawdata: bytes, msgtype: str) -> object:
    """Deserialize CDR bytes into a rosbags message object (attribute names as in rclpy)."""
    return TYPESTORE.deserialize_cdr(rawdata, msgtype)


def read_messages(path: str | Path, topics: Iterable[str]) -> Iterator[BagMessage]:
    """Yield the messages of `topics` in recorded order; undecodable ones come with msg=None and an error."""
    path = Path(path)
    wanted = set(topics)
    reader = _open(path)
    try:
        conns = [c for c in reader.connections if c.topic in wanted]
        if not conns:
            return
        topic = "<start>"
        try:
            for conn, log_ns, raw in reader.messages(connections=conns):
                topic = conn.topic
                try:
                    msg = decode(raw, conn.msgtype)
                except Exception as exc:  # noqa: BLE001 - any bad byte string must become a report line
                    yield BagMessage(conn.topic, log_ns, conn.msgtype, None, f"{type(exc).__name__}: {exc}")
                    continue
                yield BagMessage(conn.topic, log_ns, conn.msgtype, msg)
        except Exception as exc:  # a truncated or damaged storage file
            raise BagError(f"cannot read bag {path} after a message on {topic!r}: {exc}") from None
    finally:
        reader.close()


def stamp_ns(msg: object, log_ns: int) -> int:
    """The header stamp of a message in ns, or its log time when it has none (or a zero stamp)."""
    header = getattr(msg, "header", None)
    if header is None:
        return log_ns
    ns = int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)
    return ns if ns > 0 else log_ns


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


@dataclass
class TopicReport:
    """What went wrong on one topic while reading it."""

    messages: int = 0
    undecodable: int = 0  # CDR bytes that do not deserialize
    invalid: int = 0  # decoded, but not usable (pi_policy.messages.MessageError)
    examples: list[str] = field(default_factory=list)

    def problem(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 3 and text not in self.examples:
            self.examples.append(text)


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
            report.problem("undecodable", bm.error)
            continue
        try:
            samples = action_samples(bm, joint_names)
        except MessageError as exc:
            report.problem("invalid", str(exc))
            continue
        for i, (t, v) in enumerate(samples):
            times.append(t)
            rows.append(v)
            replace.append(i == 0 and len(samples) > 1)
    series = build_action_series(source, times, rows, replace=replace)
    if series.values.size == 0:
        series.values = np.zeros((0, len(joint_names)))
    return series, report
