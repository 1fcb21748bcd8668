"""Synthetic observations for the demo, the benchmark, verification and calibration: deterministic per seed."""

from __future__ import annotations

import numpy as np

from pi_policy.observation import Observation

PROMPT = "pick up the red block and put it in the bin"
PROMPTS = ("pick up the red block", "open the drawer", "fold the towel", "put the cup on the plate")


def synthetic_observation(camera_names, size: int = 224, state_dim: int = 14, seed: int = 0,
                          prompt: str = PROMPT, stamp: float = 0.0) -> Observation:
    """Smooth random RGB images (8x8-pixel blocks plus noise) at `size`, a random state in [-1, 1]."""
    rng = np.random.default_rng(seed)
    images = {}
    for name in camera_names:
        low = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
        img = np.kron(low, np.ones((8, 8, 1), np.float32))[:size, :size]
        images[name] = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return Observation(images, rng.uniform(-1, 1, state_dim).astype(np.float32), prompt, stamp)


def sample_observations(camera_names, size: int, state_dim: int, n: int, seed: int) -> list[Observation]:
    """n different observations with varied prompts (verification inputs, calibration samples)."""
    return [synthetic_observation(camera_names, size, state_dim, seed + i, PROMPTS[i % len(PROMPTS)], float(i))
            for i in range(n)]
