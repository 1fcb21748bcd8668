"""Camera images -> model input: validate, resize with pad to 224, scale to [-1, 1], mask missing cameras."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_warned_unknown: set[frozenset[str]] = set()


def to_rgb_uint8(img: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an image and return it as HxWx3 uint8 RGB.

    Accepted: uint8 HxW (mono, replicated to RGB), HxWx1, HxWx3, HxWx4 (alpha dropped); float HxW[xC] in [0, 1]
    (scaled by 255 and rounded, as openpi-client's convert_to_uint8 does, but out-of-range values are an error
    rather than clipped, because they usually mean 0..255 floats or [-1, 1] data). Channel order is not
    checked: images are assumed RGB (a ROS bgr8 image must be converted by the caller).
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected HxW, HxWx1, HxWx3 or HxWx4 (channels last), got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{name}: empty image, shape {img.shape}")
    if img.dtype == np.uint8:
        pass
    elif np.issubdtype(img.dtype, np.floating):
        bad = ~np.isfinite(img)
        if bad.any():
            raise ValueError(f"{name}: {int(bad.sum())} NaN/inf pixel values")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float images must be in [0, 1], got values in [{lo:g}, {hi:g}] "
                             "(pass uint8 for 0..255 data)")
        img = np.round(img * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{name}: unsupported dtype {img.dtype}; pass uint8 RGB or float in [0, 1]")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def resize_with_pad_tensor(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HxWx3 uint8 tensor (CPU or GPU) -> size x size x 3: the longer side scaled to `size`, aspect kept,
    centered on black. Geometry as openpi's image_tools.resize_with_pad (the odd padding pixel at the
    bottom/right); antialiased bilinear interpolation as openpi's PIL resize. On a GPU this moves the
    resize of full-size camera frames off the robot's CPU.
    """
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    ratio = max(w / size, h / size)
    # max(1, .) only matters for extreme aspect ratios, where openpi would produce an empty image.
    rh, rw = max(1, int(h / ratio)), max(1, int(w / ratio))
    x = F.interpolate(img.permute(2, 0, 1)[None].float(), size=(rh, rw), mode="bilinear", antialias=True,
                      align_corners=False)
    out = img.new_zeros(size, size, 3)
    top, left = (size - rh) // 2, (size - rw) // 2
    out[top:top + rh, left:left + rw] = x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return out


def resize_with_pad(img: np.ndarray, size: int = 224) -> np.ndarray:
    """numpy front end of resize_with_pad_tensor (validates the image first)."""
    img = to_rgb_uint8(img)
    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    return resize_with_pad_tensor(torch.from_numpy(np.ascontiguousarray(img)), size).numpy()


def pixels_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]: the one pixel scaling, on any device.

    / 127.5 rather than * (2 / 255): keeps 255 -> exactly 1.0 in float32.
    """
    return images.movedim(-1, -3).float() / 127.5 - 1.0


def image_to_model(img: np.ndarray) -> np.ndarray:
    """HxWx3 image (validated as in to_rgb_uint8) -> float32 3xHxW in [-1, 1]; no resizing."""
    return pixels_to_model(torch.from_numpy(np.ascontiguousarray(to_rgb_uint8(img)))).numpy()


def prepare_images(images: dict[str, np.ndarray | None], camera_names: list[str],
                   size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """Images per camera -> (float32 (N, 3, size, size) in [-1, 1], bool (N,) mask), in camera_names order.

    A camera that is absent (or None) becomes a black image (-1 everywhere, like openpi's zero uint8 images and
    LeRobot's empty cameras) with mask False. Cameras not in camera_names are ignored, with a warning logged
    once per distinct set of unknown names.
    """
    if not isinstance(images, Mapping):
        raise TypeError(f"images must be a dict camera name -> image, got {type(images).__name__}")
    if not camera_names:
        raise ValueError("camera_names is empty: the model needs at least one camera slot")
    if len(set(camera_names)) != len(camera_names):
        raise ValueError(f"camera_names has duplicates: {camera_names}")
    unknown = frozenset(images) - set(camera_names)
    if unknown and unknown not in _warned_unknown:
        _warned_unknown.add(unknown)
        log.warning("ignoring images from cameras the model does not use: %s (model cameras: %s)",
                    sorted(unknown), camera_names)
    pixels = np.full((len(camera_names), 3, size, size), -1.0, dtype=np.float32)
    mask = np.zeros(len(camera_names), dtype=bool)
    for i, cam in enumerate(camera_names):
        img = images.get(cam)
        if img is None:
            continue
        try:
            pixels[i] = image_to_model(resize_with_pad(img, size))
        except (TypeError, ValueError) as e:
            raise type(e)(f"camera {cam!r}: {e}") from e
        mask[i] = True
    return pixels, mask
