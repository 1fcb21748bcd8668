"""PolicyRunner: same actions as the model's own sample_actions, timings for every stage, clear input errors."""

import dataclasses

import numpy as np
import pytest
import torch

from pi_policy.cameras import DEFAULT_CAMERAS, CameraSet
from pi_policy.model.preprocess import resize_with_pad
from pi_policy.observation import STAGES, Observation
from pi_policy.runtime import build_runner
from pi_policy.tools.synthetic import synthetic_observation


@pytest.fixture(scope="module", params=["tiny", "tiny05"])
def runner(request):
    return build_runner(preset=request.param, progress=False, seed=1)


def model_inputs(runner, obs, noise):
    """What sample_actions takes, built by hand from the public preprocessing pieces."""
    cfg = runner.cfg
    s = cfg.vision.image_size
    imgs = np.zeros((cfg.num_cameras, s, s, 3), np.uint8)
    masks = np.zeros(cfg.num_cameras, bool)
    for i, name in enumerate(runner.camera_names):
        if name in obs.images:
            imgs[i], masks[i] = resize_with_pad(obs.images[name], s), True
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()[None] * (2 / 255) - 1
    state = runner.normalizer.normalize_state(obs.state, pad=False)
    tokens, tmask = (runner.tokenizer.tokenize(obs.prompt, state) if cfg.pi05
                     else runner.tokenizer.tokenize(obs.prompt))
    padded = np.zeros(cfg.action_dim, np.float32)
    padded[: state.size] = state
    return (images, torch.from_numpy(masks)[None], torch.from_numpy(tokens.astype(np.int64))[None],
            torch.from_numpy(tmask)[None], torch.from_numpy(padded)[None], torch.from_numpy(noise)[None])


def test_runner_equals_sample_actions_and_reports_every_stage(runner):
    cfg = runner.cfg
    obs = synthetic_observation(DEFAULT_CAMERAS[:2], 100, state_dim=7, seed=3)  # third camera missing, resized
    noise = np.random.default_rng(0).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    out = runner.infer(obs, noise=noise)
    expected = runner.model.sample_actions(*model_inputs(runner, obs, noise))[0].numpy()
    np.testing.assert_allclose(out.actions, expected, atol=1e-5)
    assert set(out.latency.stages_ms) == set(STAGES)
    assert all(v > 0 for v in out.latency.stages_ms.values())
    assert out.latency.host_ms >= out.latency.total_ms * 0.5 and out.latency.hz > 0
    assert set(out.latency.backends) == set(STAGES)


def test_same_noise_same_actions_and_fresh_noise_differs(runner):
    obs = synthetic_observation(DEFAULT_CAMERAS, 56, seed=4)
    noise = np.ones((runner.cfg.horizon, runner.cfg.action_dim), np.float32)
    a = runner.infer(obs, noise=noise).actions
    b = runner.infer(obs, noise=noise).actions
    np.testing.assert_array_equal(a, b)
    c, d = runner.infer(obs).actions, runner.infer(obs).actions
    assert not np.array_equal(c, d)


def test_two_runners_with_one_seed_agree():
    obs = synthetic_observation(DEFAULT_CAMERAS, 56, seed=5)
    a = build_runner(preset="tiny", progress=False, seed=7).infer(obs).actions
    b = build_runner(preset="tiny", progress=False, seed=7).infer(obs).actions
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (lambda o: o.images.update(base_0_rgb=np.zeros((10, 10, 5), np.uint8)), "camera base_0_rgb"),
    (lambda o: o.images.update(base_0_rgb=np.zeros((0, 10, 3), np.uint8)), "empty"),
    (lambda o: o.images.update(base_0_rgb=np.full((8, 8, 3), np.nan, np.float32)), "NaN"),
    (lambda o: o.images.update(top_camera=np.zeros((8, 8, 3), np.uint8)), "unknown camera"),
    (lambda o: setattr(o, "state", np.array([0.0, np.nan])), "NaN"),
    (lambda o: setattr(o, "state", np.zeros((2, 2))), "1-D"),
    (lambda o: setattr(o, "state", np.zeros(40)), "more than"),
    (lambda o: setattr(o, "prompt", None), "prompt"),
])
def test_bad_inputs_get_a_clear_error(runner, bad, match):
    obs = synthetic_observation(DEFAULT_CAMERAS, 56, seed=6)
    bad(obs)
    with pytest.raises(ValueError, match=match):
        runner.infer(obs)
    assert np.isfinite(runner.infer(synthetic_observation(DEFAULT_CAMERAS, 56)).actions).all()  # still serving


def test_wrong_noise_shape_is_refused(runner):
    with pytest.raises(ValueError, match="noise must have shape"):
        runner.infer(Observation({}, np.zeros(3), "x"), noise=np.zeros((3, 3), np.float32))


def test_a_failing_compiler_falls_back_to_the_plain_stages_visibly():
    r = build_runner(preset="tiny", progress=False, warmup=False)
    expected = r.infer(synthetic_observation(DEFAULT_CAMERAS, 56), noise=np.zeros((50, 32), np.float32)).actions

    def broken(*args, **kwargs):
        raise RuntimeError("no Triton on this platform")

    r.velocity_fn = broken  # what a compiled stage looks like when the compiler fails
    r.choices["denoise"] = dataclasses.replace(r.choices["denoise"], compiled=True)
    r.warmup(progress=False)
    assert "torch.compile failed" in r.backend_note and "no Triton" in r.backend_note
    assert not r.backends["denoise"].endswith("-compiled") and not any(c.compiled for c in r.choices.values())
    got = r.infer(synthetic_observation(DEFAULT_CAMERAS, 56), noise=np.zeros((50, 32), np.float32)).actions
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
def test_a_two_camera_runner_has_two_view_buffers_and_the_masked_three_view_actions(preset):
    two = build_runner(preset=preset, cameras=CameraSet.of(["base_0_rgb", "right_wrist_0_rgb"]), progress=False,
                       seed=2)
    three = build_runner(preset=preset, progress=False, seed=2)
    cfg = two.cfg
    assert cfg.num_cameras == 2 and two.buf.images.shape[1] == 2
    assert two.buf.prefix_embs.shape[1] == 2 * cfg.vision.num_tokens + cfg.max_token_len
    assert three.buf.prefix_embs.shape[1] == 3 * cfg.vision.num_tokens + cfg.max_token_len
    obs = synthetic_observation(["base_0_rgb", "right_wrist_0_rgb"], 56, state_dim=7, seed=9)
    noise = np.random.default_rng(1).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    # RoPE positions count valid tokens only, so a masked camera and an absent one are the same computation
    np.testing.assert_allclose(two.infer(obs, noise=noise).actions, three.infer(obs, noise=noise).actions,
                               atol=1e-5)
    obs.images.pop("right_wrist_0_rgb")  # an optional camera dropping out at run time is masked in the 2-view graph
    assert np.isfinite(two.infer(obs).actions).all()


def test_node_params_serve_the_subscribed_cameras_in_model_order():
    from pi_policy.node.params import params_from_dict

    p = params_from_dict({"preset": "tiny", "joint_names": ["a"], "camera_names": ["right_wrist_0_rgb", "base_0_rgb"],
                          "camera_topics": ["r", "b"]})
    assert p.runner_spec().cameras.served == ("base_0_rgb", "right_wrist_0_rgb")
