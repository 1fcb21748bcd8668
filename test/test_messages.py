"""Message conversion with real ROS 2 message types from the rosbags typestore."""

import array

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from pi_policy.node.inputs import (
    MessageError,
    compressed_image_to_rgb,
    header_stamp_sec,
    image_to_rgb,
    joint_state_to_vector,
    sec_to_stamp,
    stamp_to_sec,
)

TS = get_typestore(Stores.ROS2_HUMBLE)
Time = TS.types["builtin_interfaces/msg/Time"]
Header = TS.types["std_msgs/msg/Header"]
Image = TS.types["sensor_msgs/msg/Image"]
CompressedImage = TS.types["sensor_msgs/msg/CompressedImage"]
JointState = TS.types["sensor_msgs/msg/JointState"]


def header(t=1.5):
    sec, nanosec = sec_to_stamp(t)
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id="cam")


def image(rgb, encoding="rgb8", pad=0, bigendian=0, data=None):
    """Pack an HxWx3 RGB image (or HxW mono) into a sensor_msgs/Image with the given encoding."""
    if encoding in ("rgb8",):
        px = rgb
    elif encoding in ("bgr8", "8UC3"):
        px = rgb[..., ::-1]
    elif encoding == "rgba8":
        px = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "bgra8":
        px = np.concatenate([rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    else:
        px = rgb
    h, w = px.shape[:2]
    rows = px.reshape(h, -1).view(np.uint8) if px.dtype != np.uint8 else px.reshape(h, -1)
    rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    payload = np.ascontiguousarray(rows).reshape(-1) if data is None else data
    return Image(header=header(), height=h, width=w, encoding=encoding, is_bigendian=bigendian,
                 step=rows.shape[1], data=payload)


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_stamps():
    assert stamp_to_sec(Time(sec=3, nanosec=250_000_000)) == pytest.approx(3.25)
    assert sec_to_stamp(-0.25) == (-1, 750_000_000)
    assert sec_to_stamp(12.000000001) == (12, 1)
    assert header_stamp_sec(image(np.zeros((1, 2, 3), np.uint8))) == pytest.approx(1.5)
    with pytest.raises(MessageError, match="nanosec"):
        stamp_to_sec(Time(sec=1, nanosec=2_000_000_000))
    with pytest.raises(MessageError, match="missing"):
        stamp_to_sec(None)
    with pytest.raises(MessageError, match="not finite"):
        sec_to_stamp(float("nan"))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "8UC3", "rgba8", "bgra8"])
@pytest.mark.parametrize("pad", [0, 3])
def test_color_encodings_round_trip(rgb, encoding, pad):
    out = image_to_rgb(image(rgb, encoding, pad=pad))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)


def test_result_does_not_alias_message(rgb):
    msg = image(rgb)
    out = image_to_rgb(msg)
    msg.data[:] = 0
    np.testing.assert_array_equal(out, rgb)


def test_rclpy_style_buffers(rgb):
    msg = image(rgb)
    for data in (bytes(msg.data), array.array("B", msg.data.tobytes()), list(msg.data)):
        msg.data = data
        np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8(encoding):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = image_to_rgb(image(g, encoding, pad=2))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


@pytest.mark.parametrize("bigendian", [0, 1])
def test_mono16_scaled_and_endianness(bigendian):
    g = np.array([[0, 128, 129, 255], [256, 32767, 32896, 33023], [5000, 60000, 65406, 65535]], np.uint16)
    out = image_to_rgb(image(g.astype(">u2" if bigendian else "<u2"), "mono16", pad=2, bigendian=bigendian))
    # what cv_bridge gives for mono16 -> rgb8: OpenCV's saturating convert with scale 255/65535
    expected = cv2.convertScaleAbs(g, alpha=255 / 65535)
    assert expected[0, 3] == 1 and expected[2, 2] == 254  # not the high byte (0 and 255)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_yuv422():
    grey = np.full((2, 4, 3), 128, np.uint8)
    yuv = cv2.cvtColor(grey, cv2.COLOR_RGB2YUV)
    uyvy = np.zeros((2, 4, 2), np.uint8)
    uyvy[..., 1] = yuv[..., 0]
    uyvy[:, 0::2, 0], uyvy[:, 1::2, 0] = 128, 128
    out = image_to_rgb(image(uyvy, "yuv422"))
    assert out.shape == (2, 4, 3)
    assert np.abs(out.astype(int) - 128).max() <= 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"encoding": "bayer_rggb8"}, "unknown image encoding 'bayer_rggb8'"),
        ({"encoding": "16UC1"}, "depth"),
        ({"encoding": None}, "encoding must be a string"),
        ({"height": 0}, "empty image"),
        ({"width": 0}, "empty image"),
        ({"height": -3}, "height"),
        ({"step": 4}, "step 4 is smaller"),
        ({"data": np.zeros(10, np.uint8)}, "needs 105 bytes, got 10"),
        ({"data": np.zeros(106, np.uint8)}, "needs 105 bytes, got 106"),
        ({"data": np.zeros(105, np.float32)}, "uint8"),
        ({"data": None}, "data must be bytes"),
        ({"data": [300] * 105}, "0..255"),
        ({"width": 1.5}, "integer"),
    ],
)
def test_bad_images(rgb, change, match):
    msg = image(rgb)
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(MessageError, match=match):
        image_to_rgb(msg)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_compressed(rgb, ext):
    ok, buf = cv2.imencode(ext, rgb[..., ::-1])
    assert ok
    msg = CompressedImage(header=header(), format=ext[1:], data=buf.reshape(-1))
    out = compressed_image_to_rgb(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    if ext == ".png":
        np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize(
    ("fmt", "data", "match"),
    [
        ("jpeg", np.zeros(0, np.uint8), "no data"),
        ("jpeg", np.arange(50, dtype=np.uint8), "cannot decode"),
        ("16UC1; compressedDepth png", np.arange(50, dtype=np.uint8), "depth"),
        (None, np.arange(50, dtype=np.uint8), "format must be a string"),
    ],
)
def test_bad_compressed(fmt, data, match):
    with pytest.raises(MessageError, match=match):
        compressed_image_to_rgb(CompressedImage(header=header(), format=fmt, data=data))


def joints(names, positions):
    return JointState(header=header(), name=names, position=np.asarray(positions, np.float64),
                      velocity=np.zeros(0), effort=np.zeros(0))


def test_joint_mapping_by_name_reordered_and_extra():
    msg = joints(["gripper", "elbow", "wheel", "shoulder"], [0.5, 2.0, 9.0, 1.0])
    out = joint_state_to_vector(msg, ["shoulder", "elbow", "gripper"])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 2.0, 0.5])


def test_joint_nan_in_unused_joint_is_fine():
    msg = joints(["a", "b", "unused"], [1.0, 2.0, float("nan")])
    np.testing.assert_array_equal(joint_state_to_vector(msg, ["b", "a"]), [2.0, 1.0])


@pytest.mark.parametrize(
    ("names", "positions", "match"),
    [
        (["a"], [1.0], "missing joints: b, c"),
        (["a", "b", "c"], [1.0, float("nan"), float("inf")], "non-finite positions for: b, c"),
        (["a", "b", "c", "a"], [1.0, 2.0, 3.0, 4.0], "more than once: a"),
        (["a", "b", "c"], [1.0, 2.0], "3 names but 2 positions"),
        ("abc", [1.0, 2.0, 3.0], "list of strings"),
        (["a", "b", 3], [1.0, 2.0, 3.0], "only strings"),
    ],
)
def test_bad_joints(names, positions, match):
    msg = joints(["a", "b", "c"], [0.0, 0.0, 0.0])
    msg.name, msg.position = names, positions
    with pytest.raises(MessageError, match=match):
        joint_state_to_vector(msg, ["a", "b", "c"])


def test_joint_position_not_numbers():
    msg = joints(["a"], [0.0])
    msg.position = ["x"]
    with pytest.raises(MessageError, match="numbers"):
        joint_state_to_vector(msg, ["a"])
