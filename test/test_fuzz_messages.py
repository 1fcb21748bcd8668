"""Thousands of malformed messages: conversion raises only MessageError, the node logic never raises."""

import cv2
import numpy as np
from rosbags.typesys import Stores, get_typestore

from pi_policy.cameras import CameraSet
from pi_policy.node.assembler import ObservationAssembler
from pi_policy.node.inputs import (
    SUPPORTED_ENCODINGS,
    MessageError,
    compressed_image_to_rgb,
    image_to_rgb,
    joint_state_to_vector,
    stamp_to_sec,
)
from pi_policy.node.logic import PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.observation import STAGES, LatencyRecord, PolicyOutput

TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
CAMS = ["a", "b"]
JOINTS = ["j0", "j1", "j2"]
ENCODINGS = [*SUPPORTED_ENCODINGS, "16UC1", "32FC1", "bayer_rggb8", "", "RGB8", "rgb8 ", None, 3]
N = 3000


class Policy:
    camera_names = CAMS
    horizon = 4
    action_dim = 6

    def __init__(self, rng):
        self.rng = rng

    def infer(self, obs):
        roll = self.rng.random()
        if roll < 0.1:
            raise RuntimeError("model exploded")
        shape = (4, 6) if roll < 0.8 else tuple(self.rng.integers(0, 7, self.rng.integers(0, 3)))
        actions = self.rng.normal(size=shape).astype(np.float32)
        if self.rng.random() < 0.05 and actions.size:
            actions.flat[0] = np.nan
        return PolicyOutput(actions, LatencyRecord(dict.fromkeys(STAGES, float(self.rng.uniform(0, 20)))))


def pick(rng, options):
    return options[rng.integers(len(options))]


def junk(rng):
    return pick(rng, [None, -1, 2**40, 1.5, "x", [], np.nan, b"\x00"])


def stamp(rng, now):
    Time = T["builtin_interfaces/msg/Time"]
    roll = rng.random()
    if roll < 0.6:
        t = now - rng.uniform(-0.05, 0.3)
        return Time(sec=int(t), nanosec=int((t % 1) * 1e9))
    if roll < 0.7:
        return Time(sec=0, nanosec=0)
    if roll < 0.8:
        return None
    return Time(sec=junk(rng) if rng.random() < 0.5 else int(rng.integers(-2**31, 2**31)),
                nanosec=junk(rng) if rng.random() < 0.5 else int(rng.integers(-10, 2 * 10**9)))


def header(rng, now):
    return T["std_msgs/msg/Header"](stamp=stamp(rng, now), frame_id="") if rng.random() > 0.02 else None


def image(rng, now):
    h, w = (int(x) for x in rng.integers(0, 7, 2))
    encoding = pick(rng, ENCODINGS)
    ch = {"rgb8": 3, "bgr8": 3, "8UC3": 3, "rgba8": 4, "bgra8": 4, "mono16": 2, "yuv422": 2, "yuv422_yuy2": 2}
    step = w * ch.get(encoding, 1) + int(rng.integers(0, 3))
    n = step * h + (int(rng.integers(-3, 4)) if rng.random() < 0.3 else 0)
    data = rng.integers(0, 256, max(n, 0), dtype=np.uint8)
    msg = T["sensor_msgs/msg/Image"](header=header(rng, now), height=h, width=w, encoding=encoding,
                                     is_bigendian=int(rng.integers(0, 2)), step=step, data=data)
    if rng.random() < 0.3:
        field = pick(rng, ["height", "width", "step", "is_bigendian", "data", "encoding"])
        value = pick(rng, [junk(rng), data.astype(np.float32), list(data[:5]), bytes(data), [-1, 999]])
        setattr(msg, field, value)
    return msg


def compressed(rng, now):
    rgb = rng.integers(0, 256, (int(rng.integers(1, 6)), int(rng.integers(1, 6)), 3), dtype=np.uint8)
    data = cv2.imencode(pick(rng, [".png", ".jpg"]), rgb)[1].reshape(-1)
    roll = rng.random()
    if roll < 0.3:
        data = data[: int(rng.integers(0, data.size))]
    elif roll < 0.5:
        data = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)
    elif roll < 0.55:
        data = junk(rng)
    fmt = pick(rng, ["jpeg", "png", "", "16UC1; compressedDepth", None])
    return T["sensor_msgs/msg/CompressedImage"](header=header(rng, now), format=fmt, data=data)


def joint_state(rng, now):
    names = list(rng.permutation(JOINTS + ["x", "y"])[: int(rng.integers(0, 6))])
    positions = rng.normal(size=max(0, len(names) + (int(rng.integers(-1, 2)) if rng.random() < 0.2 else 0)))
    if rng.random() < 0.2 and positions.size:
        positions[rng.integers(positions.size)] = pick(rng, [np.nan, np.inf, -np.inf])
    msg = T["sensor_msgs/msg/JointState"](header=header(rng, now), name=names, position=positions,
                                          velocity=np.zeros(0), effort=np.zeros(0))
    if rng.random() < 0.1:
        setattr(msg, pick(rng, ["name", "position"]), pick(rng, [junk(rng), ["j0", 3], "j0"]))
    return msg


def test_conversions_raise_only_message_error():
    rng = np.random.default_rng(1234)
    ok = bad = 0
    for _ in range(N):
        kind = rng.integers(4)
        try:
            if kind == 0:
                out = image_to_rgb(image(rng, 100.0))
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            elif kind == 1:
                out = compressed_image_to_rgb(compressed(rng, 100.0))
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            elif kind == 2:
                out = joint_state_to_vector(joint_state(rng, 100.0), JOINTS)
                assert out.shape == (3,) and np.isfinite(out).all()
            else:
                stamp_to_sec(stamp(rng, 100.0))
            ok += 1
        except MessageError as e:
            assert str(e)
            bad += 1
    assert ok > N // 10 and bad > N // 10  # the fuzzer exercises both paths


def test_node_logic_never_raises():
    rng = np.random.default_rng(99)
    assembler = ObservationAssembler(CameraSet.of(CAMS, CAMS, ["a"]), max_age_s=0.2, max_future_s=0.02)
    logic = PolicyNodeLogic(Policy(rng), assembler, MessageFactory(MessageClasses.from_typestore(TS)), JOINTS,
                            JOINTS[:2], control_period_s=0.02, latency_budget_ms=10.0)
    levels = set()
    now = 100.0
    for i in range(N):
        now += 0.01
        roll = rng.random()
        if roll < 0.35:
            err = logic.on_image(pick(rng, [*CAMS, "zzz"]), image(rng, now))
        elif roll < 0.5:
            err = logic.on_image(pick(rng, CAMS), compressed(rng, now), compressed=True)
        elif roll < 0.75:
            err = logic.on_joint_state(joint_state(rng, now))
        elif roll < 0.8:
            err = logic.on_prompt(pick(rng, ["pick", "", None, 3, T["std_msgs/msg/String"](data="go")]))
        else:
            err = None
            t = pick(rng, [now, now, now, float("nan"), -1.0])
            r = logic.tick(t, require_new=bool(i % 2))
            levels.add(r.level)
            assert r.level in ("OK", "WARN", "ERROR", "DROPPED")
            assert r.message
            if r.level != "DROPPED" and np.isfinite(t):
                assert r.diagnostics is not None
        assert err is None or isinstance(err, str)
    assert {"ERROR", "WARN"} <= levels
    assert logic.counts["inferences"] > 0 and logic.counts["rejected_messages"] > 0
