"""PolicyNodeLogic with real ROS 2 message types from the rosbags typestore and a fake policy."""

import threading

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from pi_policy.cameras import CameraSet
from pi_policy.node.assembler import ObservationAssembler
from pi_policy.node.inputs import sec_to_stamp, stamp_to_sec
from pi_policy.node.logic import PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.observation import STAGES, LatencyRecord, PolicyOutput

TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
Status = T["diagnostic_msgs/msg/DiagnosticStatus"]
FACTORY = MessageFactory(MessageClasses.from_typestore(TS))
CAMS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
JOINTS = ["j0", "j1", "j2", "j3"]
OUT_JOINTS = ["j0", "j1", "j2"]
LATENCY_KEYS = [f"{s}_ms" for s in STAGES] + ["total_ms", "hz", "host_ms", "observation_age_ms",
                                              "infer_wall_ms"]
BACKEND_KEYS = [f"backend_{s}" for s in STAGES]
COUNT_KEYS = ["ticks", "inferences", "dropped_ticks", "skipped_ticks", "failed_ticks", "rejected_messages"]


class FakePolicy:
    camera_names = CAMS
    horizon = 5
    action_dim = 8

    def __init__(self, stage_ms=(1.0, 2.0, 3.0, 4.0)):
        self.stage_ms = stage_ms
        self.calls = []
        self.fail = None
        self.actions = None

    def infer(self, obs):
        self.calls.append(obs)
        if self.fail is not None:
            raise self.fail
        actions = self.actions
        if actions is None:
            actions = np.arange(self.horizon * self.action_dim, dtype=np.float32).reshape(self.horizon, -1)
        lat = LatencyRecord(dict(zip(STAGES, self.stage_ms, strict=True)), host_ms=11.0,
                            backends={"vision": "bf16", "embed_prefix": "bf16", "prefill": "tensorrt",
                                      "denoise": "bf16"})
        return PolicyOutput(actions, lat)


def header(t):
    sec, nanosec = sec_to_stamp(t)
    stamp = T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
    return T["std_msgs/msg/Header"](stamp=stamp, frame_id="")


def image_msg(t, encoding="rgb8", h=4, w=6, data=None):
    n = h * w * 3
    data = np.full(n, 7, np.uint8) if data is None else data
    return T["sensor_msgs/msg/Image"](header=header(t), height=h, width=w, encoding=encoding, is_bigendian=0,
                                      step=w * 3, data=data)


def joint_msg(t, names=("j3", "extra", "j1", "j0", "j2"), positions=(3.0, 9.0, 1.0, 0.0, 2.0)):
    return T["sensor_msgs/msg/JointState"](header=header(t), name=list(names),
                                           position=np.asarray(positions, np.float64),
                                           velocity=np.zeros(0), effort=np.zeros(0))


def make(policy=None, required=None, budget_ms=50.0, publish_raw=True, out=OUT_JOINTS):
    policy = policy or FakePolicy()
    assembler = ObservationAssembler(CameraSet.of(CAMS, CAMS, required), max_age_s=0.1, max_future_s=0.02,
                                     prompt="fold the towel")
    logic = PolicyNodeLogic(policy, assembler, FACTORY, JOINTS, out,
                            control_period_s=0.02, latency_budget_ms=budget_ms, hardware_id="thor",
                            frame_id="base_link", publish_raw=publish_raw)
    return logic, policy


def feed(logic, t=100.0, cams=CAMS, joints=True):
    for c in cams:
        assert logic.on_image(c, image_msg(t)) is None
    if joints:
        assert logic.on_joint_state(joint_msg(t - 0.01)) is None


def status_of(result):
    assert result.diagnostics is not None
    (status,) = result.diagnostics.status
    return status, {kv.key: kv.value for kv in status.values}


def test_ok_tick_builds_trajectory_raw_chunk_and_every_key():
    logic, policy = make()
    feed(logic)
    r = logic.tick(100.03)
    assert r.level == "OK", r.message
    obs = policy.calls[0]
    np.testing.assert_array_equal(obs.state, [0.0, 1.0, 2.0, 3.0])  # by name, extra joint ignored
    assert obs.stamp == pytest.approx(99.99) and obs.prompt == "fold the towel"

    traj = r.trajectory
    assert traj.__msgtype__ == "trajectory_msgs/msg/JointTrajectory"
    assert traj.joint_names == OUT_JOINTS
    assert stamp_to_sec(traj.header.stamp) == pytest.approx(99.99)
    assert traj.header.frame_id == "base_link"
    assert len(traj.points) == policy.horizon
    for k, p in enumerate(traj.points):
        assert stamp_to_sec(p.time_from_start) == pytest.approx((k + 1) * 0.02)
        np.testing.assert_array_equal(p.positions, np.arange(8 * k, 8 * k + 3))
        assert p.positions.dtype == np.float64

    raw = r.raw
    assert [(d.label, d.size, d.stride) for d in raw.layout.dim] == [("horizon", 5, 40), ("action_dim", 8, 8)]
    np.testing.assert_array_equal(raw.data, np.arange(40))
    assert raw.data.dtype == np.float32

    status, kv = status_of(r)
    assert status.level == Status.OK and status.hardware_id == "thor"
    assert status.message.startswith("ok: 10.0 ms")
    for key in LATENCY_KEYS + BACKEND_KEYS + COUNT_KEYS + ["prompt"]:
        assert key in kv, key
    assert kv["vision_ms"] == "1.00" and kv["embed_prefix_ms"] == "2.00"
    assert kv["prefill_ms"] == "3.00" and kv["denoise_ms"] == "4.00"
    assert kv["total_ms"] == "10.00" and kv["hz"] == "100.00" and kv["host_ms"] == "11.00"
    assert kv["observation_age_ms"] == "40.00"
    assert kv["backend_prefill"] == "tensorrt" and kv["backend_vision"] == "bf16"
    assert kv["inferences"] == "1" and kv["ticks"] == "1" and kv["prompt"] == "fold the towel"
    assert stamp_to_sec(r.diagnostics.header.stamp) == pytest.approx(100.03)


def test_diagnostics_serialize_as_ros2_messages():
    logic, _ = make()
    feed(logic)
    r = logic.tick(100.0)
    for msg in (r.trajectory, r.raw, r.diagnostics):
        raw = TS.serialize_cdr(msg, msg.__msgtype__)
        assert TS.deserialize_cdr(raw, msg.__msgtype__).__msgtype__ == msg.__msgtype__


def test_over_budget_warns():
    logic, _ = make(budget_ms=5.0)
    feed(logic)
    r = logic.tick(100.0)
    status, kv = status_of(r)
    assert r.level == "WARN" and status.level == Status.WARN
    assert "over budget: total 10.0 ms > 5.0 ms" in status.message
    assert r.trajectory is not None and kv["total_ms"] == "10.00"


def test_no_output_joints_and_no_raw():
    logic, _ = make(out=[], publish_raw=False)
    feed(logic)
    r = logic.tick(100.0)
    assert r.level == "OK" and r.trajectory is None and r.raw is None


def test_prompt_changes_live():
    logic, policy = make()
    feed(logic)
    assert logic.on_prompt(T["std_msgs/msg/String"](data="stack the cups")) is None
    logic.tick(100.0)
    assert policy.calls[-1].prompt == "stack the cups"
    assert logic.on_prompt(T["std_msgs/msg/String"](data=None)) is not None


def expect_error(r, *fragments):
    status, kv = status_of(r)
    assert r.level == "ERROR" and status.level == Status.ERROR
    assert r.trajectory is None and r.raw is None
    for f in fragments:
        assert f in status.message, (f, status.message)
    assert "total_ms" not in kv
    return status, kv


def test_missing_camera_skips_with_error():
    logic, policy = make()
    feed(logic, cams=CAMS[:2])
    r = logic.tick(100.0)
    _, kv = expect_error(r, "skipped", "no image yet from camera right_wrist_0_rgb")
    assert kv["skipped_ticks"] == "1" and not policy.calls


def test_optional_camera_missing_warns_and_runs():
    logic, policy = make(required=CAMS[:1])
    feed(logic, cams=CAMS[:1])
    r = logic.tick(100.0)
    assert r.level == "WARN" and "left_wrist_0_rgb" in r.message
    assert set(policy.calls[0].images) == {"base_0_rgb"}
    assert r.trajectory is not None


@pytest.mark.parametrize(
    ("stamp", "fragment"),
    [(99.0, "stale"), (101.0, "in the future"), (0.0, "zero stamp")],
)
def test_past_and_future_stamps(stamp, fragment):
    logic, _ = make()
    feed(logic)
    logic.on_image("base_0_rgb", image_msg(stamp))
    expect_error(logic.tick(100.0), "camera base_0_rgb", fragment)


def test_stale_joint_state():
    logic, _ = make()
    feed(logic)
    logic.on_joint_state(joint_msg(99.5))
    expect_error(logic.tick(100.0), "joint state is stale")


@pytest.mark.parametrize(
    ("msg", "fragment"),
    [
        (image_msg(100.0, encoding="bayer_grbg8"), "unknown image encoding 'bayer_grbg8'"),
        (image_msg(100.0, data=np.zeros(5, np.uint8)), "needs 72 bytes, got 5"),
        (image_msg(100.0, h=0), "empty image"),
    ],
)
def test_bad_image_rejected_then_reported(msg, fragment):
    logic, _ = make()
    feed(logic, t=99.95)
    err = logic.on_image("left_wrist_0_rgb", msg)
    assert err is not None and fragment in err and err.startswith("camera left_wrist_0_rgb: ")
    r = logic.tick(100.0)  # the previous good frame is still fresh: runs, but warns about the bad one
    status, kv = status_of(r)
    assert r.level == "WARN" and fragment in status.message and kv["rejected_messages"] == "1"
    r = logic.tick(100.2)  # the last good frame is now stale
    expect_error(r, "camera left_wrist_0_rgb is stale")


def test_bad_image_with_no_good_frame_is_an_error():
    logic, _ = make()
    feed(logic, cams=CAMS[:2])
    logic.on_image("right_wrist_0_rgb", image_msg(100.0, encoding="nope"))
    expect_error(logic.tick(100.0), "no image yet from camera right_wrist_0_rgb",
                 "unknown image encoding 'nope'")


@pytest.mark.parametrize(
    ("names", "positions", "fragment"),
    [
        (["j0", "j1", "j2"], [0.0, 1.0, 2.0], "missing joints: j3"),
        (["j0", "j1", "j2", "j3"], [0.0, float("nan"), 2.0, 3.0], "non-finite positions for: j1"),
    ],
)
def test_bad_joints_reported(names, positions, fragment):
    logic, _ = make()
    feed(logic, joints=False)
    err = logic.on_joint_state(joint_msg(100.0, names, positions))
    assert fragment in err
    expect_error(logic.tick(100.0), "no joint state yet", fragment)


def test_unknown_camera_name_is_rejected():
    logic, _ = make()
    assert "unknown camera 'top'" in logic.on_image("top", image_msg(100.0))


@pytest.mark.parametrize(
    ("fail", "fragment"),
    [
        (RuntimeError("CUDA out of memory"), "inference failed: RuntimeError: CUDA out of memory"),
        (KeyError("prefill"), "inference failed: KeyError"),
    ],
)
def test_policy_exception_is_an_error_and_node_keeps_going(fail, fragment):
    logic, policy = make()
    feed(logic)
    policy.fail = fail
    _, kv = expect_error(logic.tick(100.0), fragment, "test_node_logic.py")
    assert kv["failed_ticks"] == "1" and kv["observation_age_ms"] == "10.00"
    policy.fail = None
    assert logic.tick(100.0).level == "OK"


@pytest.mark.parametrize(
    ("actions", "fragment"),
    [
        (np.full((5, 8), np.nan, np.float32), "non-finite actions"),
        (np.zeros((5, 2), np.float32), "2 action dims, fewer than the 3 output joints"),
        (np.zeros(8, np.float32), "expected (horizon, action_dim)"),
        ([[0.0] * 8], "expected (horizon, action_dim)"),
    ],
)
def test_bad_policy_output(actions, fragment):
    logic, policy = make()
    feed(logic)
    policy.actions = actions
    expect_error(logic.tick(100.0), "inference failed", fragment)


def test_busy_tick_is_dropped_not_queued():
    release = threading.Event()
    entered = threading.Event()

    class SlowPolicy(FakePolicy):
        def infer(self, obs):
            entered.set()
            release.wait(5)
            return super().infer(obs)

    logic, policy = make(policy=SlowPolicy())
    feed(logic)
    results = []
    worker = threading.Thread(target=lambda: results.append(logic.tick(100.0)))
    worker.start()
    assert entered.wait(5)
    r = logic.tick(100.0)
    assert r.level == "DROPPED" and r.diagnostics is None
    release.set()
    worker.join(5)
    assert results[0].level == "OK" and len(policy.calls) == 1
    assert logic.counts["dropped_ticks"] == 1


def test_require_new_runs_once_per_new_input():
    logic, policy = make()
    feed(logic)
    assert logic.tick(100.0, require_new=True).level == "OK"
    assert logic.tick(100.0, require_new=True).level == "DROPPED"
    logic.on_image("base_0_rgb", image_msg(100.01))
    assert logic.tick(100.02, require_new=True).level == "OK"
    assert len(policy.calls) == 2


def test_nan_now_does_not_raise():
    logic, _ = make()
    feed(logic)
    r = logic.tick(float("nan"))
    assert r.level == "ERROR" and "not finite" in r.message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"joint_names": []}, "joint_names is empty"),
        ({"joint_names": [f"j{i}" for i in range(9)]}, "more than the model's 8"),
        ({"output_joint_names": ["a", "a"]}, "repeats"),
        ({"control_period_s": 0.0}, "> 0"),
    ],
)
def test_bad_configuration(kwargs, match):
    args = dict(joint_names=JOINTS, output_joint_names=OUT_JOINTS, control_period_s=0.02,
                latency_budget_ms=50.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PolicyNodeLogic(FakePolicy(), ObservationAssembler(CameraSet.of(CAMS, CAMS)), FACTORY, **args)


def test_camera_not_in_model():
    with pytest.raises(ValueError, match="not inputs of the model"):
        PolicyNodeLogic(FakePolicy(), ObservationAssembler(CameraSet.of(["top"], ["top"])), FACTORY, JOINTS,
                        OUT_JOINTS, 0.02, 50.0)


def test_with_the_real_tiny_runner():
    runtime = pytest.importorskip("pi_policy.runtime")
    runner = runtime.build_runner(preset="tiny", device="cpu", progress=False)
    assembler = ObservationAssembler(CameraSet.of(runner.camera_names[:2]), max_age_s=0.5)  # third camera masked
    logic = PolicyNodeLogic(runner, assembler, FACTORY, ["a", "b"], ["a", "b"], 0.02, 1e6)
    for cam in runner.camera_names[:2]:
        assembler.set_image(cam, 1.0, np.zeros((48, 64, 3), np.uint8))
    assembler.set_joints(1.0, [0.1, 0.2])
    r = logic.tick(1.1)
    status, kv = status_of(r)
    assert r.level == "OK", r.message
    assert len(r.trajectory.points) == runner.horizon and list(r.trajectory.joint_names) == ["a", "b"]
    assert all(np.isfinite(p.positions).all() and len(p.positions) == 2 for p in r.trajectory.points)
    for key in LATENCY_KEYS + BACKEND_KEYS:
        assert kv[key] not in ("", "n/a", "unknown"), key
