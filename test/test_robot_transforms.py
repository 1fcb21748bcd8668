"""Delta actions and ALOHA's joint conversion against openpi's formulas (test/openpi_reference.py), masks in openpi's
make_bool_mask notation, and one-line errors for transforms that cannot fit the robot."""

import numpy as np
import pytest
from openpi_reference import ROBOTS, aloha_decode_state, aloha_encode_actions, bool_mask

from pi_policy.model.normalize import Normalizer, NormStats
from pi_policy.policy_config import get_policy_config
from pi_policy.robot_transforms import RobotTransforms, make_bool_mask, mask_dims, mask_text, parse_mask


def test_mask_notation_is_openpis():
    assert make_bool_mask(2, -2, 2) == (True, True, False, False, True, True)  # openpi's docstring examples
    assert make_bool_mask(2, 0, 2) == (True,) * 4
    assert np.array_equal(make_bool_mask(6, -1, 6, -1), bool_mask(6, -1, 6, -1))
    assert parse_mask("6,-1,6,-1") == parse_mask("[6, -1, 6, -1]") == parse_mask("6 -1 6 -1") == (6, -1, 6, -1)
    assert parse_mask("none") == parse_mask("") == ()
    assert mask_dims(make_bool_mask(7, -1)) == (7, -1) and mask_dims([False, True, True]) == (-1, 2)
    assert mask_text((6, -1, 6, -1)) == "6,-1,6,-1" and mask_text(()) == "none"
    for bad, why in (("6,x", "whole numbers"), ("6,0,1", "0 is not a run length")):
        with pytest.raises(ValueError, match=why):
            parse_mask(bad)


def test_aloha_conversion_is_openpis_adapt_to_pi():
    rng = np.random.default_rng(0)
    t = RobotTransforms((), "aloha")
    state = rng.uniform(-1, 1, 14)
    state[[6, 13]] = rng.uniform(0, 1, 2)  # gripper readings, normalized linear positions
    np.testing.assert_allclose(t.state_in(state), aloha_decode_state(state), rtol=0, atol=1e-12)
    actions = rng.normal(size=(10, 14))
    np.testing.assert_allclose(t.actions_out(actions, state), aloha_encode_actions(actions), rtol=0, atol=1e-12)
    np.testing.assert_allclose(t.actions_in(t.actions_out(actions, state), state), actions, atol=1e-12)
    assert t.label == "aloha conversion"


@pytest.mark.parametrize("name", ["pi0_aloha", "pi05_aloha", "pi0_libero", "pi05_droid", "pi05_libero"])
def test_the_runners_chain_gives_openpis_actions(name):
    """The runner's steps (conversion, normalize; un-normalize, absolute, conversion back) with each named config's
    transforms, for random statistics, states and model outputs: openpi's output chain, to float precision."""
    from openpi_reference import model_state, robot_actions

    cfg = get_policy_config(name)
    rng = np.random.default_rng(1)
    dim = 14 if "aloha" in name else 8
    mean, std = rng.normal(size=dim), rng.uniform(0.2, 2.0, dim)
    stats = {k: NormStats(mean + i, std, mean - 2 * std, mean + 2 * std) for i, k in enumerate(("state", "actions"))}
    norm = Normalizer(stats, "quantile" if cfg.pi05 else "mean_std", 32, cfg.action_dim)
    t = RobotTransforms(cfg.delta_action_mask, cfg.conversion)
    for _ in range(5):
        state = rng.uniform(-1, 1, dim)
        if "aloha" in name:
            state[[6, 13]] = rng.uniform(0, 1, 2)
        model_out = rng.normal(size=(cfg.action_horizon, 32)).astype(np.float32)
        converted = t.state_in(state)
        np.testing.assert_allclose(norm.normalize_state(converted), model_state(name, state, stats), atol=1e-6)
        ours = t.actions_out(norm.unnormalize_actions(model_out), converted)
        theirs = robot_actions(name, model_out, state, stats)
        assert ours.shape == theirs.shape == (cfg.action_horizon, cfg.action_dim)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ROBOTS[name][2] is None or np.abs(theirs - robot_actions(name, model_out, state * 0, stats)).max() > 0.1


def test_actions_in_inverts_actions_out_for_real_time_chunking():
    rng = np.random.default_rng(2)
    for t in (RobotTransforms((6, -1, 6, -1), "aloha"), RobotTransforms((7, -1)), RobotTransforms()):
        state = rng.uniform(0.1, 0.9, 14)
        actions = rng.normal(size=(5, 14 if t.conversion == "aloha" else 8))
        back = t.actions_in(t.actions_out(actions, state), state)
        np.testing.assert_allclose(back, actions, atol=1e-12)
    t = RobotTransforms((2, -1, 1))
    np.testing.assert_array_equal(t.actions_out(np.zeros((1, 5)), np.arange(1.0, 6.0)), [[1, 2, 0, 4, 0]])
    assert t.label == "delta actions 2,-1,1" and RobotTransforms().identity and not t.identity


def test_transforms_that_do_not_fit_the_robot_are_one_line_errors():
    RobotTransforms((6, -1, 6, -1), "aloha").check(14, 14)
    RobotTransforms((7, -1)).check(8, 8)
    cases = [(RobotTransforms((), "aloha"), 8, 8, "the aloha conversion needs 14 state and action dims, got 8 state"),
             (RobotTransforms((7, -1)), 8, 6, "makes dim 6 relative, but there are only 6 robot action dims"),
             (RobotTransforms((9,)), 7, 9, "only 7 robot state dims")]
    for t, state_dim, action_dim, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            t.check(state_dim, action_dim)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="robot conversion 'trossen' is not one of none, aloha"):
        RobotTransforms((), "trossen")


RUNNER_CASES = {"pi0_aloha": ("tiny", 14, 14), "pi05_droid": ("tiny05", 8, 8), "pi05_libero": ("tiny05", 8, 7)}


@pytest.mark.parametrize("name", sorted(RUNNER_CASES))
def test_a_runner_with_a_named_config_answers_what_openpis_chain_gives(name, tmp_path):
    """build_runner with policy_config: the chunk's shape is the config's, the state the model gets and the actions
    the robot gets are openpi's (test/openpi_reference.py) for random statistics, states and model outputs."""
    from openpi_reference import model_state, robot_actions
    from peers import random_stats

    from pi_policy.model.normalize import save_norm_stats
    from pi_policy.observation import Observation
    from pi_policy.runtime import build_runner
    from pi_policy.runtime.spec import RunnerSpec

    preset, state_dim, action_dim = RUNNER_CASES[name]
    stats = {"state": random_stats(state_dim, 1), "actions": random_stats(action_dim, 2)}
    save_norm_stats(tmp_path / "norm_stats.json", stats)
    runner = build_runner(RunnerSpec(preset=preset, policy_config=name, norm_stats=str(tmp_path / "norm_stats.json"),
                                     progress=False))
    cfg = get_policy_config(name)
    assert (runner.horizon, runner.action_dim, runner.cfg.max_token_len) == (cfg.action_horizon, action_dim, 200
                                                                            if cfg.pi05 else 48)
    rng = np.random.default_rng(3)
    tokens = []
    for _ in range(3):
        state = stats["state"].mean + stats["state"].std * rng.normal(size=state_dim)
        if name == "pi0_aloha":
            state[[6, 13]] = rng.uniform(0, 1, 2)
        images = {c: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for c in runner.camera_names}
        noise = rng.normal(size=(cfg.action_horizon, 32)).astype(np.float32)
        out = runner.infer(Observation(images, state, "pick up the cup"), noise).actions
        raw = runner.buf.actions[0].numpy()  # the model's output, before un-normalization
        assert out.shape == (cfg.action_horizon, action_dim) and out.dtype == np.float32
        np.testing.assert_allclose(out, robot_actions(name, raw, state, stats), rtol=1e-5, atol=1e-5)
        if not cfg.pi05:
            np.testing.assert_allclose(runner.buf.state[0].numpy(), model_state(name, state, stats), atol=1e-6)
        tokens.append(runner.buf.tokens[0].numpy().copy())
    same = all(np.array_equal(t, tokens[0]) for t in tokens)
    assert same == (name != "pi05_droid")  # pi05_droid writes the state into the prompt; pi05_libero does not


def test_real_time_chunking_continues_a_chunk_through_the_transforms(tmp_path):
    """The executing chunk goes back to the model through the inverse chain (conversion back, deltas from the new
    state, normalize): with inpainting, the steps executed before the new chunk arrives come out in robot units as
    they went in."""
    from peers import random_stats

    from pi_policy.model.normalize import save_norm_stats
    from pi_policy.observation import Observation
    from pi_policy.runtime import build_runner
    from pi_policy.runtime.options import RTCSettings
    from pi_policy.runtime.spec import RunnerSpec

    save_norm_stats(tmp_path / "norm_stats.json", {"state": random_stats(14, 1), "actions": random_stats(14, 2)})
    runner = build_runner(RunnerSpec(preset="tiny", policy_config="pi0_aloha", progress=False, warmup=False,
                                     norm_stats=str(tmp_path / "norm_stats.json"), rtc=RTCSettings("inpaint")))
    rng = np.random.default_rng(5)
    state = rng.uniform(0.1, 0.9, 14)
    obs = Observation({c: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for c in runner.camera_names}, state, "")
    prev = runner.infer(obs).actions[5:]  # the rest of the chunk being executed, in the robot's units
    out = runner.infer(Observation(obs.images, state + 0.05, ""), prev_chunk=prev, delay=4).actions
    np.testing.assert_allclose(out[:4], prev[:4], rtol=1e-4, atol=1e-4)
    assert np.abs(out[4:10] - prev[4:10]).max() > 1e-3  # the rest is the new plan


def test_a_given_model_keeps_its_shape_and_refuses_settings_that_change_it():
    from pi_policy.model import PiModel, get_config, init_random
    from pi_policy.runtime import build_runner

    model = init_random(PiModel(get_config("tiny", horizon=12, num_steps=3)))
    runner = build_runner(model=model, progress=False, warmup=False)
    assert (runner.horizon, runner.policy.settings["action_horizon"].origin) == (12, "preset tiny")
    with pytest.raises(ValueError, match="the model is built for horizon 12, num_steps 3.* the settings say horizon "
                                         "10, num_steps 3"):
        build_runner(model=model, policy_config="pi0_droid", progress=False, warmup=False)


def test_a_batch_of_robots_each_get_their_own_states_transforms(tmp_path):
    """infer_batch (pi-policy serve's batching): each row is made absolute with its own robot's state, and equals
    that robot's chunk alone."""
    from peers import random_stats

    from pi_policy.model.normalize import save_norm_stats
    from pi_policy.observation import Observation
    from pi_policy.runtime import build_runner
    from pi_policy.runtime.spec import RunnerSpec

    save_norm_stats(tmp_path / "norm_stats.json", {"state": random_stats(14, 1), "actions": random_stats(14, 2)})
    runner = build_runner(RunnerSpec(preset="tiny", policy_config="pi0_aloha", progress=False, warmup=False,
                                     norm_stats=str(tmp_path / "norm_stats.json"), batch_sizes=(1, 4)))
    rng = np.random.default_rng(6)
    observations = [Observation({c: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for c in runner.camera_names},
                                rng.uniform(0.1, 0.9, 14), "") for _ in range(3)]
    noises = [rng.normal(size=(50, 32)).astype(np.float32) for _ in observations]
    batched = runner.infer_batch(observations, noises)
    for obs, noise, out in zip(observations, noises, batched, strict=True):
        np.testing.assert_allclose(out.actions, runner.infer(obs, noise).actions, rtol=1e-4, atol=1e-4)
