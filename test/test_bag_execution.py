"""Executed-trajectory simulation in eval-bag: chunk switches at arrival, jump, jerk and error against the recording,
the replay in which inference takes bag time and drops ticks like the node (simulated: the same ticks on any
machine), chunks that arrive past their horizon, and `eval-bag --rtc ... --delay N` with the tiny model."""

import csv
import json

import numpy as np
import pytest

from pi_policy.bag.actions import ActionSeries
from pi_policy.bag.demo_bag import ACTION_TOPIC, DEMO_CAMERAS, DemoSpec, demo_params, write_demo_bag
from pi_policy.bag.execution import execute, jerk, plot_window, summarize_execution
from pi_policy.bag.metrics import Trace
from pi_policy.bag.reasons import BUSY
from pi_policy.bag.replay import evaluate
from pi_policy.bag.report import write_report
from pi_policy.bag.setup import InferenceTime, ReplaySetup, bench_latency, load_actions
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


@pytest.mark.parametrize("inference, dropped", [(InferenceTime("host"), True), (InferenceTime("fixed", 250.0), True),
                                                (InferenceTime("fixed", 50.0), False), (InferenceTime(), False)])
def test_realtime_replay_drops_the_ticks_the_node_would_drop(bag, inference, dropped):
    s = ReplaySetup(params_from_dict(demo_params()), "topic", ACTION_TOPIC, inference=inference)
    ev = evaluate(bag, s, lambda _: SlowReplayPolicy(bag, s), ["slow"], progress=False)
    busy = [i for i, reasons in ev.first.skipped.items() if reasons == [BUSY]]
    if dropped:  # busy for 250 ms after each 100 ms tick: two of every three ticks are dropped
        assert len(busy) >= len(ev.first.tick_times) // 2 and len(ev.first.evaluated) >= 5
        assert np.all(np.diff(ev.first.tick_times[ev.first.evaluated]) > 0.25)  # each after the last finished
    else:  # done long before the next tick, or no bag time at all
        assert not busy


def test_a_simulated_latency_drops_the_same_ticks_however_slow_this_machine_is(bag):
    """The host latency a policy reports (a loaded laptop, a fast GPU) changes nothing under a fixed latency: the
    same ticks are dropped and scored, and the measured delay of the node's RTC is the same."""
    params = params_from_dict(demo_params() | {"rtc_mode": "inpaint"})
    s = ReplaySetup(params, "topic", ACTION_TOPIC, inference=InferenceTime("fixed", 150.0))
    runs = [evaluate(bag, s, lambda _, ms=ms: SlowReplayPolicy(bag, s, ms), ["p"], progress=False).first
            for ms in (5.0, 400.0, 3000.0)]
    for r in runs[1:]:
        assert r.evaluated == runs[0].evaluated and r.skipped == runs[0].skipped
    assert 0 < len(runs[0].evaluated) < len(runs[0].tick_times)  # 150 ms at 10 Hz: every other tick is dropped
    host = ReplaySetup(params, "topic", ACTION_TOPIC, inference=InferenceTime("host"))
    fast, slow = (evaluate(bag, host, lambda _, ms=ms: SlowReplayPolicy(bag, host, ms), ["p"], progress=False).first
                  for ms in (5.0, 400.0))
    assert fast.evaluated != slow.evaluated  # the host clock depends on the machine: only on request


def test_chunks_that_arrive_past_their_horizon_are_flagged_and_plotted_inside_the_bag(bag, tmp_path):
    s = ReplaySetup(params_from_dict(demo_params() | {"inference_delay_steps": "auto"}), "topic", ACTION_TOPIC,
                    inference=InferenceTime("fixed", 600.0))  # 30 control periods: past the 20-step chunk
    ev = evaluate(bag, s, lambda _: SlowReplayPolicy(bag, s), ["slow"], progress=False)
    m = write_report(ev, tmp_path / "r")
    (warning,) = m["execution"]["warnings"]
    assert warning.startswith("slow: ") and "chunk 20 steps" in warning and "hold their last step" in warning
    assert "warning: slow:" in (tmp_path / "r" / "index.html").read_text()
    ok = ReplaySetup(s.params, "topic", ACTION_TOPIC, inference=InferenceTime("fixed", 100.0))
    assert not write_report(evaluate(bag, ok, lambda _: SlowReplayPolicy(bag, ok), ["slow"], progress=False),
                            tmp_path / "ok")["execution"]["warnings"]


def test_the_executed_window_stays_inside_the_bag():
    late = np.arange(6.8, 8.4, 0.02)  # a trajectory that runs past the end of a 4 s bag
    lo, hi = plot_window([late], 0.0, 4.0, 1.5)
    assert (lo, hi) == pytest.approx((2.5, 4.0))
    assert plot_window([np.arange(1.0, 3.0, 0.02)], 0.0, 4.0, 1.5) == pytest.approx((1.24, 2.74), abs=0.02)
    assert plot_window([], 0.0, 1.0, 1.5) == (0.0, 1.0)


def test_a_report_of_passes_that_dropped_different_ticks(bag, tmp_path):
    s = ReplaySetup(params_from_dict(demo_params()), "topic", ACTION_TOPIC, inference=InferenceTime("host"))
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
    assert "executed (delay 3; each inference takes 100 ms of bag time (latency_budget_ms))" in printed
    assert (out / "executed.png").stat().st_size > 0
    assert "off ran " in printed and " CPU thread" in printed  # what ran each pass, and on how many threads


def test_eval_bag_rtc_takes_one_backend(bag, tmp_path, capsys):
    code = main(["eval-bag", str(bag), "--config", "config/demo_bag.yaml", "--rtc", "off", "--backend", "bf16",
                 "--backend", "eager", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "one --backend" in err and err.count("\n") == 1  # flags that exclude each other
    code = main(["eval-bag", str(bag), "--config", "config/demo_bag.yaml", "--delay", "soon",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "inference_delay_steps" in err  # a parameter value the node refuses


def test_eval_bag_scores_the_same_ticks_with_a_cpu_hog_running(bag, tmp_path):
    """--rtc with a simulated latency: what another process does to this machine changes no tick."""
    import subprocess
    import sys

    def scored(out):
        assert main(["eval-bag", str(bag), "--config", "config/demo_bag.yaml", "--rtc", "off", "--latency-ms", "150",
                     "--out", str(out), "--no-progress"]) == 0
        return [(r["tick"], r["status"]) for r in csv.DictReader((out / "ticks.csv").open())]

    quiet = scored(tmp_path / "quiet")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = scored(tmp_path / "loaded")
    finally:
        hog.kill()
        hog.wait()
    assert loaded == quiet and any(status == "skipped" for _, status in quiet)


def test_the_latency_of_a_bench_result(tmp_path):
    result = json.loads(open("docs/bench/h200_pi0_bf16_vs_fp8.json").read())
    first = bench_latency("docs/bench/h200_pi0_bf16_vs_fp8.json")
    fp8 = bench_latency("docs/bench/h200_pi0_bf16_vs_fp8.json:fp8")
    assert first == InferenceTime("fixed", result["backends"]["bf16"]["host_e2e"]["p50"],
                                  "h200_pi0_bf16_vs_fp8.json: bf16 on NVIDIA H200, host p50")
    assert fp8.ms == result["backends"]["fp8"]["host_e2e"]["p50"] and "fp8 on NVIDIA H200" in fp8.source
    with pytest.raises(ValueError, match="no such file"):
        bench_latency(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="configuration 'tensorrt'"):
        bench_latency("docs/bench/h200_pi0_bf16_vs_fp8.json:tensorrt")
