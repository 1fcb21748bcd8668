"""One openpi request dict -> the runner's Observation, through the serve config's key mapping.

Images may arrive HWC or CHW (openpi's ALOHA client sends CHW), uint8 or float in [0, 1], of any size: they are
turned channels-last here and resized on the runner's device. A camera whose key is absent is masked out,
unless it is required (the node's `required_cameras`; empty = all). Keys the mapping does not name are ignored.
An optional `noise` array (horizon x model action dim) replaces the runner's own noise draw: a testing aid that
makes one request's answer reproducible whatever other clients do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pi_policy.model.preprocess import to_rgb_uint8
from pi_policy.observation import Observation
from pi_policy.serve.config import ServeConfig

NOISE_KEY = "noise"
_MISSING = object()


class RequestError(ValueError):
    """A request the mapping cannot turn into an observation; the message says which key and why."""


def lookup(request: dict, key: str) -> Any:
    """request[key], or the nested value for a key like "images/cam_high"; _MISSING when absent."""
    if key in request:
        return request[key]
    node: Any = request
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def channels_last(img: Any, key: str) -> np.ndarray:
    """A writable HxWxC copy of a HWC or CHW image (C of 1, 3 or 4 picks the layout)."""
    if not isinstance(img, np.ndarray):
        raise RequestError(f"'{key}' must be an image array, got {type(img).__name__}")
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3, 4):
        img = img.transpose(1, 2, 0)
    img = np.ascontiguousarray(img)
    return img if img.flags.writeable else img.copy()  # the runner hands host arrays to torch.from_numpy


def to_observation(request: Any, cfg: ServeConfig) -> tuple[Observation, np.ndarray | None]:
    """The observation and the optional noise in a request; RequestError with a one-line reason otherwise."""
    if not isinstance(request, dict):
        raise RequestError(f"a request must be a dict of observation keys, got {type(request).__name__}")
    cameras = cfg.params.camera_set()
    images = {}
    for key, camera in cfg.images.items():
        img = lookup(request, key)
        if img is _MISSING:
            if cameras.is_required(camera):
                raise RequestError(f"missing image '{key}' (camera {camera}); the request has {_keys(request)}")
            continue
        try:
            images[camera] = to_rgb_uint8(channels_last(img, key), f"'{key}'")
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
    parts = []
    for key in cfg.state:
        value = lookup(request, key)
        if value is _MISSING:
            raise RequestError(f"missing state '{key}'; the request has {_keys(request)}")
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):  # ragged lists
            arr = np.asarray(None)
        if arr.dtype.kind not in "biuf":  # strings ('0.12') and objects are not numbers, even where they parse
            kind = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise RequestError(f"'{key}' must be numbers, got {kind}")
        arr = arr.astype(np.float64)
        if arr.ndim > 1:
            raise RequestError(f"'{key}' must be a vector or a number, got shape {arr.shape}")
        parts.append(arr.reshape(-1))
    state = np.concatenate(parts)
    names = cfg.params.joint_names
    if state.size != len(names):
        raise RequestError(f"state {cfg.state} has {state.size} values, but joint_names lists {len(names)}: {names}")
    prompt = lookup(request, cfg.prompt)
    if prompt is _MISSING:
        prompt = cfg.params.prompt
    elif isinstance(prompt, np.ndarray) and prompt.dtype.kind == "U" and prompt.size == 1:
        prompt = str(prompt.item())
    if not isinstance(prompt, str):
        raise RequestError(f"'{cfg.prompt}' must be a string, got {type(prompt).__name__}")
    noise = request.get(NOISE_KEY)
    if noise is not None:
        try:
            if np.asarray(noise).dtype.kind not in "biuf":  # not numbers, even where they parse
                raise TypeError
            noise = np.array(noise, dtype=np.float32)  # a writable copy, for torch.from_numpy
        except (TypeError, ValueError):
            raise RequestError(f"'{NOISE_KEY}' must be a float array, got {type(noise).__name__}") from None
    return Observation(images, state, prompt), noise


def _keys(request: dict) -> list[str]:
    out = []
    for k, v in request.items():
        out += [f"{k}/{n}" for n in v] if isinstance(v, dict) else [str(k)]
    return sorted(out)
