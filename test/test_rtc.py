"""Real-time chunking in the denoise loop: off is today's loop bit for bit, inpaint holds the frozen prefix exactly,
guided pulls it toward the previous chunk as its weight grows; the weight schedules; the runner's checks."""

import math

import numpy as np
import pytest
import torch

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.model.pi0 import euler_times
from pi_policy.model.rtc import RTCInputs, prefix_weights
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.options import RTCSettings, parse_delay
from pi_policy.tools.synthetic import synthetic_observation

DELAY = 4


def test_prefix_weight_schedules():
    e = math.e - 1
    expected = {
        "zeros": [1, 1, 0, 0, 0, 0, 0, 0],
        "ones": [1, 1, 1, 1, 1, 1, 0, 0],
        "linear": [1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0],
        "exp": [1, 1] + [w * math.expm1(w) / e for w in (0.8, 0.6, 0.4, 0.2)] + [0, 0],
    }
    for schedule, want in expected.items():
        np.testing.assert_allclose(prefix_weights(2, 6, 8, schedule).numpy(), want, atol=1e-6, err_msg=schedule)
    # the frozen steps reach the delay even past the execution horizon, and stop at the chunk's end
    assert prefix_weights(7, 3, 8, "linear").tolist() == [1] * 7 + [0]
    assert prefix_weights(9, 3, 5, "exp").tolist() == [1] * 5
    assert prefix_weights(0, 0, 4, "ones").tolist() == [0] * 4
    with pytest.raises(ValueError, match="unknown prefix schedule"):
        prefix_weights(2, 6, 8, "cosine")


def test_settings_and_delay_are_checked():
    with pytest.raises(ValueError, match="rtc mode 'fast'"):
        RTCSettings("fast")
    with pytest.raises(ValueError, match="prefix schedule"):
        RTCSettings("inpaint", prefix_schedule="cos")
    with pytest.raises(ValueError, match="execution_horizon"):
        RTCSettings("inpaint", execution_horizon=0)
    with pytest.raises(ValueError, match="max_guidance_weight"):
        RTCSettings("guided", max_guidance_weight=-1.0)
    assert parse_delay("auto") is None and parse_delay("4") == 4 and parse_delay(" 0 ") == 0
    for bad in ("-1", "2.5", "soon", ""):
        with pytest.raises(ValueError, match="'auto' or a whole number"):
            parse_delay(bad)


@pytest.fixture(scope="module", params=["tiny", "tiny05"])
def model(request):
    return build_model(preset=request.param, seed=1)


@pytest.fixture(scope="module")
def denoise_inputs(model):
    """A KV cache and state for one observation, and the noise: what denoise takes."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    pad = torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    pad[:, -5:] = False
    embs = torch.randn(1, cfg.prefix_len, cfg.llm.width, generator=g)
    with torch.no_grad():
        cache = model.prefill(embs, pad)
    state = torch.randn(1, cfg.action_dim, generator=g)
    noise = torch.randn(1, cfg.horizon, cfg.action_dim, generator=g)
    prev = torch.randn(1, cfg.horizon, cfg.action_dim, generator=g)
    return cache, pad, state, noise, prev


def plain_euler(model, cache, pad, state, noise):
    """The denoise loop as it was before real-time chunking existed."""
    mask, cos, sin = model.suffix_attention(pad)
    x = noise.float()
    dt, times = euler_times(model.cfg.num_steps)
    for time in times:
        x = x + dt * model.velocity(x, torch.full((x.shape[0],), time), state, cache, mask, cos, sin)
    return x


def rtc_inputs(model, mode, prev, max_weight=5.0, delay=DELAY, schedule="exp"):
    w = prefix_weights(delay, 20, model.cfg.horizon, schedule)[:, None].expand(-1, model.cfg.action_dim)
    return RTCInputs(mode, prev, w.contiguous(), torch.tensor(max_weight))


@torch.no_grad()
def test_off_is_the_plain_loop_bit_for_bit(model, denoise_inputs):
    cache, pad, state, noise, _ = denoise_inputs
    assert torch.equal(model.denoise(cache, pad, state, noise), plain_euler(model, cache, pad, state, noise))


@torch.no_grad()
def test_inpaint_reproduces_the_frozen_prefix_exactly(model, denoise_inputs):
    cache, pad, state, noise, prev = denoise_inputs
    off = model.denoise(cache, pad, state, noise)
    out = model.denoise(cache, pad, state, noise, rtc=rtc_inputs(model, "inpaint", prev))
    assert torch.equal(out[:, :DELAY], prev[:, :DELAY])
    # past the execution horizon the chunk is the model's own; in between it leans toward prev
    np.testing.assert_allclose(out[:, 30:].numpy(), off[:, 30:].numpy(), atol=0.05)
    assert (out[:, DELAY:10] - prev[:, DELAY:10]).abs().mean() < (off[:, DELAY:10] - prev[:, DELAY:10]).abs().mean()
    # zero weights change nothing, bit for bit
    zero = RTCInputs("inpaint", prev, torch.zeros_like(prev[0]), torch.tensor(5.0))
    assert torch.equal(model.denoise(cache, pad, state, noise, rtc=zero), off)


@torch.no_grad()
def test_guided_moves_the_prefix_toward_the_previous_chunk_as_the_weight_grows(model, denoise_inputs):
    cache, pad, state, noise, prev = denoise_inputs
    off = model.denoise(cache, pad, state, noise)
    gaps = []
    for weight in (0.0, 1.0, 5.0):
        out = model.denoise(cache, pad, state, noise, rtc=rtc_inputs(model, "guided", prev, weight))
        if weight == 0.0:
            assert torch.equal(out, off)
        gaps.append((out[:, :DELAY] - prev[:, :DELAY]).abs().mean().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.2 * gaps[0], gaps


def test_guided_needs_autograd_through_the_velocity(model, denoise_inputs):
    cache, pad, state, noise, prev = denoise_inputs

    def no_grad_velocity(*args):
        with torch.no_grad():
            return model.velocity(*args)

    with pytest.raises(RuntimeError, match="grad"):
        model.denoise(cache, pad, state, noise, velocity=no_grad_velocity, rtc=rtc_inputs(model, "guided", prev))


@pytest.fixture(scope="module")
def runners(model):
    """One runner per mode on the same weights, without warm-up (CPU: nothing to capture)."""
    return {mode: build_runner(model=model, rtc=RTCSettings(mode), progress=False, warmup=False, seed=1)
            for mode in ("off", "inpaint", "guided")}


def test_runner_modes_without_a_previous_chunk_equal_off_exactly(runners, model):
    obs = synthetic_observation(DEFAULT_CAMERAS[: model.cfg.num_cameras], 56, state_dim=7, seed=2)
    noise = np.random.default_rng(3).standard_normal((model.cfg.horizon, model.cfg.action_dim)).astype(np.float32)
    plain = build_runner(model=model, progress=False, warmup=False, seed=1).infer(obs, noise=noise).actions
    for mode, runner in runners.items():
        np.testing.assert_array_equal(runner.infer(obs, noise=noise).actions, plain, err_msg=mode)
    assert runners["guided"].backends["denoise"].endswith("+rtc-guided")
    assert "rtc" not in runners["off"].backends["denoise"]


def test_runner_continues_a_previous_chunk_given_in_robot_units(runners, model):
    obs = synthetic_observation(DEFAULT_CAMERAS[: model.cfg.num_cameras], 56, state_dim=7, seed=2)
    h, a = model.cfg.horizon, model.cfg.action_dim
    noise = np.random.default_rng(3).standard_normal((h, a)).astype(np.float32)
    prev = np.random.default_rng(4).standard_normal((h - 5, a)).astype(np.float32)  # 5 steps already executed
    out = runners["inpaint"].infer(obs, noise=noise, prev_chunk=prev, delay=DELAY).actions
    np.testing.assert_array_equal(out[:DELAY], prev[:DELAY])
    guided = runners["guided"].infer(obs, noise=noise, prev_chunk=prev, delay=DELAY).actions
    off = runners["off"].infer(obs, noise=noise).actions
    assert np.abs(guided[:DELAY] - prev[:DELAY]).mean() < 0.2 * np.abs(off[:DELAY] - prev[:DELAY]).mean()
    # a short remainder guides only the steps it covers
    short = runners["inpaint"].infer(obs, noise=noise, prev_chunk=prev[:2], delay=DELAY).actions
    np.testing.assert_array_equal(short[:2], prev[:2])
    np.testing.assert_allclose(short[2:], off[2:], atol=0.5)


def test_runner_refuses_bad_previous_chunks(runners):
    obs = synthetic_observation(DEFAULT_CAMERAS[:1], 56, seed=2)
    a = runners["inpaint"].action_dim
    with pytest.raises(ValueError, match="real-time chunking off"):
        runners["off"].infer(obs, prev_chunk=np.zeros((10, a), np.float32), delay=2)
    with pytest.raises(ValueError, match="previous chunk must have shape"):
        runners["inpaint"].infer(obs, prev_chunk=np.zeros((10, a + 1), np.float32), delay=2)
    with pytest.raises(ValueError, match="delay must be"):
        runners["inpaint"].infer(obs, prev_chunk=np.zeros((10, a), np.float32), delay=-1)
    with pytest.raises(ValueError, match="NaN"):
        runners["guided"].infer(obs, prev_chunk=np.full((10, a), np.nan, np.float32), delay=2)
