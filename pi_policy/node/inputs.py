"""ROS 2 input messages (rclpy or rosbags, read by field name) to numpy arrays, with clear errors.

Supported Image encodings: rgb8, bgr8, rgba8, bgra8, mono8, mono16, 8UC1 (as mono8), 8UC3 (as bgr8, OpenCV's
order), yuv422 (UYVY) and yuv422_yuy2 (YUYV). mono16 is scaled to 8 bits as cv_bridge does (v * 255 / 65535,
rounded), so the node gives the same pixels whichever of the two converts its images.
16UC1 / 32FC1 are rejected on purpose: in ROS they are depth images, and a depth map squeezed into RGB
would be silent garbage for a vision-language model. CompressedImage data is JPEG or PNG (pi_policy.node.compressed:
the declared size is checked before decoding). Images wider or taller than `max_side` (the node's
max_image_side) are refused, raw or compressed.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence

import cv2
import numpy as np

from pi_policy.node.compressed import DEFAULT_MAX_SIDE, ImageDataError, check_side, decode, scale_16_to_8


class MessageError(ValueError):
    """A message that cannot be turned into model input; str(e) says why, for a human."""


# encoding -> (channels in the buffer, bytes per channel, cv2 conversion to RGB or None if already RGB)
_ENCODINGS: dict[str, tuple[int, int, int | None]] = {
    "rgb8": (3, 1, None),
    "bgr8": (3, 1, cv2.COLOR_BGR2RGB),
    "8UC3": (3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": (4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": (1, 1, cv2.COLOR_GRAY2RGB),
    "8UC1": (1, 1, cv2.COLOR_GRAY2RGB),
    "mono16": (1, 2, cv2.COLOR_GRAY2RGB),
    "yuv422": (2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, 1, cv2.COLOR_YUV2RGB_YUYV),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
_REJECTED = {
    "16UC1": "16UC1 is a depth encoding in ROS; publish a colour or mono camera stream instead",
    "32FC1": "32FC1 is a depth encoding in ROS; publish a colour or mono camera stream instead",
}


def _int_field(msg, name: str, lo: int = 0, hi: int = 1 << 32) -> int:
    value = getattr(msg, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MessageError(f"field '{name}' must be an integer, got {type(value).__name__}")
    if not lo <= int(value) < hi:
        raise MessageError(f"field '{name}' = {int(value)} is out of range [{lo}, {hi})")
    return int(value)


def _as_bytes(data, what: str) -> np.ndarray:
    """A uint8[] field (numpy, bytes, array.array or list) as a flat uint8 array, no copy if possible."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise MessageError(f"{what}: data must be uint8, got dtype {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, array.array):
        if data.itemsize != 1:
            raise MessageError(f"{what}: data must be a byte array, got array typecode '{data.typecode}'")
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, Sequence) and not isinstance(data, str):
        arr = np.asarray(data)
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255):
            raise MessageError(f"{what}: data must hold bytes 0..255")
        return arr.astype(np.uint8).reshape(-1)
    raise MessageError(f"{what}: data must be bytes, got {type(data).__name__}")


def stamp_to_sec(stamp) -> float:
    """builtin_interfaces/Time -> seconds as float."""
    if stamp is None:
        raise MessageError("stamp is missing")
    sec = _int_field(stamp, "sec", -(1 << 31), 1 << 31)
    nanosec = _int_field(stamp, "nanosec", 0, 1_000_000_000)
    return sec + nanosec * 1e-9


def sec_to_stamp(t: float) -> tuple[int, int]:
    """Seconds -> (sec, nanosec) with 0 <= nanosec < 1e9, also for negative t."""
    if not math.isfinite(t):
        raise MessageError(f"time {t} is not finite")
    total_ns = round(t * 1e9)
    sec, nanosec = divmod(total_ns, 1_000_000_000)
    return int(sec), int(nanosec)


def header_stamp_sec(msg) -> float:
    header = getattr(msg, "header", None)
    if header is None:
        raise MessageError(f"{type(msg).__name__} has no header")
    return stamp_to_sec(getattr(header, "stamp", None))


def _image_layout(msg, max_side: int) -> tuple[str, int, int, int, int, np.ndarray]:
    """(encoding, height, width, step, is_bigendian, data) of a sensor_msgs/Image that image_to_rgb can convert."""
    encoding = getattr(msg, "encoding", None)
    if not isinstance(encoding, str):
        raise MessageError(f"image encoding must be a string, got {type(encoding).__name__}")
    if encoding in _REJECTED:
        raise MessageError(f"unsupported image encoding '{encoding}': {_REJECTED[encoding]}")
    if encoding not in _ENCODINGS:
        raise MessageError(
            f"unknown image encoding '{encoding}'; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    channels, depth, _ = _ENCODINGS[encoding]
    height = _int_field(msg, "height")
    width = _int_field(msg, "width")
    step = _int_field(msg, "step")
    bigendian = _int_field(msg, "is_bigendian", 0, 256)
    if height == 0 or width == 0:
        raise MessageError(f"empty image: {width}x{height}")
    try:
        check_side(width, height, max_side, f"{encoding} image")
    except ImageDataError as e:
        raise MessageError(str(e)) from None
    if channels == 2 and width % 2:
        raise MessageError(f"{encoding} needs an even width, got {width}")
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise MessageError(f"step {step} is smaller than width*bytes_per_pixel = {row_bytes} ({encoding})")
    data = _as_bytes(getattr(msg, "data", None), f"{encoding} {width}x{height} image")
    if data.size != step * height:
        raise MessageError(
            f"{encoding} {width}x{height} image with step {step} needs {step * height} bytes, got {data.size}"
        )
    return encoding, height, width, step, bigendian, data


def check_image(msg, max_side: int = DEFAULT_MAX_SIDE) -> None:
    """Raise MessageError for every sensor_msgs/Image that image_to_rgb would reject, converting nothing."""
    _image_layout(msg, max_side)


def image_to_rgb(msg, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """sensor_msgs/Image -> new HxWx3 uint8 RGB array (never a view of the message buffer)."""
    encoding, height, width, step, bigendian, data = _image_layout(msg, max_side)
    channels, depth, conversion = _ENCODINGS[encoding]
    rows = data.reshape(height, step)[:, :width * channels * depth]
    if depth == 2:
        dtype = np.dtype(">u2" if bigendian else "<u2")
        pixels = scale_16_to_8(np.ascontiguousarray(rows).view(dtype))  # cv_bridge's mono16 -> 8 bit
    else:
        pixels = np.ascontiguousarray(rows)
    pixels = pixels.reshape(height, width, channels)
    if conversion is None:
        return pixels.copy()
    return cv2.cvtColor(pixels, conversion)


def compressed_image_to_rgb(msg, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG data, as image_transport sends) -> HxWx3 uint8 RGB.

    The data decides the format; `format` only marks depth streams, which are refused."""
    fmt = getattr(msg, "format", "")
    if not isinstance(fmt, str):
        raise MessageError(f"compressed image format must be a string, got {type(fmt).__name__}")
    if "compresseddepth" in fmt.lower():
        raise MessageError(f"compressed image format '{fmt}' is a depth stream, not a camera image")
    what = f"compressed image ({fmt or 'no format'})"
    data = _as_bytes(getattr(msg, "data", None), what)
    if data.size == 0:
        raise MessageError(f"{what} has no data")
    try:
        return decode(data.tobytes(), max_side)
    except ImageDataError as e:
        raise MessageError(f"cannot decode {what}: {e}") from None


def clip_text(text: str, limit: int = 200) -> str:
    """text as it is, or its first `limit` characters and its length, for logs and diagnostics."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def joint_state_to_vector(msg, joint_names: list[str]) -> np.ndarray:
    """sensor_msgs/JointState -> positions of `joint_names`, in that order, as float32.

    Joints are matched by name: the message may list them in any order and carry extra joints.
    A missing joint, a duplicated name or a non-finite position among the wanted joints is an error.
    """
    names = getattr(msg, "name", None)
    if names is None or isinstance(names, str) or not isinstance(names, Sequence):
        raise MessageError(f"joint state 'name' must be a list of strings, got {type(names).__name__}")
    if not all(isinstance(n, str) for n in names):
        raise MessageError("joint state 'name' must hold only strings")
    try:
        positions = np.asarray(getattr(msg, "position", None), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise MessageError("joint state 'position' must be a list of numbers") from None
    if positions.size != len(names):
        raise MessageError(f"joint state has {len(names)} names but {positions.size} positions")
    index: dict[str, int] = {}
    duplicated = []
    for i, n in enumerate(names):
        if n in index:
            duplicated.append(n)
        index[n] = i
    missing = [j for j in joint_names if j not in index]
    if missing:
        raise MessageError(f"joint state is missing joints: {', '.join(missing)}")
    dup_wanted = [j for j in joint_names if j in duplicated]
    if dup_wanted:
        raise MessageError(f"joint state lists joints more than once: {', '.join(dup_wanted)}")
    out = positions[[index[j] for j in joint_names]]
    bad = [j for j, v in zip(joint_names, out, strict=True) if not math.isfinite(v)]
    if bad:
        raise MessageError(f"joint state has non-finite positions for: {', '.join(bad)}")
    return out.astype(np.float32)
