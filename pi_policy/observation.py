"""The small, stable interface between the robot side and the model side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

STAGES = ("vision", "embed_prefix", "prefill", "denoise")


@dataclass
class Observation:
    """One observation at one instant, in robot units.

    images: camera name -> HxWx3 uint8 RGB (any size; resized with padding to the model's input).
            A camera the model expects but that is absent here is masked out.
    state: joint positions (or any proprioceptive vector) in the configured joint order.
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompt: str
    stamp: float = 0.0


@dataclass
class LatencyRecord:
    """Per-stage latency of one inference, in milliseconds."""

    stages_ms: dict[str, float]
    host_ms: float = 0.0  # numpy in -> numpy out, as the robot sees it
    backends: dict[str, str] = field(default_factory=dict)
    prep_ms: float = 0.0  # host work before the first stage: validation, tokenization, normalization, uploads

    @property
    def total_ms(self) -> float:
        return float(sum(self.stages_ms.values()))

    @property
    def hz(self) -> float:
        return 1000.0 / self.total_ms if self.total_ms > 0 else 0.0


@dataclass
class PolicyOutput:
    actions: np.ndarray  # (horizon, action_dim) float32, unnormalized, robot units
    latency: LatencyRecord


class Policy(Protocol):
    """What the ROS node and the bag evaluator call. PolicyRunner implements it.

    With real-time chunking on, the node also passes prev_chunk (the rest of the chunk being executed, robot
    units, row j at obs.stamp + j control periods) and delay (control periods until the new chunk arrives).
    """

    camera_names: list[str]
    horizon: int
    action_dim: int
    backends: dict[str, str]  # stage -> what ran it (a label such as bf16-graph-compiled)
    backend_note: str  # why a stage runs other than asked, or what to know about it; empty if nothing


    def infer(self, obs: Observation, **continuation) -> PolicyOutput: ...
