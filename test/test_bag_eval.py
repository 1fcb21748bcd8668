"""eval-bag: tick count, zero error for a policy that replays the recorded actions, damaged bags, report, outputs."""

import csv
import json

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from pi_policy.bag.actions import build_action_series
from pi_policy.bag.demo_bag import (
    ACTION_TOPIC,
    DEMO_CAMERAS,
    DEMO_JOINTS,
    JOINT_STATES_TOPIC,
    PROMPT_TOPIC,
    DemoSpec,
    demo_params,
    write_demo_bag,
)
from pi_policy.bag.reader import TYPESTORE, BagError, inspect_bag, read_messages
from pi_policy.bag.reasons import NO_ACTIONS, skip_counts
from pi_policy.bag.replay import evaluate
from pi_policy.bag.report import REPORT_FILES, build_metrics, write_html, write_report
from pi_policy.bag.setup import ReplaySetup, load_actions
from pi_policy.bag.writer import write_output_bag
from pi_policy.cameras import CameraSet
from pi_policy.node.params import params_from_dict
from pi_policy.observation import STAGES, LatencyRecord, PolicyOutput
from pi_policy.tools.cli import main

CONFIG = "config/demo_bag.yaml"
HORIZON, ACTION_DIM = 20, 32


def settings(source="topic", max_ticks=None, **params):
    """The demo bag's node parameters (what config/demo_bag.yaml holds), with overrides."""
    return ReplaySetup(params_from_dict(demo_params() | {"prompt": ""} | params), source, ACTION_TOPIC,
                       max_ticks=max_ticks)


class ReplayPolicy:
    """Returns exactly the recorded actions that follow the observation (plus `offset`)."""

    camera_names = list(DEMO_CAMERAS)
    horizon, action_dim = HORIZON, ACTION_DIM

    def __init__(self, bag, s, offset=0.0):
        self.actions, _ = load_actions(bag, s)
        self.s, self.offset = s, offset
        self.prompts = []

    def infer(self, obs):
        self.prompts.append(obs.prompt)
        t = obs.stamp + (np.arange(self.horizon) + self.s.step_offset) * self.s.params.control_period_s
        values, _ = self.actions.sample(t)
        out = np.zeros((self.horizon, self.action_dim), np.float32)
        out[:, : values.shape[1]] = values + self.offset
        return PolicyOutput(out, LatencyRecord({k: 1.0 + self.offset for k in STAGES}, host_ms=5.0))


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    return {s: write_demo_bag(root / s, s, DemoSpec(duration_s=2.0)) for s in ("mcap", "sqlite3")}


def run(bag, s, offsets=None, keep_outputs=False):
    offsets = offsets or {"exact": 0.0}
    policies = {}

    def make(backend):
        policies[backend] = ReplayPolicy(bag, s, offsets[backend])
        return policies[backend]

    return evaluate(bag, s, make, list(offsets), progress=False, keep_outputs=keep_outputs), policies


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_tick_count_and_zero_error_for_recorded_actions(bags, storage):
    ev, policies = run(bags[storage], settings())
    r = ev.first
    # ticks every 0.1 s from 0.1 s to the last message at 1.991 s
    assert len(r.tick_times) == 19
    assert len(r.evaluated) + len(r.skipped) == 19
    assert len(r.evaluated) >= 17
    assert set(policies["exact"].prompts) == {"pick up the red cube"}
    m = build_metrics(ev, first_k=5)
    b = m["backends"]["exact"]
    assert b["mae"] == 0.0 and b["mse"] == 0.0 and b["mae_first_k"] == 0.0 and b["mse_first_k"] == 0.0
    assert all(j["mae"] == 0.0 and j["mse_first_k"] == 0.0 for j in b["per_joint"].values())
    assert set(b["per_joint"]) == set(DEMO_JOINTS)
    assert m["inputs"]["missing_topics"] == [] and m["inputs"]["gaps"] == {}


@pytest.mark.parametrize("source", ["topic", "joints"])
def test_error_is_positive_for_a_wrong_policy(bags, source):
    ev, _ = run(bags["mcap"], settings(source), {"exact": 0.0, "off": 0.1})
    m = build_metrics(ev, first_k=5)
    assert m["backends"]["exact"]["mae"] == 0.0
    off = m["backends"]["off"]
    assert off["mae"] == pytest.approx(0.1, abs=1e-5) and off["mse"] == pytest.approx(0.01, abs=1e-5)
    assert off["per_joint"]["gripper"]["mae_first_k"] == pytest.approx(0.1, abs=1e-5)
    # two backends: same ticks, side-by-side metrics and their difference
    (c,) = m["comparison"]
    assert c["baseline"] == "exact" and c["candidate"] == "off"
    assert c["common_ticks"] == m["ticks"]["evaluated"]
    assert c["actions"]["max_abs_diff"] == pytest.approx(0.1, abs=1e-5)
    assert c["mae_delta"] == pytest.approx(0.1, abs=1e-5)
    assert c["latency"]["vision"]["speedup"] == pytest.approx(1 / 1.1)


def test_joint_source_matches_topic_source_on_demo_bag(bags):
    # the demo arm reaches each command one control period later, so both sources give the same targets
    a, _ = load_actions(bags["mcap"], settings("topic"))
    b, _ = load_actions(bags["mcap"], settings("joints"))
    t = np.linspace(0.2, 1.5, 40) + a.times[0]
    va, oka = a.sample(t)
    vb, okb = b.sample(t + 0.02)
    assert oka.all() and okb.all()
    np.testing.assert_allclose(va, vb, atol=1e-3)  # both interpolate the same curve, at 50 and 100 Hz


def rewrite(src, dst, edit, drop_topics=()):
    """Copy a bag, letting edit(topic, log_s, raw) return new bytes or None to drop the message."""
    with Reader(src) as r:
        t0 = r.start_time
        with Writer(dst, version=9, storage_plugin=StoragePlugin.MCAP) as w:
            conns = {c.id: w.add_connection(c.topic, c.msgtype, typestore=TYPESTORE)
                     for c in r.connections if c.topic not in drop_topics}
            for c, t, raw in r.messages():
                if c.id in conns and (out := edit(c.topic, (t - t0) / 1e9, bytes(raw))) is not None:
                    w.write(conns[c.id], t, out)
    return dst


def test_gaps_corrupt_and_missing_topics_are_reported(bags, tmp_path):
    bad_jpeg = {"n": 0}

    def edit(topic, t, raw):
        if topic == "/cam_high/image_raw" and 0.8 < t < 1.4:
            return None  # a 0.6 s camera gap
        if topic == JOINT_STATES_TOPIC and 0.5 < t < 0.55:
            return raw[:12]  # truncated CDR: undecodable
        if topic == "/cam_left_wrist/image_raw/compressed" and bad_jpeg["n"] < 2:
            bad_jpeg["n"] += 1
            msg = TYPESTORE.deserialize_cdr(raw, "sensor_msgs/msg/CompressedImage")
            msg.data = np.frombuffer(b"not a jpeg at all", np.uint8).copy()
            return bytes(TYPESTORE.serialize_cdr(msg, "sensor_msgs/msg/CompressedImage"))
        return raw

    bag = rewrite(bags["mcap"], tmp_path / "bad", edit, drop_topics=(PROMPT_TOPIC,))
    s = settings()
    ev, policies = run(bag, s)
    m = build_metrics(ev, first_k=5)
    write_html(m, tmp_path / "index.html")
    ins = m["inputs"]
    assert ins["missing_topics"] == [PROMPT_TOPIC]
    assert ins["topics"][JOINT_STATES_TOPIC]["undecodable"] == 5
    assert ins["topics"]["/cam_left_wrist/image_raw/compressed"]["invalid"] == 2
    assert "cannot decode compressed image" in ins["topics"]["/cam_left_wrist/image_raw/compressed"]["examples"][0]
    (gap,) = ins["gaps"]["/cam_high/image_raw"]
    assert 0.6 < gap["duration_s"] < 0.75
    reasons = m["ticks"]["skipped_by_reason"]
    stale = [n for r, n in reasons.items() if r.startswith("camera base_0_rgb is stale")]
    assert stale and sum(stale) >= 3
    assert m["ticks"]["evaluated"] + m["ticks"]["skipped"] == 19
    assert m["backends"]["exact"]["mae"] == 0.0  # the ticks that ran are still scored exactly
    assert set(policies["exact"].prompts) == {""}  # no prompt topic and none configured
    html = (tmp_path / "index.html").read_text()
    assert PROMPT_TOPIC in html and "stale" in html and "undecodable" in html


def test_action_gaps_are_not_scored(bags, tmp_path):
    bag = rewrite(bags["mcap"], tmp_path / "gap", lambda topic, t, raw: None
                  if topic == ACTION_TOPIC and t > 0.9 else raw)
    ev, _ = run(bag, settings())
    counts = skip_counts(ev.first.skipped)
    assert counts[NO_ACTIONS] >= 8  # ticks whose whole chunk lies past the last recorded action
    assert ev.first.trace.valid.sum(axis=1).min() >= 1


def test_report_folder_holds_every_file(bags, tmp_path):
    ev, _ = run(bags["sqlite3"], settings(), {"exact": 0.0, "off": 0.05})
    out = tmp_path / "report"
    write_report(ev, out, first_k=5)
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["backends"]) == {"exact", "off"}
    assert set(m["backends"]["off"]["latency_ms"]) == {*STAGES, "host", "total"}
    assert len(m["backends"]["off"]["mae_by_step"]) == HORIZON
    rows = list(csv.DictReader((out / "ticks.csv").open()))
    assert len(rows) == 19
    scored = [r for r in rows if r["status"] == "evaluated"]
    assert scored and all(float(r["exact_mae"]) == 0.0 and float(r["off_mae"]) > 0 for r in scored)
    html = (out / "index.html").read_text()
    assert all(f"src='{p}'" in html for p in REPORT_FILES if p.endswith(".png"))


def test_write_bag_is_readable(bags, tmp_path):
    s = settings()
    ev, _ = run(bags["mcap"], s, {"a": 0.0, "b": 0.1}, keep_outputs=True)
    counts = write_output_bag(ev, tmp_path / "out", "/policy/joint_trajectory", "/policy/latency")
    n = len(ev.first.evaluated)
    assert counts["/a/policy/joint_trajectory"] == n and counts["/b/policy/latency"] == 19
    info = inspect_bag(tmp_path / "out")
    assert info.counts["/a/policy/joint_trajectory"] == n
    trajs = [bm.msg for bm in read_messages(tmp_path / "out", ["/a/policy/joint_trajectory"])]
    assert list(trajs[0].joint_names) == DEMO_JOINTS and len(trajs[0].points) == HORIZON
    stamp = trajs[0].header.stamp.sec + trajs[0].header.stamp.nanosec * 1e-9
    assert stamp == pytest.approx(ev.first.trace.times[0], abs=1e-6)
    np.testing.assert_allclose(trajs[0].points[0].positions, ev.first.trace.predicted[0, 0], atol=1e-6)
    diags = [bm.msg for bm in read_messages(tmp_path / "out", ["/b/policy/latency"])]
    keys = {kv.key for kv in diags[-1].status[0].values}
    assert {"vision_ms", "total_ms"} <= keys


def test_empty_and_unreadable_bags_fail_with_one_line(tmp_path, capsys):
    with Writer(tmp_path / "empty", version=9, storage_plugin=StoragePlugin.MCAP) as w:
        w.add_connection(JOINT_STATES_TOPIC, "sensor_msgs/msg/JointState", typestore=TYPESTORE)
    with pytest.raises(BagError, match="no messages"):
        inspect_bag(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metadata.yaml").write_text("this: [is not a bag")
    for path in ("empty", "garbage", "missing"):
        code = main(["eval-bag", str(tmp_path / path), "--config", CONFIG, "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error:") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_cli_eval_bag_with_overrides(bags, tmp_path, capsys, monkeypatch):
    import pi_policy.runtime

    s = settings()
    seen = []

    def fake_build_runner(spec):
        seen.append(spec)
        return ReplayPolicy(bags["mcap"], s, 0.0 if spec.backend == "bf16" else 0.02)

    monkeypatch.setattr(pi_policy.runtime, "build_runner", fake_build_runner)
    out, written = tmp_path / "report", tmp_path / "out_bag"
    code = main(["eval-bag", str(bags["mcap"]), "--config", CONFIG, "--backend", "bf16", "--backend", "fp8",
                 "--preset", "tiny", "--device", "cpu", "--max-ticks", "6", "--first-k", "3", "--out", str(out),
                 "--write-bag", str(written), "--set", "max_observation_age_s=0.3",
                 "--camera-topic", "base_0_rgb=/cam_high/image_raw"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert [spec.backend for spec in seen] == ["bf16", "fp8"] and seen[0].preset == "tiny"
    m = json.loads((out / "metrics.json").read_text())
    assert m["ticks"]["scheduled"] == 6 and m["settings"]["max_age_s"] == 0.3
    assert m["backends"]["bf16"]["mae"] == 0.0 and m["backends"]["fp8"]["mae"] > 0
    assert "fp8 vs bf16" in printed and "index.html" in printed
    counts = inspect_bag(written).counts
    assert counts["/bf16/policy/joint_trajectory"] == m["ticks"]["evaluated"], counts


def test_cli_reports_bad_config_in_one_line(bags, tmp_path, capsys):
    code = main(["eval-bag", str(bags["mcap"]), "--config", CONFIG, "--set", "max_observation_age_s=fast",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "max_observation_age_s" in err and err.count("\n") == 1


def test_action_series_gap_and_trajectory_replacement():
    s = build_action_series("topic", [0.0, 0.1, 0.2, 0.3, 1.0, 1.1], [np.full(2, v) for v in range(6)])
    values, ok = s.sample(np.array([0.05, 0.25, 0.5, 1.05, 2.0]))
    assert ok.tolist() == [True, True, False, True, False]
    np.testing.assert_allclose(values[:, 0], [0.5, 2.5, 0.0, 4.5, 0.0])
    # a second multi-point trajectory replaces what is left of the first from its first point on
    times = [0.0, 0.1, 0.2, 0.3, 0.15, 0.25]
    rows = [np.full(1, v) for v in (0.0, 1.0, 2.0, 3.0, 10.0, 11.0)]
    s = build_action_series("topic", times, rows, replace=[True, False, False, False, True, False])
    assert s.times.tolist() == [0.0, 0.1, 0.15, 0.25] and s.values[:, 0].tolist() == [0.0, 1.0, 10.0, 11.0]


def test_rate_zero_ticks_on_every_accepted_frame(bags):
    ev, _ = run(bags["mcap"], settings(inference_rate_hz=0.0))
    r = ev.first
    frames = sum(len(r.arrival[t]) for t in DEMO_CAMERAS.values())
    assert len(r.tick_times) == frames == 72  # 3 cameras x 12 Hz x 2 s
    assert np.all(np.diff(r.tick_times) >= 0)
    assert build_metrics(ev, 5)["backends"]["exact"]["mae"] == 0.0


def test_topics_resolve_like_the_node():
    from pi_policy.bag.setup import resolve_topic

    assert resolve_topic("joint_states") == "/joint_states"
    assert resolve_topic("/abs/topic", "robot1") == "/abs/topic"
    assert resolve_topic("cameras/base/image_raw", "/robot1/") == "/robot1/cameras/base/image_raw"
    assert resolve_topic("~/latency", "robot1") == "/robot1/pi_policy_node/latency"


def test_robot_config_replays_with_command_line_overrides():
    # config/thor.yaml names files that exist only on the robot; overrides make it usable here
    import argparse

    from pi_policy.tools.bag import add_parser, load_params

    parser_args = ["eval-bag", "bag", "--config", "config/thor.yaml", "--preset", "tiny", "--device", "cpu",
                   "--checkpoint", "", "--set", "norm_stats=''", "--set", "tokenizer=''", "--set",
                   "engine_path=''", "--set", "backend=bf16", "--namespace", "/robot1", "--prompt-format", "lerobot"]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(parser_args)
    params = load_params(args)
    assert params.preset == "tiny" and params.checkpoint == "" and len(params.joint_names) == 14
    assert params.runner_spec().prompt_format == "lerobot"
    s = ReplaySetup(params, "joints", None, namespace=args.namespace)
    assert s.cameras["base_0_rgb"] == "/robot1/cameras/base/image_raw"
    assert s.joint_states_topic == "/robot1/joint_states" and s.params.required_cameras == ["base_0_rgb"]


def test_tiny_model_end_to_end(bags):
    from pi_policy.runtime import build_runner

    s = settings(max_ticks=2)
    ev = evaluate(bags["mcap"], s, lambda b: build_runner(preset="tiny", backend=b,
                                                          cameras=CameraSet.of(DEMO_CAMERAS), progress=False),
                  ["eager"], progress=False)
    tr = ev.first.trace
    assert len(ev.first.evaluated) == 2 and np.isfinite(tr.predicted).all()
    assert set(tr.latency_ms) >= set(STAGES) and (tr.latency_ms["total"] > 0).all()


def test_the_image_size_limit_applies_to_bag_frames(bags):
    # the node's max_image_side, from the same parameter file: frames over it are refused, compressed ones
    # before they are decoded, and every tick is skipped for want of a camera
    ev, _ = run(bags["mcap"], settings(max_image_side=64))
    m = build_metrics(ev, first_k=5)
    topics = m["inputs"]["topics"]
    compressed = topics["/cam_left_wrist/image_raw/compressed"]
    assert compressed["invalid"] > 0
    assert "JPEG image (declared in its header) is 128x96, larger than max_image_side 64" in compressed["examples"][0]
    assert "image is 128x96, larger than max_image_side 64" in topics["/cam_high/image_raw"]["examples"][0]
    assert m["ticks"]["evaluated"] == 0
