"""Compressed camera frames (the bytes of a sensor_msgs/CompressedImage) to RGB, with the size checked first.

Accepted formats: JPEG and PNG, which image_transport's compressed transport writes; the format is told by the
data's first bytes, not by the message's `format` text. Anything else (BMP, TIFF, WebP, GIF, ...) is refused by
name. Before a pixel is decoded, the width and height the JPEG frame header (SOF) or the PNG header (IHDR)
declares are read and checked against a limit, so a small file that declares a huge image (a decompression
bomb) costs nothing. Decoding is Pillow's, which reports problems as exceptions and never writes to stderr, so a
stream of corrupt frames shows up only in the node's own (throttled) log.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG")
DEFAULT_MAX_SIDE = 4096  # width or height; no robot camera stream is larger
MAX_SIDE_LIMIT = 8192  # the largest max_side accepted (Pillow warns about images over about 89 megapixels)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# SOF0-SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are other segments
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])  # TEM, SOI, RST0-7: no length field
_OTHER_FORMATS = (  # (first bytes, name): formats refused by name
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"qoif", "QOI"),
)


class ImageDataError(ValueError):
    """Compressed image bytes that are refused; str(e) says why, for a human."""


def detect_format(data: bytes) -> str:
    """'JPEG' or 'PNG' by the first bytes; ImageDataError naming the format for anything else."""
    if data.startswith(_JPEG_SOI):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    name = next((n for magic, n in _OTHER_FORMATS if data.startswith(magic)), None)
    if name is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        name = "WebP"
    if name is None and data[4:8] == b"ftyp":
        name = "HEIF/AVIF"
    what = f"{name} data" if name else f"not JPEG or PNG data (first bytes {data[:8].hex(' ')})"
    raise ImageDataError(f"{what}; accepted formats: {', '.join(FORMATS)}")


def _u16(data: bytes, i: int) -> int:
    return int.from_bytes(data[i:i + 2], "big")


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's one frame header, read without decoding."""
    i, n, size = 2, len(data), None
    while i < n:
        if data[i] != 0xFF:
            raise ImageDataError(f"JPEG: no segment marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes may pad a marker
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0x00:  # FF 00 is an escaped byte of entropy-coded data, never a marker
            raise ImageDataError(f"JPEG: no segment marker at byte {i - 2}")
        if marker in _STANDALONE:
            continue
        if marker in (_SOS, _EOI):  # the frame header comes before the first scan
            break
        if i + 2 > n:
            break
        length = _u16(data, i)
        if length < 2:
            raise ImageDataError(f"JPEG: segment 0x{marker:02X} has a length of {length}")
        if marker in _SOF_MARKERS:
            if size is not None:
                raise ImageDataError("JPEG has more than one frame header (SOF)")
            if length < 8 or i + 7 > n:
                raise ImageDataError("JPEG frame header (SOF) is cut short")
            height, width = _u16(data, i + 3), _u16(data, i + 5)
            if height == 0 or width == 0:
                raise ImageDataError(f"JPEG declares a {width}x{height} image (a height defined later by a "
                                     "DNL marker is not supported)")
            size = (width, height)
        i += length
    if size is None:
        raise ImageDataError("JPEG has no frame header (SOF) before its image data (truncated or not a JPEG)")
    return size


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, read without decoding; one IHDR, first, before IDAT."""
    i, n, size = len(_PNG_SIGNATURE), len(data), None
    while i + 8 <= n:
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind == b"IHDR":
            if size is not None:
                raise ImageDataError("PNG has more than one header chunk (IHDR)")
            if length != 13 or i + 16 > n:
                raise ImageDataError("PNG header chunk (IHDR) is malformed or cut short")
            size = (int.from_bytes(data[i + 8:i + 12], "big"), int.from_bytes(data[i + 12:i + 16], "big"))
            if size[0] == 0 or size[1] == 0:
                raise ImageDataError(f"PNG declares a {size[0]}x{size[1]} image")
        elif size is None:
            raise ImageDataError(f"PNG does not start with its header chunk (IHDR) but with {kind!r}")
        elif kind in (b"IDAT", b"IEND"):
            break
        i += 12 + length  # length, type, data, CRC
    if size is None:
        raise ImageDataError("PNG has no header chunk (IHDR): truncated")
    return size


def declared_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) that the JPEG or PNG header declares; ImageDataError for anything else."""
    fmt = detect_format(data)
    width, height = jpeg_size(data) if fmt == "JPEG" else png_size(data)
    return fmt, width, height


def check_side(width: int, height: int, max_side: int, what: str) -> None:
    """ImageDataError when width or height is over max_side."""
    if width > max_side or height > max_side:
        raise ImageDataError(f"{what} is {width}x{height}, larger than max_image_side {max_side}")


def scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """16-bit intensities to 8 bits as cv_bridge does for mono16: v * 255 / 65535, rounded (v / 257 never ties)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def decode(data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """JPEG or PNG bytes -> a new HxWx3 uint8 RGB array; ImageDataError (one line) for anything refused."""
    fmt, width, height = declared_size(data)
    check_side(width, height, max_side, f"{fmt} image (declared in its header)")
    try:
        with Image.open(io.BytesIO(data), formats=(fmt,)) as im:
            if im.size != (width, height):
                raise ImageDataError(f"{fmt} headers disagree on the size: {width}x{height} and "
                                     f"{im.size[0]}x{im.size[1]}")
            im.load()
            if im.mode.startswith("I"):  # 16-bit grey PNG: scaled as the node scales mono16
                grey = scale_16_to_8(np.clip(np.asarray(im), 0, 65535))
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB")).copy()  # writable, for torch
    except ImageDataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageDataError(f"{width}x{height} {fmt}: {detail}") from None
