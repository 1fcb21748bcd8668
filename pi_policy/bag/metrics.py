"""Error, discontinuity and latency metrics of predicted action chunks against recorded actions."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pi_policy.runtime.stats import percentiles, relative_error


@dataclass
class Trace:
    """Everything one backend produced over the evaluated ticks of a bag.

    Step k of chunk i is compared with the recorded action at times[i] + (k + step_offset) * control_period_s.
    """

    backend: str
    joint_names: list[str]
    control_period_s: float
    step_offset: int
    ticks: np.ndarray  # (N,) indices of the evaluated ticks in the tick schedule
    times: np.ndarray  # (N,) observation stamps: a chunk's stamp, as the node publishes it
    predicted: np.ndarray  # (N, H, J) first J dims of each chunk
    recorded: np.ndarray  # (N, H, J) zero where not valid
    valid: np.ndarray  # (N, H) bool
    latency_ms: dict[str, np.ndarray]  # stage -> (N,), plus "host" and "total"


    def subset(self, ticks: np.ndarray) -> Trace:
        """The same trace restricted to the given tick indices (all of which it must hold)."""
        keep = np.isin(self.ticks, ticks)
        return replace(self, ticks=self.ticks[keep], times=self.times[keep], predicted=self.predicted[keep],
                       recorded=self.recorded[keep], valid=self.valid[keep],
                       latency_ms={k: v[keep] for k, v in self.latency_ms.items()})


def _masked_mean(x: np.ndarray, mask: np.ndarray, axis) -> np.ndarray:
    """Mean of x over `axis` where mask is set; NaN where nothing is set."""
    mask = np.broadcast_to(mask, x.shape)
    count = mask.sum(axis=axis)
    total = np.where(mask, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def tick_errors(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Per-tick mean |error| and mean squared error over valid steps and all joints: two (N,) arrays."""
    err = trace.predicted - trace.recorded
    mask = trace.valid[:, :, None]
    return _masked_mean(np.abs(err), mask, (1, 2)), _masked_mean(err**2, mask, (1, 2))


def discontinuity(trace: Trace) -> np.ndarray:
    """Jump at each chunk boundary: (N-1,) mean over joints of |new_chunk[0] - previous chunk at that time|.

    The previous chunk is interpolated between its steps at the time of the new chunk's first step:
    the action the robot would have been executing when it switched chunks. NaN where the previous
    chunk does not reach that far.
    """
    n, horizon = trace.predicted.shape[:2]
    out = np.full(max(n - 1, 0), np.nan)
    steps = np.arange(horizon) * trace.control_period_s
    for i in range(1, n):
        dt = trace.times[i] - trace.times[i - 1]
        if horizon and 0 <= dt <= steps[-1]:
            prev = [np.interp(dt, steps, trace.predicted[i - 1, :, j]) for j in range(trace.predicted.shape[2])]
            out[i - 1] = np.abs(trace.predicted[i, 0] - np.asarray(prev)).mean()
    return out


def summarize(trace: Trace, first_k: int) -> dict:
    """The metrics.json block of one backend."""
    err = trace.predicted - trace.recorded
    mask = trace.valid[:, :, None]
    k = max(1, min(first_k, err.shape[1])) if err.ndim == 3 else 1
    per_joint = {}
    for j, name in enumerate(trace.joint_names):
        e, m = err[:, :, j], trace.valid
        per_joint[name] = {
            "mae": _scalar(_masked_mean(np.abs(e), m, None)),
            "mse": _scalar(_masked_mean(e**2, m, None)),
            "mae_first_k": _scalar(_masked_mean(np.abs(e[:, :k]), m[:, :k], None)),
            "mse_first_k": _scalar(_masked_mean(e[:, :k] ** 2, m[:, :k], None)),
        }
    tick_mae, tick_mse = tick_errors(trace)
    jumps = discontinuity(trace)
    finite_jumps = jumps[np.isfinite(jumps)]
    return {
        "ticks": int(len(trace.times)),
        "first_k": k,
        "mae": _scalar(_masked_mean(np.abs(err), mask, None)),
        "mse": _scalar(_masked_mean(err**2, mask, None)),
        "mae_first_k": _scalar(_masked_mean(np.abs(err[:, :k]), mask[:, :k], None)),
        "mse_first_k": _scalar(_masked_mean(err[:, :k] ** 2, mask[:, :k], None)),
        "per_joint": per_joint,
        "mae_by_step": [_scalar(v) for v in _masked_mean(np.abs(err), mask, (0, 2))] if err.ndim == 3 else [],
        "tick_mae": percentiles(tick_mae),
        "discontinuity": percentiles(finite_jumps) | {"max": _scalar(finite_jumps.max())
                                                       if finite_jumps.size else None},
        "latency_ms": {stage: percentiles(v) for stage, v in trace.latency_ms.items()},
    }


def compare(candidate: Trace, baseline: Trace) -> dict:
    """How far a candidate backend's chunks and latency are from the baseline's on the same ticks."""
    common = np.intersect1d(candidate.ticks, baseline.ticks)
    candidate, baseline = candidate.subset(common), baseline.subset(common)
    a = candidate.predicted.astype(np.float64)
    b = baseline.predicted.astype(np.float64)
    diff = np.abs(a - b)
    cand_sum, base_sum = summarize(candidate, 1), summarize(baseline, 1)
    latency = {}
    for stage in baseline.latency_ms:
        if stage in candidate.latency_ms:
            pc, pb = percentiles(candidate.latency_ms[stage])["p50"], percentiles(baseline.latency_ms[stage])["p50"]
            speedup = pb / pc if pc and pb is not None else None
            latency[stage] = {"p50_ms": pc, "baseline_p50_ms": pb, "speedup": speedup}
    return {
        "baseline": baseline.backend,
        "candidate": candidate.backend,
        "common_ticks": int(len(common)),
        "actions": {
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "rel_err": relative_error(a, b),
            "per_joint_mean_abs_diff": {name: float(diff[..., j].mean()) if diff.size else 0.0
                                        for j, name in enumerate(baseline.joint_names)},
        },
        "mae_delta": _delta(cand_sum["mae"], base_sum["mae"]),
        "mse_delta": _delta(cand_sum["mse"], base_sum["mse"]),
        "latency": latency,
    }


def _scalar(x) -> float | None:
    """JSON-safe float: NaN (no data) becomes None."""
    x = float(x)
    return x if np.isfinite(x) else None


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
