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


@dataclass
class Pool:
    """One backend's scored ticks reduced to what the metrics need: error sums over ticks and steps, which add
    up across bags, and the per-tick values that percentiles need, which concatenate. summarize() of the pool
    of several bags is the metrics of all their ticks together."""

    joint_names: list[str]
    abs_sum: np.ndarray  # (H, J) sum over ticks of |error| at valid steps
    sq_sum: np.ndarray  # (H, J) the same for error^2
    count: np.ndarray  # (H,) ticks with a valid target at each step
    tick_mae: np.ndarray  # (N,)
    jumps: np.ndarray  # (N - 1,) per bag: discontinuity(), NaN where undefined
    latency_ms: dict[str, np.ndarray]  # stage -> (N,)

    @classmethod
    def from_trace(cls, trace: Trace) -> Pool:
        err = trace.predicted - trace.recorded
        valid = trace.valid[:, :, None]
        return cls(list(trace.joint_names), np.where(valid, np.abs(err), 0.0).sum(axis=0),
                   np.where(valid, err**2, 0.0).sum(axis=0), trace.valid.sum(axis=0).astype(np.int64),
                   tick_errors(trace)[0], discontinuity(trace), dict(trace.latency_ms))

    @classmethod
    def merge(cls, pools: list[Pool]) -> Pool:
        """The pool of several bags' ticks (same joints and horizon)."""
        if not pools:
            raise ValueError("no pools to merge")
        first = pools[0]
        for p in pools[1:]:
            if p.joint_names != first.joint_names or p.abs_sum.shape != first.abs_sum.shape:
                raise ValueError(f"cannot pool {p.joint_names} x {p.abs_sum.shape[0]} steps with "
                                 f"{first.joint_names} x {first.abs_sum.shape[0]} steps")
        stages = list(dict.fromkeys(k for p in pools for k in p.latency_ms))
        latency = {k: np.concatenate([p.latency_ms.get(k, np.full(len(p.tick_mae), np.nan)) for p in pools])
                   for k in stages}
        return cls(list(first.joint_names), sum(p.abs_sum for p in pools), sum(p.sq_sum for p in pools),
                   sum(p.count for p in pools), np.concatenate([p.tick_mae for p in pools]),
                   np.concatenate([p.jumps for p in pools]), latency)


def summarize(trace: Trace | Pool, first_k: int) -> dict:
    """The metrics.json block of one backend: of one bag's trace, or of a pool of bags."""
    pool = trace if isinstance(trace, Pool) else Pool.from_trace(trace)
    horizon, n_joints = pool.abs_sum.shape
    k = max(1, min(first_k, horizon))

    def mean(total, count) -> float | None:
        return _scalar(total / count) if count > 0 else None

    n, n_k = pool.count.sum(), pool.count[:k].sum()
    per_joint = {name: {"mae": mean(pool.abs_sum[:, j].sum(), n), "mse": mean(pool.sq_sum[:, j].sum(), n),
                        "mae_first_k": mean(pool.abs_sum[:k, j].sum(), n_k),
                        "mse_first_k": mean(pool.sq_sum[:k, j].sum(), n_k)}
                 for j, name in enumerate(pool.joint_names)}
    jumps = pool.jumps[np.isfinite(pool.jumps)]
    return {
        "ticks": int(len(pool.tick_mae)),
        "valid_steps": int(n),
        "first_k": k,
        "mae": mean(pool.abs_sum.sum(), n * n_joints),
        "mse": mean(pool.sq_sum.sum(), n * n_joints),
        "mae_first_k": mean(pool.abs_sum[:k].sum(), n_k * n_joints),
        "mse_first_k": mean(pool.sq_sum[:k].sum(), n_k * n_joints),
        "per_joint": per_joint,
        "mae_by_step": [mean(pool.abs_sum[h].sum(), pool.count[h] * n_joints) for h in range(horizon)],
        "tick_mae": percentiles(pool.tick_mae),
        "discontinuity": percentiles(jumps) | {"max": _scalar(jumps.max()) if jumps.size else None},
        "latency_ms": {stage: percentiles(v) for stage, v in pool.latency_ms.items()},
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
