"""Write a small synthetic rosbag2 (cameras, joint states, prompt, recorded actions) for demos and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

# The demo robot: one 7-joint arm. Actions are the commanded joint positions (a teleop leader arm);
# the measured joints reach each command one control period (1 / action_hz) after it is sent.
DEMO_JOINTS = ["waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper"]
EXTRA_JOINT = "camera_mount"  # published in /joint_states but not part of the policy's state
DEMO_CAMERAS = {
    "base_0_rgb": "/cam_high/image_raw",
    "left_wrist_0_rgb": "/cam_left_wrist/image_raw/compressed",
    "right_wrist_0_rgb": "/cam_right_wrist/image_raw",
}
JOINT_STATES_TOPIC = "/joint_states"
PROMPT_TOPIC = "/prompt"
ACTION_TOPIC = "/leader/joint_command"
DEMO_PROMPT = "pick up the red cube"
START_NS = 1_700_000_000 * 10**9

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


@dataclass
class DemoSpec:
    duration_s: float = 4.0
    camera_hz: float = 12.0
    joint_hz: float = 100.0
    action_hz: float = 50.0
    height: int = 96
    width: int = 128
    seed: int = 0
    joints: list[str] = field(default_factory=lambda: list(DEMO_JOINTS))


def commanded_positions(t: np.ndarray, seed: int, n_joints: int) -> np.ndarray:
    """Smooth commanded joint positions at times t (seconds from bag start): (len(t), n_joints)."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.2, 0.8, n_joints)
    freq = rng.uniform(0.2, 0.6, n_joints)
    phase = rng.uniform(0, 2 * np.pi, n_joints)
    offset = rng.uniform(-0.5, 0.5, n_joints)
    return offset + amp * np.sin(2 * np.pi * freq * np.asarray(t)[:, None] + phase)


def synthetic_frame(t: float, cam_index: int, height: int, width: int) -> np.ndarray:
    """A moving gradient with a bouncing square; different per camera. HxWx3 uint8 RGB."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (xx * 255 // max(width - 1, 1) + int(40 * t)) % 256
    img[..., 1] = (yy * 255 // max(height - 1, 1) + 60 * cam_index) % 256
    img[..., 2] = 80 + 40 * cam_index
    side = max(height // 6, 2)
    cx = int((0.5 + 0.4 * np.sin(1.3 * t + cam_index)) * (width - side))
    cy = int((0.5 + 0.4 * np.cos(0.9 * t + cam_index)) * (height - side))
    img[cy:cy + side, cx:cx + side] = (255, 30, 30)
    return img


def _stamp(typestore, ns: int):
    return typestore.types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def _header(typestore, ns: int, frame: str):
    return typestore.types["std_msgs/msg/Header"](stamp=_stamp(typestore, ns), frame_id=frame)


def write_demo_bag(out: str | Path, storage: str = "mcap", spec: DemoSpec | None = None) -> Path:
    """Write the demo bag to the directory `out` (must not exist). Returns its path."""
    spec = spec or DemoSpec()
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; choose one of {sorted(STORAGES)}")
    if spec.duration_s <= 0:
        raise ValueError(f"duration must be positive, got {spec.duration_s}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists already; choose a new output directory")
    ts = get_typestore(Stores.ROS2_HUMBLE)
    T = ts.types
    rng = np.random.default_rng(spec.seed)
    n = len(spec.joints)
    # The measured joints are published in a shuffled order with one extra joint, as real drivers do.
    js_names = [spec.joints[i] for i in rng.permutation(n)] + [EXTRA_JOINT]
    js_index = [spec.joints.index(name) for name in js_names[:-1]]

    events = []  # (log_ns, topic, typename, message)

    def add(log_ns: int, topic: str, typename: str, msg) -> None:
        events.append((log_ns, topic, typename, msg))

    add(START_NS, PROMPT_TOPIC, "std_msgs/msg/String", T["std_msgs/msg/String"](data=DEMO_PROMPT))
    dur_ns = int(spec.duration_s * 1e9)

    for cam_index, (cam, topic) in enumerate(DEMO_CAMERAS.items()):
        period_ns = int(1e9 / spec.camera_hz)
        # Cameras are not phase-locked to each other: give each its own small offset.
        for stamp_ns in range(START_NS + 7_000_000 * (cam_index + 1), START_NS + dur_ns, period_ns):
            frame = synthetic_frame((stamp_ns - START_NS) / 1e9, cam_index, spec.height, spec.width)
            header = _header(ts, stamp_ns, cam)
            log_ns = stamp_ns + int(rng.integers(2_000_000, 8_000_000))  # transport delay
            if topic.endswith("/compressed"):
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
                assert ok
                msg = T["sensor_msgs/msg/CompressedImage"](header=header, format="jpeg", data=buf.reshape(-1))
                add(log_ns, topic, "sensor_msgs/msg/CompressedImage", msg)
            else:
                msg = T["sensor_msgs/msg/Image"](
                    header=header, height=spec.height, width=spec.width, encoding="rgb8", is_bigendian=0,
                    step=spec.width * 3, data=frame.reshape(-1),
                )
                add(log_ns, topic, "sensor_msgs/msg/Image", msg)

    js_ns = np.arange(START_NS, START_NS + dur_ns, int(1e9 / spec.joint_hz))
    q = commanded_positions((js_ns - START_NS) / 1e9 - 1.0 / spec.action_hz, spec.seed, n)
    for stamp_ns, row in zip(js_ns.tolist(), q, strict=True):
        pos = np.append(row[js_index], 0.1).astype(np.float64)
        msg = T["sensor_msgs/msg/JointState"](
            header=_header(ts, stamp_ns, ""), name=js_names, position=pos,
            velocity=np.zeros(0), effort=np.zeros(0),
        )
        add(stamp_ns + 1_000_000, JOINT_STATES_TOPIC, "sensor_msgs/msg/JointState", msg)

    act_ns = np.arange(START_NS, START_NS + dur_ns, int(1e9 / spec.action_hz))
    cmd = commanded_positions((act_ns - START_NS) / 1e9, spec.seed, n)
    zero = T["builtin_interfaces/msg/Duration"](sec=0, nanosec=0)
    for stamp_ns, row in zip(act_ns.tolist(), cmd, strict=True):
        point = T["trajectory_msgs/msg/JointTrajectoryPoint"](
            positions=row.astype(np.float64), velocities=np.zeros(0), accelerations=np.zeros(0),
            effort=np.zeros(0), time_from_start=zero,
        )
        msg = T["trajectory_msgs/msg/JointTrajectory"](
            header=_header(ts, stamp_ns, ""), joint_names=list(spec.joints), points=[point],
        )
        add(stamp_ns + 500_000, ACTION_TOPIC, "trajectory_msgs/msg/JointTrajectory", msg)

    events.sort(key=lambda e: e[0])
    with Writer(out, version=9, storage_plugin=STORAGES[storage]) as writer:
        conns = {}
        for _, topic, typename, _ in events:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, typename, typestore=ts)
        for log_ns, topic, typename, msg in events:
            writer.write(conns[topic], log_ns, ts.serialize_cdr(msg, typename))
    return out


def demo_params(preset: str = "tiny", device: str = "cpu") -> dict:
    """Node parameters that replay the demo bag (what config/demo_bag.yaml holds, for the tiny preset)."""
    return {
        "preset": preset, "device": device,
        "camera_names": list(DEMO_CAMERAS), "camera_topics": list(DEMO_CAMERAS.values()),
        "joint_names": list(DEMO_JOINTS), "joint_state_topic": JOINT_STATES_TOPIC,
        "prompt": DEMO_PROMPT, "prompt_topic": PROMPT_TOPIC,
        "inference_rate_hz": 10.0, "max_observation_age_s": 0.2, "control_period_s": 0.02,
        "latency_budget_ms": 100.0,
    }
