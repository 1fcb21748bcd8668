"""Numbers about runs: percentiles, the one action-error metric, latency summaries and the reference-style tables.

Torch-free: bag metrics and reports use it too."""

from __future__ import annotations

import numpy as np

from pi_policy.observation import STAGES, LatencyRecord

LABELS = {"vision": "Vision", "embed_prefix": "Embed Prefix", "prefill": "Prefill", "denoise": "Denoise"}
PERCENTILES = (50, 95, 99)


def percentiles(x) -> dict[str, float | None]:
    """p50/p95/p99, mean and count of the finite values of x; None where there are none."""
    x = np.asarray(x, np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None, "n": 0}
    out = {f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES}
    return out | {"mean": float(x.mean()), "n": int(x.size)}


def relative_error(candidate, baseline) -> float | None:
    """||a - b|| / ||b|| in float64; None when the baseline is all zeros."""
    a, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else None


def cosine(candidate, baseline) -> float | None:
    """Cosine similarity of the flattened arrays in float64; None when either is all zeros."""
    a, b = np.asarray(candidate, np.float64).reshape(-1), np.asarray(baseline, np.float64).reshape(-1)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else None


def summarize(records: list[LatencyRecord]) -> dict:
    """p50/p95/p99 per stage, for the GPU total and for the host end-to-end time."""
    if not records:
        raise ValueError("no latency records to summarize")
    series = {s: [r.stages_ms[s] for r in records] for s in STAGES}
    series["total"] = [r.total_ms for r in records]
    series["host_e2e"] = [r.host_ms for r in records]
    series["host_prep"] = [r.prep_ms for r in records]
    out = {k: percentiles(v) for k, v in series.items()}
    out["hz"] = 1000.0 / out["total"]["p50"] if out["total"]["p50"] > 0 else 0.0
    out["iters"] = len(records)
    out["backends"] = dict(records[-1].backends)
    return out


def stage_table(summary: dict, title: str = "", batch: int = 1) -> str:
    """Per-stage p50/p99 and share of the total; with batch > 1, each stage's p50 per robot beside it."""
    total = summary["total"]["p50"]
    per = f" {'/robot':>8} |" if batch > 1 else ""
    rows = [f"{title}" if title else "",
            f"| {'Component':<14} | {'p50 ms':>8} | {'p99 ms':>8} |{per} {'% total':>7} | backend",
            f"|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 10 + '|' if batch > 1 else ''}{'-' * 9}|--------"]

    def robot(p50: float) -> str:
        return f" {p50 / batch:8.2f} |" if batch > 1 else ""

    for s in STAGES:
        p50 = summary[s]["p50"]
        rows.append(f"| {LABELS[s]:<14} | {p50:8.2f} | {summary[s]['p99']:8.2f} |{robot(p50)} "
                    f"{100 * p50 / total:6.1f}% | {summary['backends'].get(s, '')}")
    rows.append(f"| {'Total':<14} | {total:8.2f} | {summary['total']['p99']:8.2f} |{robot(total)} {100.0:6.1f}% |")
    rows.append(f"| {'Hz':<14} | {summary['hz']:8.1f} |" + (f" {'':>8} | {summary['hz'] * batch:8.1f} | robot "
                                                                "inferences per second" if batch > 1 else ""))
    rows.append(f"| {'Host e2e':<14} | {summary['host_e2e']['p50']:8.2f} | {summary['host_e2e']['p99']:8.2f} |"
                f"{robot(summary['host_e2e']['p50'])} {'':>7} | numpy in -> numpy out (host prep p50 "
                f"{summary['host_prep']['p50']:.2f} ms)")
    return "\n".join(r for r in rows if r != "")


def comparison_table(base: dict, cand: dict, base_name: str, cand_name: str) -> str:
    """The comparison table of docs/performance.md: per-stage p50 of two backends and the speed-up."""
    rows = [f"| {'Component':<14} | {base_name + ' (ms)':>12} | {cand_name + ' (ms)':>12} | speed-up |",
            f"|{'-' * 16}|{'-' * 14}|{'-' * 14}|----------|"]
    for key, label in [*LABELS.items(), ("total", "Total")]:
        b, c = base[key]["p50"], cand[key]["p50"]
        rows.append(f"| {label:<14} | {b:12.2f} | {c:12.2f} | {b / c if c else 0:7.2f}x |")
    rows.append(f"| {'Hz':<14} | {base['hz']:12.1f} | {cand['hz']:12.1f} | {cand['hz'] / base['hz']:7.2f}x |")
    return "\n".join(rows)


def action_accuracy(candidate: np.ndarray, baseline: np.ndarray) -> dict:
    """The reference's accuracy block, candidate vs baseline on the same inputs and noise."""
    a, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    rel = relative_error(a, b)
    return {"baseline_range": [float(b.min()), float(b.max())], "baseline_mean": float(b.mean()),
            "candidate_range": [float(a.min()), float(a.max())], "candidate_mean": float(a.mean()),
            "max_diff": float(d.max()), "mean_diff": float(d.mean()),
            "relative_error": rel if rel is not None else float(np.linalg.norm(a - b)), "cosine": cosine(a, b)}


def action_stats(actions: np.ndarray) -> str:
    a = np.asarray(actions)
    return (f"actions {a.shape[0]} x {a.shape[1]}: range [{a.min():.4f}, {a.max():.4f}], mean {a.mean():.4f}, "
            f"std {a.std():.4f}, finite {bool(np.isfinite(a).all())}")
