"""What the robot would have executed during a replay, chunk after chunk, when each chunk reaches it some control
periods after its observation: the executed trajectory, the jump at every chunk switch, jerk, and error against
the recording.

A chunk takes over when it arrives (observation stamp + delay) and is followed, linearly between its steps as
joint_trajectory_controller follows positions-only points, until the next one arrives; a chunk that runs out
holds its last step. Inference runs one call at a time, so a chunk never takes over before the one before it.
The delay is fixed (`--delay N`, `inference_delay_steps: N`) or, with `auto`, each chunk's own end-to-end latency
in the replay (observation age + the policy's host latency), rounded up to control periods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from pi_policy.bag.actions import ActionSeries
from pi_policy.bag.metrics import Trace
from pi_policy.bag.recorder import Replay
from pi_policy.bag.replay import Evaluation
from pi_policy.node.rtc_state import sample_chunk
from pi_policy.runtime.options import parse_delay
from pi_policy.runtime.stats import percentiles


@dataclass
class Execution:
    name: str
    period_s: float
    times: np.ndarray  # (T,) control steps, seconds
    actions: np.ndarray  # (T, J) what the robot was commanded at each step
    source: np.ndarray  # (T,) the chunk (index into the trace) each step came from
    switches: np.ndarray  # (S,) steps at which a newer chunk took over
    jumps: np.ndarray  # (S,) mean over joints of |new command - what the old chunk would have commanded|
    delay_steps: np.ndarray  # (N,) each chunk's delay, control periods


def arrival_steps(replay: Replay, period_s: float, delay: int | None) -> np.ndarray:
    """Each scored chunk's delay in control periods: `delay`, or (None) its measured end to end, rounded up."""
    n = len(replay.trace.times)
    if delay is not None:
        return np.full(n, delay, np.int64)
    host_s = replay.trace.latency_ms.get("host", np.zeros(n)) / 1e3
    return np.ceil((replay.obs_age_s + np.nan_to_num(host_s)) / period_s - 1e-9).astype(np.int64)


def execute(trace: Trace, delay_steps: np.ndarray, name: str | None = None) -> Execution:
    """The commanded trajectory on a grid of control periods from the first chunk's arrival to the last one's end.
    Of chunks that arrive together, the newest takes over."""
    p, (n, horizon, joints) = trace.control_period_s, trace.predicted.shape
    if n == 0:
        empty = np.zeros(0)
        return Execution(name or trace.backend, p, empty, np.zeros((0, joints)), empty.astype(int), empty.astype(int),
                         empty, np.asarray(delay_steps))
    start = np.maximum.accumulate(trace.times + np.asarray(delay_steps) * p)
    end = max(start[-1], trace.times[-1] + (horizon - 1) * p)
    times = start[0] + np.arange(int(math.floor((end - start[0]) / p + 1e-9)) + 1) * p
    source = np.searchsorted(start, times + 1e-9, side="right") - 1  # the newest chunk that has arrived
    pos = (times - trace.times[source]) / p
    actions = np.empty((len(times), joints))
    for i in np.unique(source):
        rows = np.flatnonzero(source == i)
        actions[rows] = sample_chunk(trace.predicted[i], np.clip(pos[rows], 0, horizon - 1))
    switches = np.flatnonzero(np.diff(source) != 0) + 1
    jumps = np.empty(len(switches))
    for k, s in enumerate(switches):
        old = source[s - 1]
        at = (times[s] - trace.times[old]) / p
        expected = sample_chunk(trace.predicted[old], [min(at, horizon - 1)])[0]
        jumps[k] = np.abs(actions[s] - expected).mean()
    return Execution(name or trace.backend, p, times, actions, source, switches, jumps, np.asarray(delay_steps))


def jerk(ex: Execution) -> np.ndarray:
    """|third difference| / period^3 of the executed trajectory, mean over joints: (T - 3,)."""
    if len(ex.times) < 4:
        return np.zeros(0)
    return np.abs(np.diff(ex.actions, n=3, axis=0)).mean(axis=1) / ex.period_s**3


def summarize_execution(ex: Execution, recorded: ActionSeries, step_offset: int) -> dict:
    """The metrics.json block of one executed trajectory."""
    target, valid = recorded.sample(ex.times + step_offset * ex.period_s)
    err = np.abs(ex.actions - target)[valid]
    return {
        "steps": int(len(ex.times)),
        "switches": int(len(ex.switches)),
        "delay_steps": percentiles(ex.delay_steps),
        "jump": percentiles(ex.jumps),
        "jerk": percentiles(jerk(ex)),
        "mae": float(err.mean()) if err.size else None,
    }


def delay_of(ev: Evaluation) -> int | None:
    return parse_delay(ev.settings.params.inference_delay_steps)


def executions(ev: Evaluation) -> list[Execution]:
    p, delay = ev.settings.params.control_period_s, delay_of(ev)
    return [execute(r.trace, arrival_steps(r, p, delay), r.name) for r in ev.replays]


def execution_metrics(ev: Evaluation) -> dict:
    """metrics.json's "execution": how it was simulated, then one block per replayed backend or RTC mode."""
    delay = delay_of(ev)
    out = {"delay": "auto" if delay is None else delay, "control_period_s": ev.settings.params.control_period_s}
    for ex in executions(ev):
        out[ex.name] = summarize_execution(ex, ev.actions, ev.settings.step_offset)
    return out


def format_execution(metrics: dict) -> list[str]:
    """Terminal lines: the executed trajectories side by side."""
    ex = metrics.get("execution") or {}
    names = [k for k in ex if isinstance(ex[k], dict)]
    if not names:
        return []
    lines = [f"executed (delay {ex['delay']}):", f"  {'':<14}{'delay p50':>10}{'jump p50':>10}{'jump p95':>10}"
                                                   f"{'jerk p95':>12}{'MAE':>10}"]
    for name in names:
        m = ex[name]
        cells = [m["delay_steps"]["p50"], m["jump"]["p50"], m["jump"]["p95"], m["jerk"]["p95"], m["mae"]]
        widths = (10, 10, 10, 12, 10)
        lines.append(f"  {name:<14}" + "".join(f"{'-' if v is None else f'{v:.4g}':>{w}}"
                                               for v, w in zip(cells, widths, strict=True)))
    return lines


def plot_executed(ev: Evaluation, path, window_s: float = 1.5, max_joints: int = 3) -> None:
    """The executed trajectory of each backend or mode over `window_s` in the middle of the bag, chunk switches
    marked, against the recording; one panel per joint (the first `max_joints`)."""
    runs = executions(ev)
    names = ev.settings.params.joint_names[:max_joints]
    t0 = ev.info.start_ns / 1e9
    fig = Figure(figsize=(10, 1.9 * len(names) + 0.9))
    fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.1, hspace=0.15)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    spans = [ex.times for ex in runs if len(ex.times)]
    mid = float(np.median(np.concatenate(spans))) if spans else t0
    lo, hi = mid - window_s / 2, mid + window_s / 2
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]
    for j, ax in enumerate(axes):
        keep = (ev.actions.times >= lo) & (ev.actions.times <= hi)
        if keep.any():
            ax.plot(ev.actions.times[keep] - t0, ev.actions.values[keep, j], color="black", lw=1.0, label="recorded")
        for k, ex in enumerate(runs):
            inside = (ex.times >= lo) & (ex.times <= hi)
            c = colors[k % len(colors)]
            ax.plot(ex.times[inside] - t0, ex.actions[inside, j], color=c, lw=1.1, label=ex.name)
            sw = ex.switches[inside[ex.switches]] if len(ex.switches) else ex.switches
            ax.plot(ex.times[sw] - t0, ex.actions[sw, j], "o", color=c, ms=3.5, mfc="none")
        ax.set_ylabel(names[j], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right", ncol=len(runs) + 1)
    axes[-1].set_xlabel("time since bag start (s); circles: a new chunk takes over")
    delay = delay_of(ev)
    fig.suptitle(f"Executed actions across chunk switches (delay {'auto' if delay is None else delay} steps)",
                 fontsize=10)
    fig.savefig(path, dpi=90)
