"""FP8 calibration files: static activation amax per linear, as JSON beside an engine or a config."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

FORMAT = "pi_policy.fp8_calibration.v1"


def save_calibration(path: str | Path, amax: dict[str, float], info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "act_amax": amax, **(info or {})},
                               indent=2))
    return path


def load_calibration(path: str | Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FP8 calibration file not found: {path}")
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data["act_amax"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not an FP8 calibration file (want JSON with an 'act_amax' map): {e}") from None


def amax_of(calibration: str | Path | dict) -> dict[str, float]:
    """A calibration given as a file or as a map of amax per linear: the map."""
    if isinstance(calibration, (str, Path)):
        return load_calibration(calibration)
    return {str(k): float(v) for k, v in calibration.items()}


def apply_calibration(target, calibration: str | Path | dict | Iterable, select: Callable[[dict], dict],
                      progress: bool = False) -> None:
    """Static scales for `target` (an FP8 prefill or vision tower): from a file or an amax map (its entries picked
    by `select`), or measured on an iterable of samples."""
    if isinstance(calibration, (str, Path, dict)):
        target.set_amax(select(amax_of(calibration)))
    else:
        target.calibrate(calibration, progress=progress)
