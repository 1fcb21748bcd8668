"""Output messages the node publishes (trajectory, raw chunk, stream action, diagnostics), built from plain values.

Fields are given by keyword, so the same code builds rclpy's classes (the node) and a rosbags typestore's
(bag replay and --write-bag). Point k of a trajectory is reached at (k + 1) * control_period_s: action k is
the target one control period after it is commanded, and no point asks to be reached instantly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pi_policy.node.inputs import sec_to_stamp


def numpy_array(values: np.ndarray, typecode: str) -> np.ndarray:
    """How a rosbags message wants a float64[] ('d') or float32[] ('f') field."""
    return np.ascontiguousarray(values, dtype=np.float64 if typecode == "d" else np.float32).reshape(-1)


@dataclass
class MessageClasses:
    Time: type
    Duration: type
    Header: type
    JointTrajectory: type
    JointTrajectoryPoint: type
    DiagnosticArray: type
    DiagnosticStatus: type
    KeyValue: type
    Float32MultiArray: type
    MultiArrayLayout: type
    MultiArrayDimension: type
    float_array: Callable[[np.ndarray, str], Any] = numpy_array  # rclpy wants array.array instead
    Float64MultiArray: type | None = None  # the fixed-rate action stream's two message types
    JointState: type | None = None

    @classmethod
    def resolve(cls, lookup: Callable[[str], type], float_array: Callable[[np.ndarray, str], Any] = numpy_array
                ) -> MessageClasses:
        """Every class by its ROS type name (MESSAGE_TYPES), from `lookup` (an rclpy import, a rosbags typestore)."""
        return cls(**{name: lookup(ros_type) for name, ros_type in MESSAGE_TYPES.items()}, float_array=float_array)

    @classmethod
    def from_typestore(cls, typestore) -> MessageClasses:
        return cls.resolve(typestore.types.__getitem__)


MESSAGE_TYPES = {  # MessageClasses field -> ROS message type
    "Time": "builtin_interfaces/msg/Time", "Duration": "builtin_interfaces/msg/Duration",
    "Header": "std_msgs/msg/Header", "JointTrajectory": "trajectory_msgs/msg/JointTrajectory",
    "JointTrajectoryPoint": "trajectory_msgs/msg/JointTrajectoryPoint",
    "DiagnosticArray": "diagnostic_msgs/msg/DiagnosticArray",
    "DiagnosticStatus": "diagnostic_msgs/msg/DiagnosticStatus",
    "KeyValue": "diagnostic_msgs/msg/KeyValue", "Float32MultiArray": "std_msgs/msg/Float32MultiArray",
    "MultiArrayLayout": "std_msgs/msg/MultiArrayLayout", "MultiArrayDimension": "std_msgs/msg/MultiArrayDimension",
    "Float64MultiArray": "std_msgs/msg/Float64MultiArray", "JointState": "sensor_msgs/msg/JointState",
}


class MessageFactory:
    """Builds output messages with every field given by keyword, so both rclpy and rosbags classes work."""

    def __init__(self, classes: MessageClasses):
        self.c = classes

    def time(self, t: float):
        sec, nanosec = sec_to_stamp(t)
        return self.c.Time(sec=sec, nanosec=nanosec)

    def duration(self, t: float):
        sec, nanosec = sec_to_stamp(t)
        return self.c.Duration(sec=sec, nanosec=nanosec)

    def header(self, t: float, frame_id: str = ""):
        return self.c.Header(stamp=self.time(t), frame_id=frame_id)

    def trajectory(self, positions: np.ndarray, joint_names: list[str], stamp: float, control_period_s: float,
                   frame_id: str = ""):
        """positions: (steps, len(joint_names)); point k is reached at (k + 1) * control_period_s."""
        empty = self.c.float_array(np.zeros(0), "d")
        points = [
            self.c.JointTrajectoryPoint(
                positions=self.c.float_array(row, "d"),
                velocities=empty,
                accelerations=empty,
                effort=empty,
                time_from_start=self.duration((k + 1) * control_period_s),
            )
            for k, row in enumerate(positions)
        ]
        return self.c.JointTrajectory(header=self.header(stamp, frame_id), joint_names=list(joint_names),
                                      points=points)

    def raw_chunk(self, actions: np.ndarray):
        """(horizon, action_dim) -> Float32MultiArray, row-major, dims labelled 'horizon' and 'action_dim'."""
        h, a = actions.shape
        dims = [
            self.c.MultiArrayDimension(label="horizon", size=h, stride=h * a),
            self.c.MultiArrayDimension(label="action_dim", size=a, stride=a),
        ]
        return self.c.Float32MultiArray(layout=self.c.MultiArrayLayout(dim=dims, data_offset=0),
                                        data=self.c.float_array(actions, "f"))

    def stream_action(self, kind: str, action: np.ndarray, joint_names: list[str], t: float, frame_id: str = ""):
        """One action of the fixed-rate stream: Float64MultiArray ('float64_array', one value per output joint)
        or a JointState command ('joint_state': positions by joint name, stamped `t`)."""
        if kind == "joint_state":
            empty = self.c.float_array(np.zeros(0), "d")
            return self.c.JointState(header=self.header(t, frame_id), name=list(joint_names),
                                     position=self.c.float_array(action, "d"), velocity=empty, effort=empty)
        dims = [self.c.MultiArrayDimension(label="action_dim", size=len(action), stride=len(action))]
        return self.c.Float64MultiArray(layout=self.c.MultiArrayLayout(dim=dims, data_offset=0),
                                        data=self.c.float_array(action, "d"))

    def status(self, level: str, name: str, message: str, hardware_id: str, values: dict[str, str]):
        cls = self.c.DiagnosticStatus
        kv = [self.c.KeyValue(key=k, value=v) for k, v in values.items()]
        # rclpy's level is a one-byte `bytes`, rosbags' an int: take the class's own constant
        return cls(level=getattr(cls, level), name=name, message=message, hardware_id=hardware_id, values=kv)

    def diagnostics(self, t: float, statuses: list):
        return self.c.DiagnosticArray(header=self.header(t), status=list(statuses))
