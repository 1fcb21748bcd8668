"""Read rosbag2 directories (mcap or sqlite3) with rosbags: what a bag holds, and its decoded messages in order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore

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
class TopicReport:
    """What went wrong on one topic while reading it."""

    messages: int = 0
    undecodable: int = 0  # CDR bytes that do not deserialize
    invalid: int = 0  # decoded, but not usable (pi_policy.node.inputs.MessageError)
    examples: list[str] = field(default_factory=list)
    first_s: list[float] = field(default_factory=list)  # log times (s) of the first few problems

    def problem(self, kind: str, text: str, log_s: float | None = None) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 3 and text not in self.examples:
            self.examples.append(text)
        if log_s is not None and len(self.first_s) < 5:
            self.first_s.append(log_s)
