"""Normalization of state in and actions out, with openpi's or LeRobot's statistics and formulas."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

EPS = 1e-6  # openpi adds this to std and to (q99 - q01)
Mode = Literal["mean_std", "quantile", "min_max", "identity"]
MODES = ("mean_std", "quantile", "min_max", "identity")
Convention = Literal["openpi", "lerobot"]
REQUIRED_KEYS = ("state", "actions")


def default_mode(kind: str) -> Mode:
    """openpi normalizes pi0 with mean/std and pi0.5 with quantiles."""
    return "quantile" if kind == "pi05" else "mean_std"


def _vector(value, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not a list of numbers ({e})") from e
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D list, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: NaN/inf at indices {bad.tolist()}")
    return arr


@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one quantity; q01/q99 (min/max) are needed only for quantile (min_max) mode."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    def __post_init__(self):
        fields = {"mean": self.mean, "std": self.std, "q01": self.q01, "q99": self.q99, "min": self.min,
                  "max": self.max}
        for k, v in fields.items():
            if v is not None:
                object.__setattr__(self, k, _vector(v, k))
        dims = {k: getattr(self, k).size for k in fields if getattr(self, k) is not None}
        if len(set(dims.values())) != 1:
            raise ValueError(f"norm stats have different lengths: {dims}")
        for lo, hi in (("q01", "q99"), ("min", "max")):
            if (getattr(self, lo) is None) != (getattr(self, hi) is None):
                raise ValueError(f"norm stats have only one of {lo}/{hi}")
        neg = np.flatnonzero(self.std < 0)
        if neg.size:
            raise ValueError(f"negative std at indices {neg.tolist()}")
        if self.q01 is not None:
            inv = np.flatnonzero(self.q99 < self.q01)
            if inv.size:
                raise ValueError(f"q99 < q01 at indices {inv.tolist()}")
        if self.min is not None:
            inv = np.flatnonzero(self.max < self.min)
            if inv.size:
                raise ValueError(f"max < min at indices {inv.tolist()}")

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    @classmethod
    def from_dict(cls, d: dict, what: str = "stats") -> NormStats:
        if not isinstance(d, dict):
            raise ValueError(f"{what}: expected an object with mean/std[/q01/q99], got {type(d).__name__}")
        missing = [k for k in ("mean", "std") if k not in d]
        if missing:
            raise ValueError(f"{what}: missing {missing} (has {sorted(d)})")
        try:
            return cls(d["mean"], d["std"], d.get("q01"), d.get("q99"), d.get("min"), d.get("max"))
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e

    def to_dict(self) -> dict:
        d = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        for k in ("q01", "q99", "min", "max"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k).tolist()
        return d


@dataclass(frozen=True)
class Statistics:
    """Statistics as a checkpoint's trainer left them: values, modes, and whose formulas apply."""

    stats: dict[str, NormStats]
    origin: str  # the file(s) they came from
    convention: Convention = "openpi"
    modes: dict[str, Mode] | None = None  # None: the preset's default (openpi's norm_stats.json names no mode)
    eps: float = EPS


def _json_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, "norm_stats.json") if os.path.isdir(path) else path


def load_openpi_stats(path: str | os.PathLike) -> Statistics:
    """openpi's norm_stats.json as Statistics."""
    return Statistics(load_norm_stats(path), origin=_json_path(path))


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    """Read openpi's norm_stats.json (a file, or a directory holding one): {"norm_stats": {"state": ..., ...}}."""
    path = _json_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"norm stats file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("norm_stats"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path!r}: expected {{\"norm_stats\": {{\"state\": ..., \"actions\": ...}}}} "
                         f"as openpi writes it, found top level {found}")
    entries = data["norm_stats"]
    missing = [k for k in REQUIRED_KEYS if k not in entries]
    if missing:
        raise ValueError(f"{path!r}: norm_stats lacks {missing} (has {sorted(entries)})")
    return {k: NormStats.from_dict(v, f"{path}: norm_stats.{k}") for k, v in entries.items()}


def save_norm_stats(path: str | os.PathLike, stats: dict[str, NormStats]) -> None:
    """Write stats in openpi's layout (to path, or to path/norm_stats.json if path is a directory)."""
    path = _json_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"norm_stats": {k: v.to_dict() for k, v in stats.items()}}, f, indent=2)


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        where = [tuple(int(i) for i in b) if len(b) > 1 else int(b[0]) for b in bad[:16]]
        more = f" (and {len(bad) - 16} more)" if len(bad) > 16 else ""
        raise ValueError(f"{what} has NaN/inf at indices {where}{more}")


class Normalizer:
    """Robot state -> normalized, zero-padded model state; model actions -> robot units, first D dims.

    openpi: mean_std (x - mean) / (std + 1e-6); quantile [q01, q99] -> [-1, 1] as
    (x - q01) / (q99 - q01 + 1e-6) * 2 - 1; the inverse with the same epsilon.
    LeRobot: mean_std (x - mean) / (std + eps), back as x * std + mean; quantile and min_max
    2 (x - lo) / (hi - lo) - 1, eps only where hi == lo.
    `mode` is one for both, or per key ({"state": ..., "actions": ...}). With stats=None both directions are
    the identity (plus padding / slicing), with a notice.
    """

    def __init__(self, stats: dict[str, NormStats] | None, mode: Mode | dict[str, Mode] = "mean_std",
                 model_dim: int = 32, action_dim: int | None = None, convention: Convention = "openpi",
                 eps: float = EPS):
        self.modes = dict(mode) if isinstance(mode, dict) else {k: mode for k in REQUIRED_KEYS}
        for k in REQUIRED_KEYS:
            if self.modes.get(k) not in MODES:
                raise ValueError(f"{k} mode must be one of {MODES}, got {self.modes.get(k)!r}")
        if convention not in ("openpi", "lerobot"):
            raise ValueError(f"convention must be openpi or lerobot, got {convention!r}")
        modes = set(self.modes.values())
        self.mode = modes.pop() if len(modes) == 1 else "/".join(self.modes[k] for k in REQUIRED_KEYS)
        self.convention, self.eps = convention, float(eps)
        self.model_dim = int(model_dim)
        self.stats, self.origin = stats, ""
        if stats is None:
            log.warning("no normalization stats given: state and actions pass through unnormalized "
                        "(fine for the random-weight demo; real checkpoints need their norm_stats.json)")
            self.action_dim = self.model_dim if action_dim is None else int(action_dim)
        else:
            missing = [k for k in REQUIRED_KEYS if k not in stats]
            if missing:
                raise ValueError(f"norm stats lack {missing} (have {sorted(stats)})")
            for k in REQUIRED_KEYS:
                for m, lo, hi in (("quantile", "q01", "q99"), ("min_max", "min", "max")):
                    if self.modes[k] == m and getattr(stats[k], lo) is None:
                        raise ValueError(f"{m} normalization needs {lo}/{hi} for {k!r}, which the stats lack")
                if stats[k].dim > self.model_dim:
                    raise ValueError(f"{k} stats have {stats[k].dim} dims, more than the model's {self.model_dim}")
            n = stats["actions"].dim
            self.action_dim = n if action_dim is None else int(action_dim)
            if self.action_dim > n:
                raise ValueError(f"action_dim {self.action_dim} > {n} dims in the action stats")
        if not 0 < self.action_dim <= self.model_dim:
            raise ValueError(f"action_dim must be in 1..{self.model_dim}, got {self.action_dim}")
        self._warned_short_state = False

    @property
    def state_dim(self) -> int | None:
        """Robot state length the stats describe (None without stats)."""
        return None if self.stats is None else self.stats["state"].dim

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, mode: Mode = "mean_std", model_dim: int = 32,
                  action_dim: int | None = None) -> Normalizer:
        return cls(None if path is None else load_norm_stats(path), mode, model_dim, action_dim)

    @classmethod
    def from_statistics(cls, s: Statistics | None, default_mode: Mode, model_dim: int = 32,
                        action_dim: int | None = None) -> Normalizer:
        """The source's own modes and formulas; `default_mode` where the source names none."""
        if s is None:
            return cls(None, default_mode, model_dim, action_dim)
        norm = cls(s.stats, s.modes or default_mode, model_dim, action_dim, s.convention, s.eps)
        norm.origin = s.origin
        return norm

    def _affine(self, key: str, n: int, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(shift, scale) over the first n dims such that normalized = (x - shift) / scale (x = y * scale + shift
        back: LeRobot's mean_std is the one formula whose inverse has no eps)."""
        s, mode, lerobot = self.stats[key], self.modes[key], self.convention == "lerobot"
        if mode == "identity":
            return np.zeros(n), np.ones(n)
        if mode == "mean_std":
            return s.mean[:n], s.std[:n] + (0.0 if lerobot and inverse else self.eps)
        lo, hi = (s.q01[:n], s.q99[:n]) if mode == "quantile" else (s.min[:n], s.max[:n])
        width = np.where(hi == lo, self.eps, hi - lo) if lerobot else hi - lo + self.eps
        # (x - lo) / width * 2 - 1 == (x - mid) / half, mid = lo + half, half = width / 2
        return lo + width / 2.0, width / 2.0

    def normalize_state(self, state: np.ndarray, pad: bool = True) -> np.ndarray:
        """Robot state (n,) -> float32 normalized state, zero-padded to (model_dim,) unless pad=False.

        pi0.5 discretizes the unpadded vector into its prompt (openpi tokenizes before padding): use pad=False there.
        """
        x = np.asarray(state, dtype=np.float64)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"state must be a non-empty 1-D vector, got shape {x.shape}")
        _check_finite(x, "state")
        n = x.size
        if n > self.model_dim:
            raise ValueError(f"state has {n} dims, more than the model's {self.model_dim}")
        if self.stats is not None:
            dim = self.stats["state"].dim
            if n > dim:
                raise ValueError(f"state has {n} dims but the norm stats describe {dim}")
            if n < dim and not self._warned_short_state:
                # openpi does the same (uses the first n stats); say so, since it may hide a joint-order mix-up.
                log.warning("state has %d dims, norm stats %d: normalizing with the first %d", n, dim, n)
                self._warned_short_state = True
            shift, scale = self._affine("state", n)
            x = (x - shift) / scale
        out = np.zeros(self.model_dim if pad else n, dtype=np.float32)
        out[:n] = x
        return out

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Robot actions (..., action_dim) -> float32 model actions (..., model_dim), zero-padded: the inverse of
        unnormalize_actions, for a previous chunk given back to the model (real-time chunking)."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim < 1 or a.shape[-1] != self.action_dim:
            raise ValueError(f"actions must have last dim {self.action_dim} (robot action dims), got shape {a.shape}")
        _check_finite(a, "actions")
        if self.stats is not None:
            shift, scale = self._affine("actions", self.action_dim)
            a = (a - shift) / scale
        out = np.zeros((*a.shape[:-1], self.model_dim), dtype=np.float32)
        out[..., : self.action_dim] = a
        return out

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Model actions (..., model_dim) -> float32 robot actions (..., action_dim)."""
        a = np.asarray(actions)
        if a.ndim < 1 or a.shape[-1] != self.model_dim:
            raise ValueError(f"actions must have last dim {self.model_dim}, got shape {a.shape}")
        a = a[..., : self.action_dim].astype(np.float64)
        _check_finite(a, "model actions")
        if self.stats is not None:
            shift, scale = self._affine("actions", self.action_dim, inverse=True)
            a = a * scale + shift
        return a.astype(np.float32)


def identity_stats(dim: int) -> dict[str, NormStats]:
    """Stats that (up to the 1e-6 epsilon) change nothing, in both modes; for tests and the demo."""
    zeros, ones = np.zeros(dim), np.ones(dim)
    return {k: NormStats(zeros, ones, -ones, ones) for k in REQUIRED_KEYS}

