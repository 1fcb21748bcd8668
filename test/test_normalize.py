"""Normalization stats: openpi's norm_stats.json layout, mean/std and quantile formulas, padding, bad input."""

import json

import numpy as np
import pytest

from pi_policy.model.normalize import (
    Normalizer,
    NormStats,
    default_mode,
    identity_stats,
    load_norm_stats,
    save_norm_stats,
)

OPENPI_LAYOUT = {
    "norm_stats": {
        "state": {"mean": [0.5, -1.0, 2.0], "std": [2.0, 0.5, 0.0], "q01": [-3.0, -2.0, 2.0],
                  "q99": [4.0, 0.0, 2.0]},
        "actions": {"mean": [1.0, 0.0, -1.0, 3.0], "std": [0.1, 1.0, 2.0, 4.0],
                    "q01": [0.5, -2.0, -5.0, -1.0], "q99": [1.5, 2.0, 3.0, 11.0]},
    }
}


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps(OPENPI_LAYOUT))
    return path


def test_load_openpi_layout_file_or_directory(stats_file):
    for p in (stats_file, stats_file.parent):
        stats = load_norm_stats(p)
        assert set(stats) == {"state", "actions"}
        assert stats["state"].dim == 3 and stats["actions"].dim == 4
        np.testing.assert_array_equal(stats["actions"].q99, [1.5, 2.0, 3.0, 11.0])


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=7), rng.uniform(0.1, 2, size=7)
    stats = {"state": NormStats(mean, std, mean - 2 * std, mean + 2 * std), "actions": NormStats(mean, std)}
    save_norm_stats(tmp_path / "sub", stats)  # not yet a directory: written as that file name
    save_norm_stats(tmp_path, stats)  # a directory: written to norm_stats.json inside
    for p in (tmp_path / "sub", tmp_path / "norm_stats.json"):
        back = load_norm_stats(p)
        np.testing.assert_array_equal(back["state"].q01, stats["state"].q01)
        np.testing.assert_array_equal(back["actions"].std, std)
        assert back["actions"].q01 is None


def test_mean_std_formula_and_padding(stats_file):
    norm = Normalizer.from_file(stats_file, mode="mean_std", model_dim=32)
    assert norm.state_dim == 3 and norm.action_dim == 4
    state = np.array([1.0, 0.0, 2.0])
    x = norm.normalize_state(state)
    assert x.shape == (32,) and x.dtype == np.float32
    np.testing.assert_allclose(x[:3], [(1 - 0.5) / (2 + 1e-6), (0 + 1) / (0.5 + 1e-6), 0.0], rtol=1e-6)
    assert (x[3:] == 0).all()
    assert norm.normalize_state(state, pad=False).shape == (3,)

    a = np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    out = norm.unnormalize_actions(a)
    assert out.shape == (50, 4) and out.dtype == np.float32
    s = OPENPI_LAYOUT["norm_stats"]["actions"]
    np.testing.assert_allclose(out, a[:, :4] * (np.array(s["std"]) + 1e-6) + s["mean"], rtol=1e-6)


def test_quantile_formula_maps_q01_q99_to_unit_range(stats_file):
    norm = Normalizer.from_file(stats_file, mode="quantile", model_dim=8, action_dim=2)
    s = OPENPI_LAYOUT["norm_stats"]["state"]
    q01, q99 = np.array(s["q01"]), np.array(s["q99"])
    np.testing.assert_allclose(norm.normalize_state(q01)[:2], [-1, -1], atol=1e-6)
    np.testing.assert_allclose(norm.normalize_state(q99)[:2], [1, 1], atol=1e-6)
    x = np.array([0.3, -0.7, 2.5])
    ref = (x - q01) / (q99 - q01 + 1e-6) * 2 - 1  # openpi's _normalize_quantile, constant dim included
    np.testing.assert_allclose(norm.normalize_state(x)[:3], ref, rtol=1e-5)

    a = np.zeros((5, 8))
    a[:, 0], a[:, 1] = -1.0, 1.0
    out = norm.unnormalize_actions(a)
    assert out.shape == (5, 2)
    np.testing.assert_allclose(out[0], [0.5, 2.0], atol=1e-5)
    # round trip through openpi's unnormalize formula
    qa = OPENPI_LAYOUT["norm_stats"]["actions"]
    y = np.random.default_rng(2).uniform(-1.5, 1.5, size=(3, 8))
    ref = (y[:, :2] + 1) / 2 * (np.array(qa["q99"][:2]) - qa["q01"][:2] + 1e-6) + qa["q01"][:2]
    np.testing.assert_allclose(norm.unnormalize_actions(y), ref, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
def test_actions_given_back_to_the_model_round_trip(stats_file, mode):
    norm = Normalizer.from_file(stats_file, mode=mode, model_dim=8, action_dim=3)
    model = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    robot = norm.unnormalize_actions(model)
    back = norm.normalize_actions(robot)
    assert back.shape == (5, 8) and back.dtype == np.float32 and not back[:, 3:].any()  # padded dims zero
    np.testing.assert_allclose(back[:, :3], model[:, :3], atol=1e-5)
    with pytest.raises(ValueError, match="last dim 3"):
        norm.normalize_actions(np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        norm.normalize_actions(np.full((2, 3), np.nan))


def test_identity_when_no_stats(captured_log):
    with captured_log("pi_policy.model.normalize") as log:
        norm = Normalizer(None, model_dim=32, action_dim=6)
    assert "no normalization stats" in log.text
    state = np.arange(6, dtype=np.float64)
    np.testing.assert_array_equal(norm.normalize_state(state)[:6], state)
    a = np.random.default_rng(3).normal(size=(50, 32))
    np.testing.assert_allclose(norm.unnormalize_actions(a), a[:, :6], rtol=1e-6)
    for mode in ("mean_std", "quantile"):
        n = Normalizer(identity_stats(6), mode=mode)
        np.testing.assert_allclose(n.normalize_state(state)[:6], state, atol=1e-5)


def test_non_finite_state_and_actions_name_indices(stats_file):
    norm = Normalizer.from_file(stats_file)
    with pytest.raises(ValueError, match=r"state has NaN/inf at indices \[0, 2\]"):
        norm.normalize_state(np.array([np.nan, 0.0, np.inf]))
    a = np.zeros((50, 32))
    a[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"model actions has NaN/inf at indices \[\(7, 1\)\]"):
        norm.unnormalize_actions(a)
    a[7, 1] = 0
    a[7, 20] = np.nan  # beyond the robot's dims: not used, not an error
    assert np.isfinite(norm.unnormalize_actions(a)).all()


def test_shape_mismatches(stats_file, captured_log):
    norm = Normalizer.from_file(stats_file)
    with pytest.raises(ValueError, match="4 dims but the norm stats describe 3"):
        norm.normalize_state(np.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        norm.normalize_state(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="last dim 32"):
        norm.unnormalize_actions(np.zeros((50, 7)))
    with captured_log("pi_policy.model.normalize") as log:
        assert norm.normalize_state(np.zeros(2)).shape == (32,)
    assert "first 2" in log.text
    with pytest.raises(ValueError, match="more than the model's 2"):
        Normalizer(load_norm_stats(stats_file), model_dim=2)
    with pytest.raises(ValueError, match="action_dim 5 > 4"):
        Normalizer(load_norm_stats(stats_file), action_dim=5)
    with pytest.raises(ValueError, match="mode"):
        Normalizer(None, mode="minmax")


def _write(tmp_path, obj):
    p = tmp_path / "norm_stats.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize("obj,match", [
    ("{not json", "not valid JSON"),
    ([1, 2], "top level"),
    ({"state": {}}, "top level"),
    ({"norm_stats": {"state": OPENPI_LAYOUT["norm_stats"]["state"]}}, r"lacks \['actions'\]"),
    ({"norm_stats": {"state": {"mean": [0.0]}, "actions": {"mean": [0.0], "std": [1.0]}}}, r"missing \['std'\]"),
    ({"norm_stats": {"state": {"mean": [0.0, 1.0], "std": [1.0]}, "actions": {"mean": [0.0], "std": [1.0]}}},
     "different lengths"),
    ({"norm_stats": {"state": {"mean": [0.0, "NaN"], "std": [1.0, 1.0]},
                     "actions": {"mean": [0.0], "std": [1.0]}}}, r"state.*mean: NaN/inf at indices \[1\]"),
    ({"norm_stats": {"state": {"mean": [0.0], "std": [-1.0]}, "actions": {"mean": [0.0], "std": [1.0]}}},
     "negative std"),
    ({"norm_stats": {"state": {"mean": [0.0], "std": [1.0], "q01": [1.0], "q99": [0.0]},
                     "actions": {"mean": [0.0], "std": [1.0]}}}, "q99 < q01"),
    ({"norm_stats": {"state": {"mean": "abc", "std": [1.0]}, "actions": {"mean": [0.0], "std": [1.0]}}},
     "mean"),
])
def test_malformed_files(tmp_path, obj, match):
    with pytest.raises(ValueError, match=match):
        load_norm_stats(_write(tmp_path, obj))


def test_missing_file_and_quantile_without_quantiles(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_norm_stats(tmp_path / "nope.json")
    no_q = {"state": NormStats([0.0], [1.0]), "actions": NormStats([0.0], [1.0])}
    with pytest.raises(ValueError, match="q01/q99"):
        Normalizer(no_q, mode="quantile")
    assert default_mode("pi0") == "mean_std" and default_mode("pi05") == "quantile"


@pytest.mark.parametrize("modes", [{"STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
                                   {"STATE": "QUANTILES", "ACTION": "QUANTILES"},
                                   {"STATE": "MIN_MAX", "ACTION": "QUANTILES"}])
def test_lerobot_processor_statistics_with_lerobots_formulas(tmp_path, modes):
    from peers import random_stats, write_lerobot_processors

    from pi_policy.model.lerobot_stats import load_lerobot_stats

    stats = {"state": random_stats(6, 1), "actions": random_stats(5, 2)}
    for s in stats.values():  # one constant dimension: LeRobot adds eps only where hi == lo
        s.q99[0], s.max[0] = s.q01[0], s.min[0]
    write_lerobot_processors(tmp_path, stats, modes)
    loaded = load_lerobot_stats(tmp_path)
    assert loaded.convention == "lerobot" and loaded.eps == 1e-8 and "policy_postprocessor.json" in loaded.origin
    norm = Normalizer.from_statistics(loaded, "mean_std", model_dim=32)
    assert norm.state_dim == 6 and norm.action_dim == 5

    def lerobot(v, s, mode, inverse):  # NormalizerProcessorStep / UnnormalizerProcessorStep, written out
        if mode == "MEAN_STD":
            return v * s.std + s.mean if inverse else (v - s.mean) / (s.std + 1e-8)
        lo, hi = (s.q01, s.q99) if mode == "QUANTILES" else (s.min, s.max)
        denom = np.where(hi - lo == 0, 1e-8, hi - lo)
        return (v + 1.0) * denom / 2.0 + lo if inverse else 2.0 * (v - lo) / denom - 1.0

    rng = np.random.default_rng(0)
    x = loaded.stats["state"].mean + rng.normal(size=6)
    x[0] = loaded.stats["state"].q01[0] + 1e-9  # on the constant dimension
    y = rng.uniform(-1.2, 1.2, size=(50, 32))
    got = norm.normalize_state(x, pad=False)
    want = lerobot(x, loaded.stats["state"], modes["STATE"], False)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(norm.unnormalize_actions(y), lerobot(y[:, :5], loaded.stats["actions"],
                                                                    modes["ACTION"], True), rtol=1e-6, atol=1e-6)


def test_lerobot_processor_files_that_cannot_be_used(tmp_path):
    from peers import random_stats, write_lerobot_processors

    from pi_policy.model.lerobot_stats import load_lerobot_stats

    with pytest.raises(FileNotFoundError, match="policy_preprocessor.json"):
        load_lerobot_stats(tmp_path)
    stats = {"state": random_stats(3, 1), "actions": random_stats(3, 2)}
    write_lerobot_processors(tmp_path, stats, {"STATE": "QUANTILE10", "ACTION": "MEAN_STD"})
    with pytest.raises(ValueError, match="QUANTILE10"):
        load_lerobot_stats(tmp_path)
    write_lerobot_processors(tmp_path, stats, {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    pre = json.loads((tmp_path / "policy_preprocessor.json").read_text())
    del pre["steps"][2]["state_file"]
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match="no state_file"):
        load_lerobot_stats(tmp_path)
    pre["steps"] = pre["steps"][:2]
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match="no 'normalizer_processor' step"):
        load_lerobot_stats(tmp_path)
