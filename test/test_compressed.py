"""Compressed camera frames: sizes read from the header before decoding, JPEG and PNG only, nothing on stderr."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from rosbags.typesys import Stores, get_typestore

from pi_policy.node.compressed import ImageDataError, declared_size, decode
from pi_policy.node.inputs import MessageError, compressed_image_to_rgb, image_to_rgb

ROOT = Path(__file__).resolve().parents[1]
TS = get_typestore(Stores.ROS2_HUMBLE)
CompressedImage = TS.types["sensor_msgs/msg/CompressedImage"]
RawImage = TS.types["sensor_msgs/msg/Image"]


def frame(rng, h=48, w=64):
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of about a hundred bytes whose header declares width x height (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + \
        chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG with its frame header rewritten to declare width x height."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def message(data: bytes, fmt: str = "jpeg"):
    return CompressedImage(header=None, format=fmt, data=np.frombuffer(data, np.uint8).copy())


@pytest.mark.parametrize("data, size", [
    (png_declaring(100_000, 100_000), "100000x100000"),
    (png_declaring(16384, 16384), "16384x16384"),
    (jpeg_declaring(16000, 16000), "16000x16000"),
    (jpeg_declaring(4097, 8), "4097x8"),
], ids=["png-100000", "png-16384", "jpeg-16000", "jpeg-4097-wide"])
def test_a_declared_size_over_the_limit_is_refused_before_decoding(data, size):
    assert len(data) < 1000
    with pytest.raises(MessageError, match=f"is {size}, larger than max_image_side 4096"):
        compressed_image_to_rgb(message(data, "png" if data.startswith(b"\x89PNG") else "jpeg"))


def test_the_limit_is_a_parameter_and_applies_to_raw_images_too():
    rng = np.random.default_rng(0)
    rgb = frame(rng, 48, 64)
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    assert compressed_image_to_rgb(message(jpeg), max_side=64).shape == (48, 64, 3)
    with pytest.raises(MessageError, match="JPEG image .* is 64x48, larger than max_image_side 63"):
        compressed_image_to_rgb(message(jpeg), max_side=63)
    raw = RawImage(header=None, height=48, width=64, encoding="rgb8", is_bigendian=0, step=192,
                   data=rgb.reshape(-1))
    assert image_to_rgb(raw, max_side=64).shape == (48, 64, 3)
    with pytest.raises(MessageError, match="rgb8 image is 64x48, larger than max_image_side 32"):
        image_to_rgb(raw, max_side=32)


@pytest.mark.parametrize("fmt, name", [("BMP", "BMP"), ("TIFF", "TIFF"), ("WEBP", "WebP"), ("GIF", "GIF")])
def test_other_formats_labelled_jpeg_are_refused_by_name(fmt, name):
    buf = io.BytesIO()
    Image.fromarray(frame(np.random.default_rng(1), 16, 16)).save(buf, fmt)
    with pytest.raises(MessageError, match=f"{name} data; accepted formats: JPEG, PNG"):
        compressed_image_to_rgb(message(buf.getvalue(), "jpeg"))


@pytest.mark.parametrize("make, expected_size", [
    (lambda rgb: cv2.imencode(".jpg", rgb)[1], (64, 48)),
    (lambda rgb: cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1], (64, 48)),
    (lambda rgb: cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY))[1], (64, 48)),
    (lambda rgb: cv2.imencode(".png", rgb)[1], (64, 48)),
    (lambda rgb: cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_BGR2BGRA))[1], (64, 48)),
    (lambda rgb: cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1], (64, 48)),
], ids=["jpeg", "progressive-jpeg", "grey-jpeg", "png", "rgba-png", "16-bit-png"])
def test_jpeg_and_png_variants_decode_as_opencv_decodes_them(make, expected_size):
    bgr = frame(np.random.default_rng(2))
    data = make(bgr).tobytes()
    assert declared_size(data)[1:] == expected_size
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    out = decode(data)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, expected)


def test_sixteen_bit_grey_png_is_scaled_like_mono16():
    grey = np.random.default_rng(3).integers(0, 65536, (6, 5)).astype(np.uint16)
    out = decode(cv2.imencode(".png", grey)[1].tobytes())
    expected = ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))


def test_malformed_headers_are_one_line_each():
    jpeg = cv2.imencode(".jpg", frame(np.random.default_rng(4)))[1].tobytes()
    sof = jpeg.index(b"\xff\xc0")
    png = cv2.imencode(".png", frame(np.random.default_rng(4)))[1].tobytes()
    cases = [
        (jpeg[:sof], "no frame header"),
        (jpeg[:sof] + jpeg[sof:sof + 19] + jpeg[sof:], "more than one frame header"),
        (jpeg[:len(jpeg) // 2], "64x48 JPEG: image file is truncated"),
        (png[:20], "PNG header chunk (IHDR) is malformed or cut short"),
        (png[:33] + chunk(b"IHDR", png[16:29]) + png[33:], "more than one header chunk"),
        (png[:8] + chunk(b"tEXt", b"a\0b") + png[8:], "does not start with its header chunk"),
        (png[:len(png) // 2], "64x48 PNG: image file is truncated"),
        (b"\xff\xd8\xff" + b"\x00" * 10, "no segment marker"),
        (jpeg[:20] + b"garbage" + jpeg[20:], "no segment marker at byte 20"),
    ]
    for data, reason in cases:
        with pytest.raises(ImageDataError) as e:
            decode(data)
        assert reason in str(e.value) and "\n" not in str(e.value), (reason, str(e.value))


def test_corrupt_frames_write_nothing_to_stderr():
    # OpenCV's decoders wrote "Corrupt JPEG data: ..." and "[ WARN:0@...] ... PNG input buffer is incomplete"
    # straight to the process's stderr for every bad frame; the node reports through its own log only
    script = """
import cv2, numpy as np
from rosbags.typesys import Stores, get_typestore
from pi_policy.node.inputs import MessageError, compressed_image_to_rgb
Msg = get_typestore(Stores.ROS2_HUMBLE).types["sensor_msgs/msg/CompressedImage"]
rgb = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), (5, 5), 0)
jpeg, png = (cv2.imencode(ext, rgb)[1].tobytes() for ext in (".jpg", ".png"))
garbled = bytearray(jpeg)
garbled[len(jpeg) // 2:len(jpeg) // 2 + 20] = b"\\xff\\x00" * 10
for data in (jpeg[: len(jpeg) // 2], bytes(garbled), png[: len(png) // 2], jpeg[:200] + jpeg[-2:]):
    try:
        compressed_image_to_rgb(Msg(header=None, format="jpeg", data=np.frombuffer(data, np.uint8).copy()))
    except MessageError:
        pass
print("done")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    assert done.stderr == ""
