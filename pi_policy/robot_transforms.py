"""The robot's side of normalization: delta actions and the per-robot joint conversions, in openpi's order.

A policy trained with openpi (or LeRobot 0.5+ with relative actions) may see a robot's state and actions in a
different form than the robot sends and takes them:

- delta actions: on the masked dimensions the model predicts actions relative to the current state. A mask is
  written in openpi's `make_bool_mask` notation: (6, -1, 6, -1) = six dims relative, one absolute, six relative,
  one absolute; dims past the mask stay absolute.
- a joint conversion: openpi's ALOHA policies flip some joint signs and turn the gripper's linear position into
  the angle pi0 was pretrained on (`adapt_to_pi`), on the way in and back on the way out.

The order is openpi's: state in -> conversion -> normalize; model actions -> un-normalize -> absolute (adding the
converted state) -> conversion back. `actions_in` inverts the output side, for a previous chunk given back to the
model (real-time chunking). Plain numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """openpi's notation: n > 0 adds n True, n < 0 adds -n False. make_bool_mask(6, -1) = 6 x True, 1 x False."""
    out: list[bool] = []
    for n in dims:
        out += [n > 0] * abs(int(n))
    return tuple(out)


def mask_dims(mask: Sequence[bool]) -> tuple[int, ...]:
    """The run lengths of a boolean mask in make_bool_mask notation: mask_dims(make_bool_mask(*d)) == d."""
    runs: list[int] = []
    for flag in mask:
        sign = 1 if flag else -1
        if runs and (runs[-1] > 0) == bool(flag):
            runs[-1] += sign
        else:
            runs.append(sign)
    return tuple(runs)


def parse_mask(text: str) -> tuple[int, ...]:
    """'6,-1,6,-1' (or '6 -1 6 -1', '[6, -1, 6, -1]') -> (6, -1, 6, -1); 'none' or '' -> () (no delta actions)."""
    body = str(text).strip().strip("[]()").replace(",", " ")
    if body in ("", "none"):
        return ()
    try:
        dims = tuple(int(x) for x in body.split())
    except ValueError:
        raise ValueError(f"delta action mask {text!r}: expected whole numbers in openpi's make_bool_mask notation, "
                         "e.g. '6,-1,6,-1' (6 relative dims, 1 absolute, ...), or 'none'") from None
    if any(n == 0 for n in dims):
        raise ValueError(f"delta action mask {text!r}: 0 is not a run length (n > 0: n relative dims, n < 0: -n "
                         "absolute)")
    return dims


def mask_text(dims: Sequence[int]) -> str:
    return ",".join(str(n) for n in dims) if dims else "none"


# -- ALOHA: openpi's adapt_to_pi (src/openpi/policies/aloha_policy.py), state [6 joints, gripper] x 2 arms --------
ALOHA_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float64)
ALOHA_GRIPPERS = [6, 13]
# Aloha's puppet gripper: linear position open/closed (m); Interbotix's horn radius and arm length (m); the
# encoder range pi0 was pretrained on, in radians; the puppet gripper joint open/closed (rad).
PUPPET_GRIPPER_POSITION = (0.01844, 0.05800)
HORN_RADIUS, ARM_LENGTH = 0.022, 0.036
PI_GRIPPER_RADIANS = (0.5476, 1.6296)
PUPPET_GRIPPER_JOINT = (-0.6213, 1.4910)


def _gripper_to_angular(x: np.ndarray) -> np.ndarray:
    """Aloha's linear gripper reading -> pi0's normalized gripper angle (the state, on the way in)."""
    lo, hi = PUPPET_GRIPPER_POSITION
    linear = x * (hi - lo) + lo
    cos_arg = (HORN_RADIUS**2 + linear**2 - ARM_LENGTH**2) / (2 * HORN_RADIUS * linear)
    radians = np.arcsin(np.clip(cos_arg, -1.0, 1.0))
    lo, hi = PI_GRIPPER_RADIANS
    return (radians - lo) / (hi - lo)


def _gripper_from_angular(x: np.ndarray) -> np.ndarray:
    """pi0's gripper action -> Aloha's normalized puppet gripper joint (the actions, on the way out)."""
    lo, hi = PUPPET_GRIPPER_JOINT
    return (x + PI_GRIPPER_RADIANS[0] - lo) / (hi - lo)


def _gripper_from_angular_inv(x: np.ndarray) -> np.ndarray:
    lo, hi = PUPPET_GRIPPER_JOINT
    return x * (hi - lo) + lo - PI_GRIPPER_RADIANS[0]


def _aloha_state_in(state: np.ndarray) -> np.ndarray:
    out = ALOHA_FLIP * state
    out[..., ALOHA_GRIPPERS] = _gripper_to_angular(out[..., ALOHA_GRIPPERS])
    return out


def _aloha_actions_out(actions: np.ndarray) -> np.ndarray:
    out = ALOHA_FLIP * actions
    out[..., ALOHA_GRIPPERS] = _gripper_from_angular(out[..., ALOHA_GRIPPERS])
    return out


def _aloha_actions_in(actions: np.ndarray) -> np.ndarray:
    out = ALOHA_FLIP * actions
    out[..., ALOHA_GRIPPERS] = _gripper_from_angular_inv(out[..., ALOHA_GRIPPERS])
    return out


@dataclass(frozen=True)
class Conversion:
    """A robot's joint convention <-> the one the model was trained in; `dims` is the state and action length."""

    name: str
    dims: int
    state_in: Callable[[np.ndarray], np.ndarray]
    actions_out: Callable[[np.ndarray], np.ndarray]
    actions_in: Callable[[np.ndarray], np.ndarray]
    about: str


ALOHA = Conversion("aloha", 14, _aloha_state_in, _aloha_actions_out, _aloha_actions_in,
                   "openpi's ALOHA adapt_to_pi: joints 1, 2, 8, 9 flipped, grippers linear <-> angular")
CONVERSIONS: dict[str, Conversion | None] = {"none": None, "aloha": ALOHA}


def conversion(name: str) -> Conversion | None:
    if name not in CONVERSIONS:
        raise ValueError(f"robot conversion {name!r} is not one of {', '.join(CONVERSIONS)}")
    return CONVERSIONS[name]


@dataclass(frozen=True)
class RobotTransforms:
    """Delta actions on the masked dims and a joint conversion, between the robot and the normalizer."""

    delta_mask: tuple[int, ...] = ()  # make_bool_mask notation; () = absolute actions
    conversion: str = "none"

    def __post_init__(self) -> None:
        conversion(self.conversion)
        if any(isinstance(n, bool) or not isinstance(n, int) or n == 0 for n in self.delta_mask):
            raise ValueError(f"delta mask {self.delta_mask!r}: run lengths must be non-zero whole numbers")

    @property
    def mask(self) -> np.ndarray:
        return np.array(make_bool_mask(*self.delta_mask), dtype=bool)

    @property
    def identity(self) -> bool:
        return not self.mask.any() and self.conversion == "none"

    @property
    def label(self) -> str:
        parts = [f"delta actions {mask_text(self.delta_mask)}"] if self.mask.any() else []
        parts += [f"{self.conversion} conversion"] if self.conversion != "none" else []
        return " + ".join(parts) or "none"

    def check(self, state_dim: int | None, action_dim: int) -> None:
        """One line on why these transforms cannot apply to a robot with these dims; silent when they can."""
        conv = conversion(self.conversion)
        if conv is not None:
            got = {"state": state_dim, "action": action_dim}
            bad = {k: v for k, v in got.items() if v is not None and v != conv.dims}
            if bad:
                raise ValueError(f"the {conv.name} conversion needs {conv.dims} state and action dims, got "
                                 + ", ".join(f"{v} {k} dims" for k, v in bad.items()))
        relative = np.flatnonzero(self.mask)
        if relative.size:
            last = int(relative[-1]) + 1
            limits = {"robot action": action_dim, "robot state": state_dim}
            short = [f"{v} {k} dims" for k, v in limits.items() if v is not None and last > v]
            if short:
                raise ValueError(f"delta action mask {mask_text(self.delta_mask)} makes dim {last - 1} relative, "
                                 f"but there are only {' and '.join(short)}")

    def state_in(self, state: np.ndarray) -> np.ndarray:
        """Robot state -> the state the model's statistics describe (float64)."""
        x = np.asarray(state, dtype=np.float64)
        conv = conversion(self.conversion)
        return x if conv is None else conv.state_in(x.copy())

    def _offset(self, n: int, state: np.ndarray) -> np.ndarray:
        mask = self.mask[:n]
        k = min(mask.size, state.size)
        offset = np.zeros(n)
        offset[:k] = np.where(mask[:k], state[:k], 0.0)
        return offset

    def actions_out(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Un-normalized model actions (..., action_dim) and the converted state (from state_in) -> robot actions."""
        a = np.asarray(actions, dtype=np.float64)
        if self.mask.any():
            a = a + self._offset(a.shape[-1], np.asarray(state, dtype=np.float64))
        conv = conversion(self.conversion)
        return a if conv is None else conv.actions_out(a.copy())

    def actions_in(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Robot actions -> what the model predicts before un-normalization: the inverse of actions_out."""
        a = np.asarray(actions, dtype=np.float64)
        conv = conversion(self.conversion)
        a = a if conv is None else conv.actions_in(a.copy())
        if self.mask.any():
            a = a - self._offset(a.shape[-1], np.asarray(state, dtype=np.float64))
        return a
