"""The latest-message / max-age policy that turns camera, joint and prompt inputs into one Observation.

Shared by the ROS node and the bag evaluator (through PolicyNodeLogic), so both select inputs the same way.
Setters raise pi_policy.node.inputs.MessageError (a ValueError) on bad input and keep the previous value.

Rules, applied at `assemble(now)` (all times in seconds on the clock the stamps use):
- Only the latest message per input is kept; nothing is queued.
- An input is stale when now - stamp > max_age_s, and "from the future" when stamp - now > max_future_s
  (usually two machines' clocks disagree). A zero stamp counts as stale with its own message: it means the
  driver never set header.stamp.
- A required camera (default: all cameras) or the joint state being missing, stale or in the future skips the
  tick (errors). An optional camera in that state is left out of Observation.images, which the model masks,
  and the tick runs with a warning.
- Observation.stamp is the OLDEST stamp among the inputs used: the observation is only as fresh as its oldest
  part, and age_s = now - stamp is what the max-age rule bounds. The action chunk is stamped with it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from pi_policy.cameras import CameraSet
from pi_policy.node.inputs import MessageError
from pi_policy.node.params import NodeParams
from pi_policy.observation import Observation


@dataclass
class Assembled:
    observation: Observation | None
    errors: list[str] = field(default_factory=list)  # non-empty <=> observation is None
    warnings: list[str] = field(default_factory=list)
    age_s: float | None = None  # now - observation.stamp

    @property
    def ok(self) -> bool:
        return self.observation is not None


def _check_stamp(stamp: float, what: str) -> float:
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float, np.floating, np.integer)):
        raise MessageError(f"{what}: stamp must be a number of seconds, got {type(stamp).__name__}")
    if not math.isfinite(stamp):
        raise MessageError(f"{what}: stamp {stamp} is not finite")
    return float(stamp)


class ObservationAssembler:
    def __init__(
        self,
        cameras: CameraSet,
        max_age_s: float = NodeParams.max_observation_age_s,
        max_future_s: float = NodeParams.max_future_skew_s,
        prompt: str = "",
    ):
        """cameras: the subscribed cameras (in their order) and the required ones (pi_policy.cameras)."""
        self.cameras = cameras.check()
        if not max_age_s > 0 or not max_future_s >= 0:
            raise ValueError(f"max_age_s must be > 0 and max_future_s >= 0, got {max_age_s}, {max_future_s}")
        self.camera_names = list(cameras.subscribed)
        self.max_age_s = float(max_age_s)
        self.max_future_s = float(max_future_s)
        self._prompt = prompt
        self._images: dict[str, tuple[float, np.ndarray]] = {}
        self._joints: tuple[float, np.ndarray] | None = None
        self._generation = 0  # bumped by every new image or joint state
        self._consumed = 0  # generation of the last assembled observation
        self._lock = threading.Lock()  # setters run on subscription threads while assemble runs on the timer

    def set_image(self, camera: str, stamp: float, rgb: np.ndarray) -> None:
        if camera not in self.camera_names:
            raise MessageError(f"unknown camera '{camera}', expected one of {self.camera_names}")
        stamp = _check_stamp(stamp, f"camera {camera}")
        is_rgb = isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        if not is_rgb:
            desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise MessageError(f"camera {camera}: image must be HxWx3 uint8 RGB, got {desc}")
        with self._lock:
            self._images[camera] = (stamp, rgb)
            self._generation += 1

    def set_joints(self, stamp: float, state: np.ndarray) -> None:
        stamp = _check_stamp(stamp, "joint state")
        try:
            state = np.asarray(state, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            kind = type(state).__name__
            raise MessageError(f"joint state must be a vector of numbers, got {kind}") from None
        if not np.isfinite(state).all():
            raise MessageError("joint state has non-finite values")
        with self._lock:
            self._joints = (stamp, state)
            self._generation += 1

    def set_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str):
            raise MessageError(f"prompt must be a string, got {type(prompt).__name__}")
        with self._lock:
            self._prompt = prompt

    @property
    def prompt(self) -> str:
        return self._prompt

    def has_new_data(self) -> bool:
        return self._generation != self._consumed

    def _problem(self, what: str, stamp: float, now: float) -> str | None:
        if stamp == 0.0:
            return f"{what} has a zero stamp (the driver does not set header.stamp)"
        age = now - stamp
        if age > self.max_age_s:
            return f"{what} is stale by {(age - self.max_age_s) * 1e3:.0f} ms (age {age * 1e3:.0f} ms, " \
                   f"max {self.max_age_s * 1e3:.0f} ms)"
        if -age > self.max_future_s:
            return f"{what} stamp is {-age * 1e3:.0f} ms in the future (clocks out of sync? " \
                   f"max {self.max_future_s * 1e3:.0f} ms)"
        return None

    def assemble(self, now: float) -> Assembled:
        now = _check_stamp(now, "now")
        with self._lock:
            images = dict(self._images)
            joints = self._joints
            prompt = self._prompt
            generation = self._generation
        errors: list[str] = []
        warnings: list[str] = []
        used: dict[str, np.ndarray] = {}
        stamps: list[float] = []
        for cam in self.camera_names:
            required = self.cameras.is_required(cam)
            if cam not in images:
                problem = f"no image yet from camera {cam}"
            else:
                stamp, rgb = images[cam]
                problem = self._problem(f"camera {cam}", stamp, now)
                if problem is None:
                    used[cam] = rgb
                    stamps.append(stamp)
            if problem is not None:
                if required:
                    errors.append(problem)
                else:
                    warnings.append(f"{problem}; optional, masked out")
        if joints is None:
            errors.append("no joint state yet")
        else:
            problem = self._problem("joint state", joints[0], now)
            if problem is not None:
                errors.append(problem)
            stamps.append(joints[0])
        if not used and not errors:
            errors.append("no usable camera image")
        if errors:
            return Assembled(None, errors, warnings)
        stamp = min(stamps)
        self._consumed = generation
        obs = Observation(images=used, state=joints[1].copy(), prompt=prompt, stamp=stamp)
        return Assembled(obs, [], warnings, now - stamp)
