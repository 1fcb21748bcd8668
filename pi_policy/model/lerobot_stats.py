"""Normalization statistics from the processor files LeRobot (0.4+) saves beside a policy's weights.

`policy_preprocessor.json` lists the steps; its `normalizer_processor` step names the features, the mode per
feature type (`norm_map`), `eps`, and a safetensors `state_file` of flat `<feature>.<stat>` tensors.
`policy_postprocessor.json` does the same for the `unnormalizer_processor` that turns actions back.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file

from .normalize import Mode, NormStats, Statistics

PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
STATE, ACTION = "observation.state", "action"
# LeRobot's NormalizationMode values; QUANTILE10 (q10/q90) has no counterpart in openpi and is refused.
MODES: dict[str, Mode] = {"MEAN_STD": "mean_std", "QUANTILES": "quantile", "MIN_MAX": "min_max",
                          "IDENTITY": "identity"}


def has_processor(root: str | Path) -> bool:
    return (Path(root) / PREPROCESSOR).is_file()


def _step(path: Path, registry_name: str) -> dict:
    try:
        config = json.loads(path.read_text())
        steps = config["steps"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a LeRobot processor file ({e})") from None
    found = [s for s in steps if isinstance(s, dict) and s.get("registry_name") == registry_name]
    if not found:
        names = [s.get("registry_name") or s.get("class") for s in steps if isinstance(s, dict)]
        raise ValueError(f"{path}: no '{registry_name}' step (steps: {names})")
    return found[0]


def _feature_stats(path: Path, step: dict, feature: str) -> tuple[NormStats, Mode]:
    config = step.get("config") or {}
    features, norm_map = config.get("features") or {}, config.get("norm_map") or {}
    if feature not in features:
        raise ValueError(f"{path}: the normalizer has no feature {feature!r} (has {sorted(features)})")
    kind = features[feature].get("type")
    name = norm_map.get(kind, "IDENTITY")  # LeRobot leaves a type without a mode unnormalized
    if name not in MODES:
        raise ValueError(f"{path}: normalization mode {name!r} for {feature} is not supported "
                         f"(supported: {sorted(MODES)})")
    if "state_file" not in step:
        raise ValueError(f"{path}: the {step['registry_name']} step has no state_file (no statistics were saved)")
    state_file = path.parent / step["state_file"]
    try:
        tensors = load_file(str(state_file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{state_file}: cannot read LeRobot's statistics ({e})") from None
    prefix = feature + "."
    values = {k[len(prefix):]: v.reshape(-1) for k, v in tensors.items() if k.startswith(prefix)}
    try:
        return NormStats.from_dict(values, f"{state_file}: {feature}"), MODES[name]
    except ValueError as e:
        raise ValueError(str(e)) from None


def load_lerobot_stats(path: str | Path) -> Statistics:
    """State statistics from the preprocessor, action statistics from the postprocessor (the preprocessor's
    copy when there is no postprocessor), with LeRobot's modes and eps. `path`: the folder or either JSON file."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    pre, post = root / PREPROCESSOR, root / POSTPROCESSOR
    if not pre.is_file():
        raise FileNotFoundError(f"LeRobot processor file not found: {pre}")
    norm = _step(pre, "normalizer_processor")
    state, state_mode = _feature_stats(pre, norm, STATE)
    unnorm_file, unnorm = (post, _step(post, "unnormalizer_processor")) if post.is_file() else (pre, norm)
    actions, action_mode = _feature_stats(unnorm_file, unnorm, ACTION)
    eps = float((unnorm.get("config") or {}).get("eps", 1e-8))
    origin = str(pre) + (f" + {post.name}" if post.is_file() else "")
    return Statistics({"state": state, "actions": actions}, origin, "lerobot",
                      {"state": state_mode, "actions": action_mode}, eps)
