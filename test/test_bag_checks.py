"""eval-bag on a bag it has never seen: mismatches fail before any model is built, too few scored ticks fail after,
the recorded-action source comes from the config, the terminal names problems with real numbers and times, and
plots show every backend."""

import re
import warnings

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

import pi_policy.runtime
from pi_policy.bag.demo_bag import ACTION_TOPIC, DemoSpec, demo_params, write_demo_bag
from pi_policy.bag.eval_config import read_eval_config
from pi_policy.bag.reader import TYPESTORE
from pi_policy.bag.replay import evaluate
from pi_policy.bag.report import plot_horizon_error, plot_joints, plot_latency, plot_tick_error, write_report
from pi_policy.bag.setup import ReplaySetup, load_actions
from pi_policy.node.params import ParamError, load_params_yaml, params_from_dict
from pi_policy.observation import STAGES, LatencyRecord, PolicyOutput
from pi_policy.tools.cli import main

CONFIG = "config/demo_bag.yaml"


class RecordedPolicy:
    """The recorded actions after each observation, plus an offset: a policy whose error is known."""

    camera_names = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    horizon, action_dim = 20, 32

    def __init__(self, bag, offset=0.0):
        self.setup = ReplaySetup(params_from_dict(demo_params()), "topic", ACTION_TOPIC)
        self.actions, _ = load_actions(bag, self.setup)
        self.offset = offset

    def infer(self, obs):
        t = obs.stamp + np.arange(self.horizon) * self.setup.params.control_period_s
        values, _ = self.actions.sample(t)
        out = np.zeros((self.horizon, self.action_dim), np.float32)
        out[:, : values.shape[1]] = values + self.offset
        return PolicyOutput(out, LatencyRecord({k: 1.0 for k in STAGES}, host_ms=2.0))


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return write_demo_bag(tmp_path_factory.mktemp("bag") / "demo", "mcap", DemoSpec(duration_s=2.0))


@pytest.fixture
def built(monkeypatch, bag):
    """Replaces the model with RecordedPolicy and records every build: [] means no model was built."""
    calls = []

    def fake_build_runner(spec):
        calls.append(spec)
        return RecordedPolicy(bag, 0.0 if spec.backend == "bf16" else 0.05)

    monkeypatch.setattr(pi_policy.runtime, "build_runner", fake_build_runner)
    return calls


def eval_bag(bag, tmp_path, *extra, config=CONFIG):
    return main(["eval-bag", str(bag), "--config", str(config), "--out", str(tmp_path / "report"), *extra])


@pytest.mark.parametrize("flags, expected", [
    (["--camera-topic", "base_0_rgb=/cam_high/image"],
     ["camera base_0_rgb (required): topic /cam_high/image is not in the bag", "/cam_high/image_raw"]),
    (["--camera-topic", "left_wrist_0_rgb=/cam_left_wrist/image_raw"],
     ["camera left_wrist_0_rgb", "/cam_left_wrist/image_raw/compressed"]),
    (["--camera-topic", "right_wrist_0_rgb=/joint_states"],
     ["camera right_wrist_0_rgb", "/joint_states carries sensor_msgs/JointState, expected sensor_msgs/Image"]),
    (["--joint-state-topic", "/joint_state"],
     ["joint states: topic /joint_state is not in the bag", "closest joint state topics: /joint_states"]),
    (["--set", "joint_names=[waist, shoulder, elbo, wrist]"],
     ["joint states: missing joints elbo, wrist on /joint_states", "elbo -> elbow", "camera_mount"]),
    (["--recorded-action-topic", "/leader/joint_cmd"],
     ["recorded actions: topic /leader/joint_cmd is not in the bag", "closest action topics: " + ACTION_TOPIC]),
    (["--recorded-action-topic", "/prompt"],
     ["recorded actions: /prompt carries std_msgs/String"]),
])
def test_each_mismatch_fails_before_any_model_with_the_names(bag, tmp_path, capsys, built, flags, expected):
    assert eval_bag(bag, tmp_path, *flags) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing was run" in err
    for text in expected:
        assert text in err, err
    assert "the bag has: /cam_high/image_raw (sensor_msgs/Image, 24)" in err
    assert built == [] and not (tmp_path / "report").exists()


def test_missing_action_topic_lists_the_candidates(bag, tmp_path, capsys, built):
    config = tmp_path / "node_only.yaml"
    config.write_text(open(CONFIG).read().split("\neval_bag:")[0])
    assert eval_bag(bag, tmp_path, config=config) == 1
    err = capsys.readouterr().err
    assert "no recorded-action topic is set" in err
    assert f"{ACTION_TOPIC} (trajectory_msgs/JointTrajectory)" in err and built == []
    # the same config with the flag, under its old name too
    assert eval_bag(bag, tmp_path, "--action-topic", ACTION_TOPIC, "--max-ticks", "3", config=config) == 0


def test_all_mismatches_are_listed_together(bag, tmp_path, capsys, built):
    assert eval_bag(bag, tmp_path, "--joint-state-topic", "/js", "--camera-topic", "base_0_rgb=/cam",
                    "--recorded-action-topic", "/cmd") == 1
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 3 and built == []


def test_too_few_scored_ticks_fail_with_the_top_reasons(bag, tmp_path, capsys, built):
    # a 12 Hz camera is older than 50 ms at most ticks: most are skipped as stale
    assert eval_bag(bag, tmp_path, "--set", "max_observation_age_s=0.05") == 1
    captured = capsys.readouterr()
    assert "ticks: 19 scheduled" in captured.out
    (line,) = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert "fewer than --min-scored 50%" in line and "top reasons:" in line
    assert re.search(r"\d+ x camera \w+ is stale by \d+ ms \(age \d+ ms, max 50 ms\)", line), line
    assert len(built) == 1  # it ran, then judged
    assert eval_bag(bag, tmp_path, "--set", "max_observation_age_s=0.05", "--min-scored", "0") == 0
    assert eval_bag(bag, tmp_path) == 0  # every tick scored


def test_recorded_action_source_from_the_config(bag, tmp_path, built):
    cfg = read_eval_config(CONFIG)
    assert (cfg.recorded_action_source, cfg.recorded_action_topic) == ("topic", ACTION_TOPIC)
    assert load_params_yaml(CONFIG).preset == "tiny"  # the node still reads the file: the section is not its own
    joints = tmp_path / "joints.yaml"
    joints.write_text(open(CONFIG).read().replace("recorded_action_source: topic", "recorded_action_source: joints"))
    assert eval_bag(bag, tmp_path, config=joints) == 0
    import json

    settings = json.loads((tmp_path / "report" / "metrics.json").read_text())["settings"]
    assert settings["action_source"] == "joints" and settings["action_topic"] == "/joint_states"
    # the flag overrides the file
    assert eval_bag(bag, tmp_path, "--recorded-action-source", "topic", config=joints) == 0
    settings = json.loads((tmp_path / "report" / "metrics.json").read_text())["settings"]
    assert settings["action_source"] == "topic" and settings["action_topic"] == ACTION_TOPIC


@pytest.mark.parametrize("text, match", [
    ("eval_bag:\n  ros__parameters:\n    recorded_topic: /x\n", r"unknown key 'recorded_topic' \(did you mean"),
    ("eval_bag:\n  ros__parameters:\n    recorded_action_source: future\n", "must be one of topic, joints"),
    ("eval_bag:\n  recorded_action_topic: /x\n", "needs a 'ros__parameters' mapping"),
])
def test_bad_eval_section_is_one_clear_error(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(open(CONFIG).read().split("\neval_bag:")[0] + "\n" + text)
    with pytest.raises(ParamError, match=match):
        read_eval_config(path)


def rewrite(src, dst, edit):
    """Copy a bag, letting edit(topic, seconds since start, raw) return new bytes or None to drop the message."""
    with Reader(src) as r, Writer(dst, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {c.id: w.add_connection(c.topic, c.msgtype, typestore=TYPESTORE) for c in r.connections}
        for c, t, raw in r.messages():
            if (out := edit(c.topic, c.msgtype, (t - r.start_time) / 1e9, bytes(raw))) is not None:
                w.write(conns[c.id], t, out)
    return dst


def damage(topic, msgtype, t, raw):
    """A camera dropout, a burst of NaN joint positions and one corrupt JPEG, as in a real recording."""
    if topic == "/cam_high/image_raw" and 0.6 < t < 1.2:
        return None
    if topic == "/joint_states" and 0.4 < t < 0.45:
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        msg.position = np.where(np.arange(len(msg.position)) == 2, np.nan, msg.position)
        return bytes(TYPESTORE.serialize_cdr(msg, msgtype))
    if topic.endswith("/compressed") and 0.25 < t < 0.33:
        msg = TYPESTORE.deserialize_cdr(raw, msgtype)
        msg.data = np.frombuffer(b"not a jpeg", np.uint8).copy()
        return bytes(TYPESTORE.serialize_cdr(msg, msgtype))
    return raw


def test_terminal_names_input_problems_with_times_and_examples(bag, tmp_path, capsys, built):
    damaged = rewrite(bag, tmp_path / "damaged", damage)
    assert eval_bag(damaged, tmp_path) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipped \d+ ticks: e\.g\. camera base_0_rgb is stale by \d+ ms \(age \d+ ms, max 200 ms\) "
                     r"\(first at 0\.\d\d, ", out), out
    assert " N ms" not in out
    assert re.search(r"/joint_states: 0 undecodable, 5 rejected of \d+ messages, first at 0\.4\d, 0\.4\d", out)
    assert re.search(r"e\.g\. joint state: joint state has non-finite positions for: \w+", out)
    assert re.search(r"/cam_left_wrist/image_raw/compressed: 0 undecodable, 1 rejected .* first at 0\.\d+ s; "
                     r"e\.g\. camera left_wrist_0_rgb: cannot decode compressed image", out), out
    assert re.search(r"/cam_high/image_raw: 1 gap\(s\) in the recording, longest 0\.\d+ s: 0\.\d\d-1\.\d\d s", out)


def test_optional_camera_dropout_is_a_warning_with_examples(bag, tmp_path, capsys, built):
    damaged = rewrite(bag, tmp_path / "damaged", damage)
    assert eval_bag(damaged, tmp_path, "--set", "required_cameras=[left_wrist_0_rgb]") == 0
    out = capsys.readouterr().out
    assert re.search(r"warned \d+ ticks: e\.g\. camera base_0_rgb is stale by \d+ ms .*; optional, masked out", out)
    assert "skipped" not in out.split("ticks:")[1].split("\n")[1]  # the dropout no longer skips ticks


def evaluation(bag, offsets, **params):
    s = ReplaySetup(params_from_dict(demo_params() | params), "topic", ACTION_TOPIC)
    return evaluate(bag, s, lambda b: RecordedPolicy(bag, offsets[b]), list(offsets), progress=False)


def test_two_backends_are_both_visible_in_every_plot(bag, tmp_path):
    # identical chunks: the second backend must not hide the first
    ev = evaluation(rewrite(bag, tmp_path / "damaged", damage), {"bf16": 0.0, "fp8": 0.0})
    assert ev.first.skipped and ev.first.evaluated  # some ticks skipped: the error line must stop there
    figs = {f.__name__: f(ev, tmp_path / f"{f.__name__}.png")
            for f in (plot_joints, plot_horizon_error, plot_tick_error, plot_latency)}
    for name, fig in figs.items():
        ax = fig.axes[0]
        series = {}
        for artist in [*ax.get_lines(), *ax.patches]:
            label = artist.get_label()
            for backend in ("bf16", "fp8"):
                if label.startswith(backend):
                    series.setdefault(backend, []).append(artist)
        assert set(series) == {"bf16", "fp8"}, name
        # on top of each other, colour alone would show only the second: marker or line style must differ
        looks = [{(str(a.get_marker()) if hasattr(a, "get_marker") else "", str(a.get_linestyle())) for a in arts}
                 for arts in series.values()]
        assert not looks[0] & looks[1], name
    (line,) = [x for x in figs["plot_tick_error"].axes[0].get_lines() if x.get_label() == "bf16"]
    assert np.isnan(line.get_ydata()).any()  # a gap where ticks were skipped, not a line across it


def test_no_warning_leaks_when_nothing_is_scored(bag, tmp_path, monkeypatch):
    import pi_policy.bag.replay as replay

    monkeypatch.setattr(replay, "preflight", lambda info, setup: [])  # let a wrong action topic through
    s = ReplaySetup(params_from_dict(demo_params()), "topic", "/not/recorded")
    ev = evaluate(bag, s, lambda b: RecordedPolicy(bag), ["bf16", "fp8"], progress=False)
    assert not ev.first.evaluated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(ev, tmp_path / "r")
