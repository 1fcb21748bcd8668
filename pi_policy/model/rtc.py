"""Real-time chunking (RTC, arXiv 2506.07339): denoise a new chunk so that it continues the one being executed.

While the robot executes chunk k, chunk k+1 is generated. Its first `delay` steps will be executed from chunk k
before k+1 arrives, so they are frozen to chunk k; the steps after them are pulled toward chunk k's remaining
plan with weights W that fall to 0 at the execution horizon. Both ways of doing it act inside
PiModel.denoise's Euler loop:

- inpaint: after each step, x is blended toward the previous chunk's point on the same straight
  noise-to-action path: x <- lerp(x, t * noise + (1 - t) * prev, W). At t = 0 the frozen steps (W = 1)
  are prev exactly.
- guided (the paper's pseudo-inverse guidance): with a_hat = x - t * v(x), the model's guess of the final
  actions, the velocity becomes v - w(t) * (d a_hat / d x)^T (W * (prev - a_hat)), a vector-Jacobian product
  through the action expert; w(t) = min(max_weight, (t^2 + (1 - t)^2) / (t (1 - t))).

Time runs from 1 (noise) to 0 (actions) with x <- x + dt * v, dt < 0. The paper's time is 1 - t and its
velocity -v: the weight formula is symmetric in t <-> 1 - t, and the minus sign before the correction is
that change of sign. Every input is a tensor of fixed shape, so one CUDA graph holds the loop and later
calls change buffer values only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def prefix_weights(delay: int, horizon: int, length: int, schedule: str) -> Tensor:
    """W (length,) float32 over a new chunk's steps: 1 on the first `delay` steps (frozen), then `schedule` from
    1 down to 0 at step `horizon` (exclusive), 0 after. The frozen steps reach `delay` even past `horizon`.

    zeros: only the frozen steps; ones: 1 up to the horizon; linear: a straight fall; exp: w * (e^w - 1) / (e - 1)
    of the linear w, which lets go of the previous chunk sooner.
    """
    end = min(max(horizon, delay), length)
    start = max(0, min(delay, end))
    i = torch.arange(length, dtype=torch.float32)
    if schedule == "zeros":
        w = torch.zeros(length)
    elif schedule == "ones":
        w = torch.ones(length)
    elif schedule in ("linear", "exp"):
        w = ((start - 1 - i) / (end - start + 1) + 1).clamp(0, 1)
        if schedule == "exp":
            w = w * torch.expm1(w) / (math.e - 1)
    else:
        raise ValueError(f"unknown prefix schedule {schedule!r}")
    w = torch.where(i < start, 1.0, w)  # exactly 1, so that inpainting reproduces the frozen steps exactly
    return torch.where(i < end, w, 0.0)


def guidance_limit(t: float) -> float:
    """(t^2 + (1 - t)^2) / (t (1 - t)): the guidance weight before the cap; infinite at t = 0 and t = 1."""
    if t <= 0.0 or t >= 1.0:
        return math.inf
    return (t * t + (1 - t) ** 2) / (t * (1 - t))


@dataclass
class RTCInputs:
    """One denoise call's RTC inputs, as tensors (a CUDA graph's buffers)."""

    mode: str  # "inpaint" or "guided"
    prev: Tensor  # (B, H, A) the previous chunk's plan at this chunk's steps, in model action space
    weights: Tensor  # (H, A) W; 0 on padded action dims and where prev has no plan
    max_weight: Tensor  # () the guidance weight cap (guided)

    def __post_init__(self) -> None:
        if self.mode not in ("inpaint", "guided"):
            raise ValueError(f"RTC mode must be inpaint or guided, got {self.mode!r}")

    def inpaint(self, x: Tensor, noise: Tensor, t: float) -> Tensor:
        """x at time t blended toward the previous chunk's point on the path from `noise` at t."""
        return torch.lerp(x, t * noise + (1.0 - t) * self.prev, self.weights)

    def guided_velocity(self, velocity: Callable[[Tensor], Tensor], x: Tensor, t: float) -> Tensor:
        """velocity(x) corrected toward the previous chunk; `velocity` must support autograd."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = velocity(x)
            if not v.requires_grad:  # e.g. a fused kernel without a backward: the guidance would be silently wrong
                raise RuntimeError("guided RTC needs a velocity that supports autograd; this one returned no grad")
            a_hat = x - t * v
            error = self.weights * (self.prev - a_hat.detach())
            (correction,) = torch.autograd.grad(a_hat, x, error)
        w = self.max_weight.clamp(max=guidance_limit(t))
        return v.detach() - w * correction
