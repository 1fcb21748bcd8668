"""The latest-message / max-age policy of ObservationAssembler."""

import numpy as np
import pytest

from pi_policy.cameras import CameraSet
from pi_policy.node.assembler import ObservationAssembler
from pi_policy.node.inputs import MessageError

CAMS = ["base", "left", "right"]


def img(value=0):
    return np.full((4, 6, 3), value, np.uint8)


def filled(required=None, t=10.0):
    a = ObservationAssembler(CameraSet.of(CAMS, CAMS, required), max_age_s=0.1, max_future_s=0.02, prompt="pick")
    for i, c in enumerate(CAMS):
        a.set_image(c, t - 0.01 * i, img(i))
    a.set_joints(t - 0.005, np.array([1.0, 2.0]))
    return a


def test_assembles_latest_and_stamps_with_oldest():
    a = filled()
    a.set_image("base", 10.03, img(42))  # newer frame replaces the old one
    r = a.assemble(10.05)
    assert r.ok and r.errors == [] and r.warnings == []
    obs = r.observation
    assert set(obs.images) == set(CAMS)
    assert obs.images["base"][0, 0, 0] == 42
    assert obs.stamp == pytest.approx(9.98)  # oldest input: the "right" camera
    assert r.age_s == pytest.approx(0.07)
    assert obs.prompt == "pick"
    np.testing.assert_array_equal(obs.state, [1.0, 2.0])
    assert obs.state.dtype == np.float32


def test_stale_required_camera_skips():
    a = filled()
    r = a.assemble(10.2)
    assert not r.ok and r.observation is None
    text = " | ".join(r.errors)
    assert "camera base is stale by 100 ms (age 200 ms" in text
    assert "joint state is stale" in text


def test_missing_required_camera_and_joints():
    a = ObservationAssembler(CameraSet.of(CAMS, CAMS), max_age_s=0.1)
    a.set_image("base", 1.0, img())
    r = a.assemble(1.0)
    assert not r.ok
    assert "no image yet from camera left" in r.errors
    assert "no image yet from camera right" in r.errors
    assert "no joint state yet" in r.errors


def test_optional_camera_missing_or_stale_is_masked_with_warning():
    a = filled(required=["base"])
    a.set_image("right", 9.0, img())  # stale
    r = a.assemble(10.0)
    assert r.ok
    assert set(r.observation.images) == {"base", "left"}
    assert any("camera right is stale" in w and "masked" in w for w in r.warnings)
    assert r.observation.stamp == pytest.approx(9.99)  # the stale camera's stamp is not used

    b = ObservationAssembler(CameraSet.of(CAMS, CAMS, ["base"]), max_age_s=0.1)
    b.set_image("base", 1.0, img())
    b.set_joints(1.0, [0.0])
    r = b.assemble(1.0)
    assert r.ok and set(r.observation.images) == {"base"}
    assert len(r.warnings) == 2


def test_future_and_zero_stamps():
    a = filled()
    a.set_image("left", 10.5, img())
    a.set_image("right", 0.0, img())
    r = a.assemble(10.0)
    assert not r.ok
    assert any("camera left stamp is 500 ms in the future" in e for e in r.errors)
    assert any("camera right has a zero stamp" in e for e in r.errors)
    # small skew within max_future_s is fine
    a.set_image("left", 10.01, img())
    a.set_image("right", 10.0, img())
    assert a.assemble(10.0).ok


def test_new_data_flag():
    a = filled()
    assert a.has_new_data()
    assert a.assemble(10.0).ok
    assert not a.has_new_data()
    a.set_image("base", 10.01, img())
    assert a.has_new_data()
    a.set_prompt("place")
    assert a.assemble(10.02).observation.prompt == "place"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a: a.set_image("nope", 1.0, img()), "unknown camera 'nope'"),
        (lambda a: a.set_image("base", float("nan"), img()), "not finite"),
        (lambda a: a.set_image("base", None, img()), "number of seconds"),
        (lambda a: a.set_image("base", 1.0, np.zeros((4, 4), np.uint8)), "HxWx3 uint8"),
        (lambda a: a.set_image("base", 1.0, np.zeros((4, 4, 3), np.float32)), "HxWx3 uint8"),
        (lambda a: a.set_joints(1.0, [0.0, float("nan")]), "non-finite"),
        (lambda a: a.set_joints(1.0, ["x"]), "vector of numbers"),
        (lambda a: a.set_prompt(None), "prompt must be a string"),
    ],
)
def test_bad_inputs_raise_and_keep_previous(call, match):
    a = filled()
    with pytest.raises(MessageError, match=match):
        call(a)
    r = a.assemble(10.0)
    assert r.ok and r.observation.prompt == "pick"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cameras": CameraSet((), ())},
        {"cameras": CameraSet(("a", "a"), ("a", "a"))},
        {"cameras": CameraSet(("a",), ("a",), ("b",))},
        {"cameras": CameraSet(("a",), ("a",)), "max_age_s": 0.0},
        {"cameras": CameraSet(("a",), ("a",)), "max_future_s": -1.0},
    ],
)
def test_bad_construction(kwargs):
    with pytest.raises(ValueError):
        ObservationAssembler(**kwargs)
