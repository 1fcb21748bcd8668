"""openpi's wire format: msgpack, with numpy arrays and scalars as tagged maps (openpi_client.msgpack_numpy).

An array travels as {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}, a numpy
scalar as {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}. Decoding checks what openpi's does
not: the dtype is a plain numeric one and the byte count matches the shape, so a malformed request is a clear
ProtocolError instead of a numpy crash.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_BAD_KINDS = "OVcMm"  # objects, structured, complex, datetimes: openpi refuses them, so do we


class ProtocolError(ValueError):
    """A message that is not openpi's msgpack-numpy."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in _BAD_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        if obj.dtype.kind in _BAD_KINDS:
            raise TypeError(f"cannot send a scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _dtype(tag: Any) -> np.dtype:
    try:
        dtype = np.dtype(tag.decode() if isinstance(tag, bytes) else tag)
    except TypeError as e:
        raise ProtocolError(f"unknown array dtype {tag!r}") from e
    if dtype.kind in _BAD_KINDS:
        raise ProtocolError(f"unsupported array dtype {dtype}")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        data, shape = obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes) or not isinstance(shape, list | tuple) \
                or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ProtocolError("malformed array: expected bytes data and a list of sizes as shape")
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if need != len(data):
            raise ProtocolError(f"array of shape {tuple(shape)} and dtype {dtype} needs {need} bytes, got {len(data)}")
        return np.frombuffer(data, dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


CLOSE_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes: the 2-byte code, then the reason


def close_reason(text: str) -> str:
    """`text` cut to what a close frame can carry: 123 bytes of UTF-8, never inside a character."""
    return text.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")


def pack(obj: Any) -> bytes:
    """A dict (of dicts, lists, strings, numbers, numpy arrays and scalars) -> one binary websocket frame."""
    return msgpack.packb(obj, default=_encode)


def unpack(data: bytes) -> Any:
    """One binary frame -> the object it encodes; arrays are read-only views into the frame."""
    try:
        return msgpack.unpackb(data, object_hook=_decode)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"not a msgpack message: {e}") from None
