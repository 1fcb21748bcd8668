"""Static FP8 activation scales for every FP8 linear (vision tower and prefill), from sample observations.

A bf16 runner over the model computes, for each observation, the model-space images and the prefix the vision
and prefill stages read; FP8 copies of both stages then record the largest |x| each of their linears sees.
`pi-policy calibrate` writes the result as a calibration file; `verify --scales static` uses it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pi_policy.model.pi0 import PiModel
from pi_policy.model.preprocess import pixels_to_model
from pi_policy.observation import Observation
from pi_policy.runtime.spec import FP8Options


class CalibrationSample(NamedTuple):
    images: Tensor  # (1, cameras, 3, H, W) in [-1, 1]: what the vision stage reads
    prefix_embs: Tensor  # (1, P, D): what the prefill reads
    prefix_pad: Tensor  # (1, P) bool


@dataclass
class Calibration:
    amax: dict[str, float]  # per linear: `layers.{i}.{name}` (prefill), `vision.blocks.{i}.{name}`, `vision.projector`
    prefill_running: int  # FP8 linears the prefill runs (each gets a scale)
    prefill_quantized: int  # FP8 linears in the prefill's copies (the last layer's wo and MLP never run)
    vision_linears: int

    def describe(self) -> str:
        n_prefill = sum(not k.startswith("vision.") for k in self.amax)
        n_vision = len(self.amax) - n_prefill
        return (f"static activation scales for {n_prefill} of the {self.prefill_running} FP8 linears the prefill "
                f"runs (of {self.prefill_quantized} quantized: the last layer computes only K/V) and {n_vision} of "
                f"the {self.vision_linears} FP8 linears of the vision tower")


def capture_samples(runner, observations: list[Observation], noise: np.ndarray) -> list[CalibrationSample]:
    """The vision and prefill inputs `runner` computes for each observation."""
    samples = []
    for obs in observations:
        with torch.no_grad():
            runner.infer(obs, noise=noise)
        b = runner.buf
        samples.append(CalibrationSample(pixels_to_model(b.images).clone(), b.prefix_embs.clone(),
                                         b.prefix_pad.clone()))
    return samples


def calibrate_fp8(model: PiModel, samples: list[CalibrationSample], fp8: FP8Options | None = None,
                  progress: bool = False) -> Calibration:
    """amax per FP8 linear of the vision tower and the prefill (the model is only read). fp8: the options of the
    quantized copies the activations flow through."""
    from pi_policy.runtime.prefill.fp8 import build_fp8_prefill
    from pi_policy.runtime.vision.fp8 import build_fp8_vision

    if not samples:
        raise ValueError("FP8 calibration needs at least one sample observation")
    fp8 = fp8 or FP8Options()
    vision, _ = build_fp8_vision(model, **fp8.vision_kwargs())
    amax = vision.calibrate([s.images for s in samples], progress=progress)
    n_vision = len(vision.linears())
    del vision
    # calibration runs the plain blocks
    prefill = build_fp8_prefill(model, **(fp8.kwargs() | {"fuse_producers": False, "compile_blocks": False})).fn
    amax |= prefill.calibrate([(s.prefix_embs, s.prefix_pad) for s in samples], progress=progress)
    return Calibration(amax, len(prefill.running_linears()), len(prefill.linears()), n_vision)
