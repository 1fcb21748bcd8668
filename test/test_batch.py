"""Several robots in one inference: infer_batch against infer per row, padding, bad rows, and `bench --batch`."""

import json

import numpy as np
import pytest
import torch

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.runtime import build_runner
from pi_policy.runtime.options import RTCSettings
from pi_policy.runtime.runner import RowError, batch_buckets
from pi_policy.tools.cli import main
from pi_policy.tools.synthetic import synthetic_observation

# MKL's sgemm rounds a product of fewer than 4 rows differently from a taller one, and a few projections take one
# row per robot (pi0's state token; pi0.5's time MLP and adaptive norms): a row batched with others can differ from
# the same row alone in the last bit. Crossed or stale rows differ by O(1).
ROUNDING = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["tiny", "tiny05"])
def runner(request):
    return build_runner(preset=request.param, progress=False, seed=1, batch_sizes=(2, 4))


def robots(n: int, seed: int = 0):
    """n robots, each with its own cameras (some missing, various sizes), state, prompt and noise."""
    obs = [synthetic_observation(DEFAULT_CAMERAS[: 1 + (seed + i) % 3], 40 + 24 * i, state_dim=7, seed=seed + i)
           for i in range(n)]
    for i, o in enumerate(obs):
        o.prompt = ["pick up the cup", "fold the towel", "open the drawer"][(seed + i) % 3]
    noises = [np.random.default_rng(seed + 100 + i).standard_normal((50, 32)).astype(np.float32) for i in range(n)]
    return obs, noises


def test_buckets_are_sorted_with_one_and_bad_sizes_are_refused():
    assert batch_buckets((8, 2, 4, 2)) == (1, 2, 4, 8)
    for bad in ((0,), (2.0,), (True,)):
        with pytest.raises(ValueError, match="batch sizes must be whole numbers >= 1"):
            batch_buckets(bad)


def test_each_row_of_a_batch_is_the_robots_own_unbatched_chunk(runner):
    obs, noises = robots(4)
    batched = runner.infer_batch(obs, noises)
    assert len(batched) == 4
    for o, n, out in zip(obs, noises, batched, strict=True):
        alone = runner.infer(o, n).actions
        assert out.actions.shape == alone.shape == (50, 32)
        np.testing.assert_allclose(out.actions, alone, rtol=0, atol=ROUNDING)
    assert set(batched[0].latency.stages_ms) == {"vision", "embed_prefix", "prefill", "denoise"}
    # rows are independent: swapping two robots swaps their chunks, bit for bit
    swapped = runner.infer_batch([obs[1], obs[0], *obs[2:]], [noises[1], noises[0], *noises[2:]])
    np.testing.assert_array_equal(swapped[0].actions, batched[1].actions)
    np.testing.assert_array_equal(swapped[1].actions, batched[0].actions)


def test_a_partial_batch_runs_in_the_next_bucket_up_and_its_padding_changes_nothing(runner):
    obs, noises = robots(4, seed=7)
    three = runner.infer_batch(obs[:3], noises[:3])  # bucket 4, one padding row
    four = runner.infer_batch(obs, noises)
    assert runner.bucket_for(3) == 4 and runner.bucket_for(2) == 2 and runner.bucket_for(1) == 1
    for a, b in zip(three, four[:3], strict=False):
        np.testing.assert_array_equal(a.actions, b.actions)
    assert np.isfinite(runner.buckets[4].buf.actions.numpy()).all()  # the padding row's too


def test_more_robots_than_the_largest_bucket_and_a_bad_row_are_clear_errors(runner):
    obs, noises = robots(5)
    with pytest.raises(ValueError, match="5 observations in one batch; this runner holds at most 4"):
        runner.infer_batch(obs, noises)
    obs[2].state = np.array([0.0, np.nan, 0.0])
    with pytest.raises(RowError, match="NaN") as err:
        runner.infer_batch(obs[:4], noises[:4])
    assert err.value.row == 2
    noises[1] = np.zeros((3, 3), np.float32)
    with pytest.raises(RowError, match="noise must have shape") as err:
        runner.infer_batch(obs[:2], noises[:2])
    assert err.value.row == 1
    with pytest.raises(ValueError, match="2 observations but 1 noises"):
        runner.infer_batch(obs[:2], noises[:1])
    assert runner.infer_batch([]) == []
    good, good_noise = robots(2)
    assert all(np.isfinite(o.actions).all() for o in runner.infer_batch(good, good_noise))  # still serving


def test_without_noise_each_row_draws_its_own(runner):
    obs, _ = robots(1)
    a, b = runner.infer_batch(obs * 2)
    assert not np.array_equal(a.actions, b.actions)


def test_real_time_chunking_runs_one_robot_at_a_time():
    with pytest.raises(ValueError, match="real-time chunking runs one robot at a time"):
        build_runner(preset="tiny", progress=False, warmup=False, rtc=RTCSettings("inpaint"), batch_sizes=(4,))


def test_bench_batch_reports_the_time_per_robot_and_the_batched_vs_alone_error(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--batch", "3", "--iters", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "batch of 3 robots" in text and "/robot" in text and "robot inferences per second" in text
    assert "robot 0 batched vs alone" in text
    result = json.loads(out.read_text())
    assert result["workload"]["batch"] == 3
    entry = result["backends"]["bf16"]
    assert entry["batch_vs_single"]["max_diff"] <= ROUNDING
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--batch", "2", "--rtc", "off", "--iters", "1"]) == 2
    assert "real-time chunking runs at batch 1" in capsys.readouterr().err


def test_batch_sizes_are_a_runner_setting_a_node_parameter_and_a_flag():
    from pi_policy.node.params import ParamError, params_from_dict
    from pi_policy.runtime.spec import RunnerSpec, SpecError
    from pi_policy.tools.flags import parse_batch_sizes

    params = params_from_dict({"preset": "tiny", "joint_names": ["a"], "batch_sizes": [1, 2, 4]})
    assert params.runner_spec().batch_sizes == (1, 2, 4)
    assert params_from_dict({"preset": "tiny", "joint_names": ["a"]}).runner_spec().batch_sizes == (1,)  # one robot
    with pytest.raises(ParamError, match="parameter 'batch_sizes' must be a list of integers"):
        params_from_dict({"preset": "tiny", "joint_names": ["a"], "batch_sizes": [1, 2.5]})
    assert parse_batch_sizes("1,2,8") == (1, 2, 8)
    for spec, message in [(RunnerSpec(batch_sizes=(0, 2)), "batch_sizes must be whole numbers >= 1"),
                          (RunnerSpec(batch_sizes=(4,), rtc=RTCSettings("guided")), "real-time chunking runs one"),
                          (RunnerSpec(batch_sizes=(2,), backend="tensorrt", engine_path="e.engine"),
                           "the TensorRT prefill engine runs batch 1")]:
        with pytest.raises(SpecError, match=message):
            spec.validate()
