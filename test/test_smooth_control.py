"""Smooth control in the node's logic: the delay estimate, the executing chunk's remainder passed to the next
inference, the fixed-rate action queue, the stream's messages and the new parameters (real ROS 2 message types
from the rosbags typestore, a fake policy)."""

import math

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from pi_policy.node.action_queue import DEADLINE, DRY, OK, STOPPED, WAITING, ActionQueue
from pi_policy.node.inputs import sec_to_stamp, stamp_to_sec
from pi_policy.node.logic import PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.node.params import ParamError, params_from_dict
from pi_policy.node.rtc_state import DelayEstimator, ExecutingChunk
from pi_policy.observation import STAGES, LatencyRecord, PolicyOutput

TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
FACTORY = MessageFactory(MessageClasses.from_typestore(TS))
CAMS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
JOINTS = ["j0", "j1", "j2"]
PERIOD = 0.02


class ContinuingPolicy:
    """Returns chunk i filled with i (plus the step index in dim 1), and records what each call was given."""

    camera_names = CAMS
    horizon = 10
    action_dim = 4

    def __init__(self):
        self.calls = []

    def infer(self, obs, **continuation):
        self.calls.append(continuation)
        actions = np.full((self.horizon, self.action_dim), float(len(self.calls)), np.float32)
        actions[:, 1] = np.arange(self.horizon)
        return PolicyOutput(actions, LatencyRecord(dict.fromkeys(STAGES, 1.0), 5.0))


def header(t):
    sec, nanosec = sec_to_stamp(t)
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id="")


def feed(logic, t):
    for c in CAMS:
        msg = T["sensor_msgs/msg/Image"](header=header(t), height=2, width=2, encoding="rgb8", is_bigendian=0,
                                         step=6, data=np.full(12, 7, np.uint8))
        assert logic.on_image(c, msg) is None
    js = T["sensor_msgs/msg/JointState"](header=header(t), name=JOINTS, position=np.zeros(3),
                                         velocity=np.zeros(0), effort=np.zeros(0))
    assert logic.on_joint_state(js) is None


def logic_from(**values):
    params = params_from_dict(dict(preset="tiny", device="cpu", camera_names=CAMS, camera_topics=["a", "b", "c"],
                                   joint_names=JOINTS, max_observation_age_s=0.5, control_period_s=PERIOD) | values)
    policy = ContinuingPolicy()
    return PolicyNodeLogic.from_params(params, policy, FACTORY), policy


def test_delay_follows_a_latency_series():
    est = DelayEstimator(PERIOD, window=20)
    assert est.steps() is None
    for latency in np.linspace(0.030, 0.049, 20):
        est.add(latency)
    assert est.steps() == math.ceil(np.percentile(np.linspace(0.030, 0.049, 20), 95) / PERIOD) == 3
    for _ in range(20):  # the backend slows down to 85 ms: within one window the estimate is 5 periods
        est.add(0.085)
    assert est.steps() == 5
    est.add(float("nan"))
    est.add(-1.0)
    assert len(est.latencies) == 20 and est.steps() == 5
    for _ in range(18):
        est.add(0.010)
    assert est.steps() == 5  # two slow chunks of 20 (10%) still set the p95
    est.add(0.010)
    assert est.steps() == 1  # one of 20: the p95 falls between 10 and 85 ms (13.75 ms)


def test_remainder_is_the_plan_from_the_new_observation_on():
    chunk = ExecutingChunk(10.0, np.stack([np.arange(5.0), 10 * np.arange(5.0)], axis=1))
    np.testing.assert_allclose(chunk.remainder(10.05, PERIOD), [[2.5, 25.0], [3.5, 35.0]])
    np.testing.assert_allclose(chunk.remainder(10.0, PERIOD)[:, 0], np.arange(5.0))
    np.testing.assert_allclose(chunk.remainder(10.08, PERIOD), [[4.0, 40.0]])
    assert chunk.remainder(10.09, PERIOD) is None and chunk.remainder(9.9, PERIOD) is None


def test_the_node_passes_the_unexecuted_remainder_and_its_measured_delay():
    logic, policy = logic_from(rtc_mode="inpaint")
    feed(logic, 100.0)
    first = logic.tick(100.03)
    assert first.level == "OK" and policy.calls[0] == {}  # nothing executing yet
    kv = {k.key: k.value for k in first.diagnostics.status[0].values}
    e2e_s = float(kv["e2e_ms"]) / 1e3
    assert e2e_s >= 0.03 and "rtc_delay_steps" not in kv
    feed(logic, 100.1)
    second = logic.tick(100.13)
    call = policy.calls[1]
    assert call["delay"] == math.ceil(e2e_s / PERIOD - 1e-9)
    # chunk 1 was observed at 100.0; the new observation is 5 control periods later
    np.testing.assert_allclose(call["prev_chunk"][:, 1], np.arange(5, 10), atol=1e-4)
    assert np.all(call["prev_chunk"][:, 0] == 1.0) and call["prev_chunk"].shape == (5, 4)
    kv = {k.key: k.value for k in second.diagnostics.status[0].values}
    assert kv["rtc_delay_steps"] == str(call["delay"])
    assert logic.executing.stamp == pytest.approx(100.1) and logic.executing.actions[0, 0] == 2.0


def test_a_fixed_delay_and_rtc_off():
    logic, policy = logic_from(rtc_mode="guided", inference_delay_steps="3")
    for t in (100.0, 100.1):
        feed(logic, t)
        logic.tick(t + 0.01)
    assert policy.calls[1]["delay"] == 3
    logic, policy = logic_from()  # rtc_mode off: the policy is called as before
    for t in (100.0, 100.1):
        feed(logic, t)
        logic.tick(t + 0.01)
    assert policy.calls == [{}, {}]
    # a chunk that is used up by the next observation leaves nothing to continue
    logic, policy = logic_from(rtc_mode="inpaint")
    for t in (100.0, 100.5):
        feed(logic, t)
        logic.tick(t + 0.01)
    assert policy.calls[1] == {}


def chunk(value, steps=10):
    return np.stack([np.full(steps, value), np.arange(steps)], axis=1).astype(np.float64)


def test_the_queue_switches_at_the_index_of_the_observation_time():
    q = ActionQueue(PERIOD)
    assert q.next(0.0).status == STOPPED and not q.push(1.0, chunk(1))
    q.start()
    assert q.next(1.0).status == WAITING and q.next(1.0).action is None
    assert q.push(1.0, chunk(1))
    s = q.next(1.0)
    assert s.status == OK and s.index == 0 and s.action.tolist() == [1, 0]
    assert q.next(1.0 + 3.5 * PERIOD).index == 3
    # a chunk observed at 1.06 arrives at 1.13: the step due then is 3 (1.06 + 3 periods = 1.12 <= 1.13 < 1.14)
    assert q.push(1.06, chunk(2))
    s = q.next(1.13)
    assert s.index == 3 and s.action.tolist() == [2, 3]
    assert not q.push(1.02, chunk(3))  # older than the chunk in use: ignored
    assert q.next(1.13).action.tolist() == [2, 3]
    assert q.counts == {"stream_sent": 4, "stream_dry": 0, "stream_deadline_missed": 0}


def test_the_queue_holds_when_dry_and_sends_the_safe_action_on_a_missed_deadline():
    q = ActionQueue(PERIOD)
    q.start()
    q.push(1.0, chunk(1, steps=4))
    assert q.next(1.0 + 3 * PERIOD).action.tolist() == [1, 3]
    dry = q.next(1.0 + 4 * PERIOD)
    assert dry.status == DRY and dry.action.tolist() == [1, 3]  # holds the last action
    assert q.next(5.0).action.tolist() == [1, 3] and q.counts["stream_dry"] == 2

    q = ActionQueue(PERIOD, safe_action=np.array([0.5, -0.5]), deadline_s=0.05)
    q.start()
    q.push(1.0, chunk(1))
    assert q.next(1.04).status == OK
    late = q.next(1.06)  # step 3 of 10 is left, but the chunk is past its 50 ms deadline
    assert late.status == DEADLINE and late.action.tolist() == [0.5, -0.5]
    assert q.counts["stream_deadline_missed"] == 1
    q.push(1.05, chunk(2))  # a fresh chunk ends the miss
    assert q.next(1.06).status == OK
    q.stop()
    assert q.next(1.07).status == STOPPED and q.next(1.07).action is None
    assert not q.push(1.08, chunk(3))
    q.start()
    assert q.next(1.09).status == WAITING  # a restart waits for a fresh chunk
    with pytest.raises(ValueError, match="safe action has 2 values"):
        q.push(1.1, np.zeros((5, 3)))


@pytest.mark.parametrize("kind, msgtype", [("float64_array", "std_msgs/msg/Float64MultiArray"),
                                           ("joint_state", "sensor_msgs/msg/JointState")])
def test_the_stream_publishes_the_current_action_and_counts_misses(kind, msgtype):
    logic, _ = logic_from(action_stream_topic="policy/command", action_stream_type=kind,
                          output_joint_names=["j0", "j1"])
    logic.stream.start()
    assert logic.stream_tick(99.0) is None  # no chunk yet
    feed(logic, 100.0)
    logic.tick(100.03)
    msg = logic.stream_tick(100.03 + 0.001)
    assert msg.__msgtype__ == msgtype
    TS.deserialize_cdr(TS.serialize_cdr(msg, msgtype), msgtype)
    values = msg.data if kind == "float64_array" else msg.position
    np.testing.assert_array_equal(values, [1.0, 1.0])  # step 1 of chunk 1 (observed at 100.0), output joints only
    if kind == "joint_state":
        assert list(msg.name) == ["j0", "j1"] and stamp_to_sec(msg.header.stamp) == pytest.approx(100.031)
    logic.stream_tick(100.5)  # past the 10-step chunk: a miss, holding the last action
    feed(logic, 100.6)
    r = logic.tick(100.61)
    kv = {k.key: k.value for k in r.diagnostics.status[0].values}
    assert kv["stream_dry"] == "1" and kv["stream_sent"] == "1" and kv["stream_deadline_missed"] == "0"


@pytest.mark.parametrize("values, fragment", [
    ({"rtc_mode": "smooth"}, "rtc mode 'smooth'"),
    ({"prefix_schedule": "cosine"}, "prefix schedule 'cosine'"),
    ({"execution_horizon": 0}, "execution_horizon"),
    ({"inference_delay_steps": "soon"}, "inference_delay_steps"),
    ({"inference_delay_steps": 4}, "a string (quote it in YAML)"),
    ({"action_stream_type": "twist"}, "action_stream_type 'twist'"),
    ({"safe_action": [0.0, 0.0]}, "safe_action has 2 values but there are 3 output joints"),
    ({"safe_action": [0, "one", 2]}, "a list of numbers"),  # integers alone are doubles, as for a double
    ({"max_guidance_weight": -1.0}, "max_guidance_weight"),
    ({"action_stream_deadline_s": -0.1}, "action_stream_deadline_s"),
])
def test_new_parameters_are_checked(values, fragment):
    with pytest.raises(ParamError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        logic_from(**values)


def test_new_parameters_reach_the_runner():
    params = params_from_dict(dict(preset="tiny", joint_names=JOINTS, rtc_mode="guided", execution_horizon=12,
                                   prefix_schedule="linear", max_guidance_weight=8.0, safe_action=[0.0, 0.1, 0.2]))
    rtc = params.runner_spec().rtc
    assert (rtc.mode, rtc.execution_horizon, rtc.prefix_schedule, rtc.max_guidance_weight) == ("guided", 12,
                                                                                               "linear", 8.0)
