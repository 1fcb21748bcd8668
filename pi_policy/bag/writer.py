"""--write-bag: what the node would have published during a replay, as a new rosbag2 (mcap or sqlite3)."""

from __future__ import annotations

from pathlib import Path

from rosbags.rosbag2 import Writer

from pi_policy.bag.demo_bag import STORAGES
from pi_policy.bag.reader import TYPESTORE
from pi_policy.bag.replay import Evaluation

TRAJECTORY_TYPE = "trajectory_msgs/msg/JointTrajectory"
DIAGNOSTICS_TYPE = "diagnostic_msgs/msg/DiagnosticArray"


def output_topics(name: str, n_passes: int, action_topic: str, latency_topic: str) -> tuple[str, str]:
    """The node's own topic names for a single pass; with several, each gets a /<pass name> namespace."""
    if n_passes == 1:
        return action_topic, latency_topic
    return f"/{name}{action_topic}", f"/{name}{latency_topic}"


def write_output_bag(ev: Evaluation, out: str | Path, action_topic: str, latency_topic: str,
                     storage: str = "mcap") -> dict[str, int]:
    """Write each pass's chunks and latency diagnostics at the times the node would have published them.

    Returns topic -> message count. The replay must have been run with keep_outputs=True.
    """
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; choose one of {sorted(STORAGES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists already; choose a new output bag directory")
    counts: dict[str, int] = {}
    with Writer(out, version=9, storage_plugin=STORAGES[storage]) as writer:
        pending = []  # (log_ns, connection, bytes), written in time order across passes
        for r in ev.replays:
            traj_topic, diag_topic = output_topics(r.name, len(ev.replays), action_topic, latency_topic)
            traj = writer.add_connection(traj_topic, TRAJECTORY_TYPE, typestore=TYPESTORE)
            diag = writer.add_connection(diag_topic, DIAGNOSTICS_TYPE, typestore=TYPESTORE)
            counts[traj_topic] = counts[diag_topic] = 0
            for o in r.outputs:
                if o.trajectory is not None:
                    pending.append((o.log_ns, traj, TYPESTORE.serialize_cdr(o.trajectory, TRAJECTORY_TYPE)))
                    counts[traj_topic] += 1
                if o.diagnostics is not None:
                    pending.append((o.log_ns, diag, TYPESTORE.serialize_cdr(o.diagnostics, DIAGNOSTICS_TYPE)))
                    counts[diag_topic] += 1
        pending.sort(key=lambda p: p[0])
        for log_ns, conn, data in pending:
            writer.write(conn, log_ns, data)
    return counts
