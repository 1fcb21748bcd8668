"""Executed-trajectory simulation in eval-bag: chunk switches at arrival, jump, jerk and error against the recording,
the realtime replay that drops ticks like the node, and `eval-bag --rtc ... --delay N` with the tiny model."""

import csv
import json

import numpy as np
import pytest

from pi_policy.bag.actions import ActionSeries
from pi_policy.bag.demo_bag import ACTION_TOPIC, DEMO_CAMERAS, DemoSpec, demo_params, write_demo_bag
from pi_policy.bag.execution import execute, jerk, summarize_execution
from pi_policy.bag.metrics import Trace
from pi_policy.bag.reasons import BUSY
from pi_policy.bag.replay import evaluate
from pi_policy.bag.report import write_report
from pi_policy.bag.setup import ReplaySetup, load_actions
from pi_policy.node.params import params_from_dict
from pi_policy.observation import STAGES, LatencyRecord, PolicyOutput
from pi_policy.tools.cli import main

P = 0.02


def trace(chunks, times):
    chunks = np.asarray(chunks, np.float64)
    n, h = chunks.shape[:2]
    return Trace("t", ["j"], P, 0, np.arange(n), np.asarray(times, np.float64), chunks, np.zeros_like(chunks),
                 np.ones((n, h), bool), {})


def test_each_chunk_takes_over_when_it_arrives_and_the_jump_is_measured_there():
    # chunk i holds the value i: every switch jumps by 1
    tr = trace(np.arange(3.0)[:, None, None] * np.ones((3, 10, 1)), [0.0, 0.1, 0.2])
    ex = execute(tr, np.array([2, 2, 2]))
    assert ex.times[0] == pytest.approx(0.04) and ex.times[-1] == pytest.approx(0.2 + 9 * P)
    assert ex.times[ex.switches] == pytest.approx([0.14, 0.24])  # observation + 2 control periods
    assert ex.source[ex.switches].tolist() == [1, 2]
    np.testing.assert_allclose(ex.jumps, [1.0, 1.0])
    # the first chunk runs 5 steps, from its step 2 on
    assert ex.source.tolist()[:6] == [0, 0, 0, 0, 0, 1]


def test_a_chunk_that_continues_the_previous_one_does_not_jump():
    ramp = lambda t0: (t0 + np.arange(10) * P)[:, None]  # noqa: E731 - a straight-line plan, 1 unit per second
    tr = trace([ramp(0.0), ramp(0.1), ramp(0.2)], [0.0, 0.1, 0.2])
    ex = execute(tr, np.array([3, 3, 3]))
    np.testing.assert_allclose(ex.jumps, 0.0, atol=1e-6)
    np.testing.assert_allclose(ex.actions[:, 0], ex.times, atol=1e-6)
    np.testing.assert_allclose(jerk(ex), 0.0, atol=1e-3)
    recorded = ActionSeries("topic", ex.times, ex.times[:, None] + 0.5, max_gap_s=1.0)
    m = summarize_execution(ex, recorded, 0)
    assert m["mae"] == pytest.approx(0.5) and m["switches"] == 2 and m["jump"]["p95"] == pytest.approx(0, abs=1e-6)


def test_a_chunk_never_takes_over_before_the_one_before_it_and_a_used_up_chunk_holds():
    tr = trace(np.arange(3.0)[:, None, None] * np.ones((3, 4, 1)), [0.0, 0.1, 0.12])
    ex = execute(tr, np.array([1, 8, 1]))  # chunk 2 is ready at 0.14, but inference is sequential: not before 1
    assert 1 not in ex.source  # chunks 1 and 2 arrive together at 0.26: the newer one takes over
    assert ex.times[ex.switches] == pytest.approx([0.26]) and ex.source[-1] == 2
    assert np.all(ex.actions[:-1, 0] == 0.0) and ex.actions[-1, 0] == 2.0  # chunk 0 ran out at 0.08: held


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return write_demo_bag(tmp_path_factory.mktemp("bag") / "b", "mcap", DemoSpec(duration_s=2.0))


class SlowReplayPolicy:
    """The recorded actions, taking 250 ms of (claimed) host time per chunk."""

    camera_names, horizon, action_dim = list(DEMO_CAMERAS), 20, 8

    def __init__(self, bag, s, host_ms=250.0):
        self.actions, _ = load_actions(bag, s)
        self.s, self.host_ms = s, host_ms

    def infer(self, obs, **continuation):
        t = obs.stamp + np.arange(self.horizon) * self.s.params.control_period_s
        out = np.zeros((self.horizon, self.action_dim), np.float32)
        out[:, :7] = self.actions.sample(t)[0]
        return PolicyOutput(out, LatencyRecord(dict.fromkeys(STAGES, 60.0), host_ms=self.host_ms))


@pytest.mark.parametrize("delay, dropped", [("auto", True), ("1", False)])
def test_realtime_replay_drops_the_ticks_the_node_would_drop(bag, delay, dropped):
    s = ReplaySetup(params_from_dict(demo_params() | {"inference_delay_steps": delay}), "topic", ACTION_TOPIC,
                    realtime=True)
    ev = evaluate(bag, s, lambda _: SlowReplayPolicy(bag, s), ["slow"], progress=False)
    busy = [i for i, reasons in ev.first.skipped.items() if reasons == [BUSY]]
    if dropped:  # busy for 250 ms after each 100 ms tick: two of every three ticks are dropped
        assert len(busy) >= len(ev.first.tick_times) // 2 and len(ev.first.evaluated) >= 5
        assert np.all(np.diff(ev.first.tick_times[ev.first.evaluated]) > 0.25)  # each after the last finished
    else:  # a fixed 1-step delay: the chunk is in place long before the next tick
        assert not busy


def test_a_report_of_passes_that_dropped_different_ticks(bag, tmp_path):
    s = ReplaySetup(params_from_dict(demo_params()), "topic", ACTION_TOPIC, realtime=True)
    ev = evaluate(bag, s, lambda name: SlowReplayPolicy(bag, s, 250.0 if name == "slow" else 5.0), ["slow", "fast"],
                  progress=False)
    assert len(ev.replays[1].evaluated) > len(ev.replays[0].evaluated)
    m = write_report(ev, tmp_path / "r")
    rows = list(csv.DictReader((tmp_path / "r" / "ticks.csv").open()))
    assert sum(bool(r["slow_mae"]) for r in rows) == len(ev.replays[0].evaluated)
    assert m["execution"]["slow"]["switches"] < m["execution"]["fast"]["switches"]


def test_eval_bag_compares_rtc_modes_side_by_side(bag, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval-bag", str(bag), "--config", "config/demo_bag.yaml", "--rtc", "off", "--rtc", "inpaint",
                 "--delay", "3", "--out", str(out), "--set", "execution_horizon=12"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["rtc_modes"] == ["off", "inpaint"] and m["settings"]["realtime"] is True
    ex = m["execution"]
    assert ex["delay"] == 3 and set(ex) >= {"off", "inpaint"}
    for mode in ("off", "inpaint"):
        assert ex[mode]["switches"] > 5 and ex[mode]["delay_steps"]["p50"] == 3
        assert ex[mode]["jerk"]["p95"] > 0 and ex[mode]["mae"] > 0
    # the random tiny model's chunks are unrelated noise: without RTC every switch jumps, with it hardly
    assert ex["inpaint"]["jump"]["p95"] < 0.3 * ex["off"]["jump"]["p95"]
    assert m["backends"]["inpaint"]["stage_backends"]["denoise"].endswith("+rtc-inpaint")
    assert "executed (delay 3)" in printed and (out / "executed.png").stat().st_size > 0


def test_eval_bag_rtc_takes_one_backend(bag, tmp_path, capsys):
    code = main(["eval-bag", str(bag), "--config", "config/demo_bag.yaml", "--rtc", "off", "--backend", "bf16",
                 "--backend", "eager", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "one --backend" in err and err.count("\n") == 1
    code = main(["eval-bag", str(bag), "--config", "config/demo_bag.yaml", "--delay", "soon",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "inference_delay_steps" in err
