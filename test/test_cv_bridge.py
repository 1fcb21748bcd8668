"""The node's sensor_msgs/Image converter: cv_bridge where installed, giving the built-in converter's pixels.

Bag replay always uses the built-in converter (pi_policy.node.inputs.image_to_rgb), so the node and replay see the
same pixels only if cv_bridge agrees with it, which the parity tests check for every supported encoding. They run
where cv_bridge exists (a ROS 2 install with vision_opencv) and skip elsewhere.
"""

import numpy as np
import pytest

from pi_policy.node.inputs import SUPPORTED_ENCODINGS, MessageError, image_to_rgb
from pi_policy.ros.images import image_converter

# encoding -> (channels, bytes per channel) in the buffer
LAYOUT = {"rgb8": (3, 1), "bgr8": (3, 1), "8UC3": (3, 1), "rgba8": (4, 1), "bgra8": (4, 1), "mono8": (1, 1),
          "8UC1": (1, 1), "mono16": (1, 2), "yuv422": (2, 1), "yuv422_yuy2": (2, 1)}


def test_the_converter_is_cv_bridge_exactly_where_it_imports():
    try:
        import cv_bridge  # noqa: F401
    except ImportError:
        assert image_converter() == ("builtin", image_to_rgb)
    else:
        assert image_converter()[0] == "cv_bridge"


def test_every_supported_encoding_has_a_parity_case():
    assert set(LAYOUT) == set(SUPPORTED_ENCODINGS)


def ros_image(encoding: str, bigendian: int = 0, pad: int = 3, height: int = 6, width: int = 10):
    from sensor_msgs.msg import Image

    channels, depth = LAYOUT[encoding]
    row = width * channels * depth
    data = np.random.default_rng(len(encoding) + bigendian).integers(0, 256, (height, row + pad), dtype=np.uint8)
    return Image(height=height, width=width, encoding=encoding, is_bigendian=bigendian, step=row + pad,
                 data=data.tobytes())


@pytest.mark.parametrize(("encoding", "bigendian"), [(e, 0) for e in LAYOUT] + [("mono16", 1)])
def test_cv_bridge_gives_the_builtin_pixels(encoding, bigendian):
    pytest.importorskip("cv_bridge")
    name, convert = image_converter()
    assert name == "cv_bridge"
    msg = ros_image(encoding, bigendian)
    ours, theirs = image_to_rgb(msg), convert(msg)
    assert theirs.shape == ours.shape == (6, 10, 3) and theirs.dtype == np.uint8
    np.testing.assert_array_equal(theirs, ours)


def test_cv_bridge_rejects_what_the_builtin_rejects_with_the_same_reason():
    pytest.importorskip("cv_bridge")
    _, convert = image_converter()
    short, bayer, depth = ros_image("rgb8"), ros_image("mono8"), ros_image("mono16")
    short.data = short.data[:-1]
    bayer.encoding, depth.encoding = "bayer_rggb8", "16UC1"
    for msg in (short, bayer, depth):
        with pytest.raises(MessageError) as builtin:
            image_to_rgb(msg)
        with pytest.raises(MessageError) as bridged:
            convert(msg)
        assert str(bridged.value) == str(builtin.value)
