"""The report folder of an evaluation: metrics.json, ticks.csv, PNG plots and an index.html showing them."""

from __future__ import annotations

import csv
import dataclasses
import html
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # Figure.savefig renders with Agg; no pyplot, no display needed

from pi_policy.bag.execution import execution_metrics, format_execution, plot_executed
from pi_policy.bag.metrics import compare, discontinuity, summarize, tick_errors
from pi_policy.bag.reasons import reason_details, skip_counts
from pi_policy.bag.replay import Evaluation
from pi_policy.bag.summary import input_problem_lines, reason_lines
from pi_policy.runtime.stats import percentiles

PLOTS = {
    "joints.png": "Predicted vs recorded actions per joint",
    "horizon_error.png": "Error over the horizon",
    "tick_error.png": "Error per tick",
    "latency.png": "Latency per stage",
    "executed.png": "Executed actions across chunk switches",
}
REPORT_FILES = ("metrics.json", "ticks.csv", *PLOTS, "index.html")


def build_metrics(ev: Evaluation, first_k: int, meta: dict | None = None) -> dict:
    info, first = ev.info, ev.first
    t0 = info.start_ns / 1e9

    def topic_report(r) -> dict:
        return dataclasses.asdict(r) | {"first_s": [round(t - t0, 3) for t in r.first_s]}

    return {
        "run": meta or {},
        "bag": {
            "path": str(info.path), "storage": info.storage, "duration_s": info.duration_s,
            "topics": {t: {"type": info.topics[t], "messages": info.counts.get(t, 0)} for t in sorted(info.topics)},
        },
        "settings": ev.settings.describe(),
        "ticks": {
            "scheduled": int(len(first.tick_times)),
            "evaluated": len(first.evaluated),
            "skipped": len(first.skipped),
            "skipped_by_reason": skip_counts(first.skipped),
            "warnings_by_reason": skip_counts(first.warnings),
            "skipped_details": reason_details(first.skipped, first.tick_times, t0),
            "warning_details": reason_details(first.warnings, first.tick_times, t0),
        },
        "inputs": {
            "notes": list(ev.notes),
            "missing_topics": ev.missing_topics,
            "topics": {t: topic_report(r) for t, r in first.topics.items()},
            "actions": {"source": ev.settings.action_source, "topic": ev.settings.action_series_topic,
                        "samples": int(len(ev.actions.times))} | topic_report(ev.action_report),
            "gaps": {t: [{"start_s": a - t0, "end_s": b - t0, "duration_s": b - a} for a, b in g]
                     for t, g in ev.gaps.items()},
            "observation_age_ms": percentiles(first.obs_age_s * 1e3),
        },
        "backends": {r.name: summarize(r.trace, first_k) | {
            "stage_backends": r.stage_backends, "skipped_details": reason_details(r.skipped, r.tick_times, t0)}
            for r in ev.replays},
        "comparison": [compare(r.trace, first.trace) for r in ev.replays[1:]],
        "execution": execution_metrics(ev),
    }


def write_ticks_csv(ev: Evaluation, path: Path, first_k: int) -> None:
    first, t0 = ev.first, ev.info.start_ns / 1e9
    per_backend = []
    for r in ev.replays:
        mae, mse = tick_errors(r.trace)
        k = max(1, min(first_k, r.trace.predicted.shape[1]))
        sub = dataclasses.replace(r.trace, predicted=r.trace.predicted[:, :k], recorded=r.trace.recorded[:, :k],
                                  valid=r.trace.valid[:, :k])
        mae_k, _ = tick_errors(sub)
        jumps = np.concatenate([[np.nan], discontinuity(r.trace)])
        rows = {tick: j for j, tick in enumerate(r.evaluated)}  # realtime replays score different ticks
        per_backend.append((r, {"mae": mae, "mse": mse, "mae_first_k": mae_k, "jump": jumps}, rows))
    header = ["tick", "time_s", "status", "reasons", "obs_stamp_s", "obs_age_ms", "valid_steps"]
    for r, cols, _ in per_backend:
        header += [f"{r.name}_{c}" for c in cols] + [f"{r.name}_{s}_ms" for s in r.trace.latency_ms]
    row_of = {tick: n for n, tick in enumerate(first.evaluated)}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, t in enumerate(first.tick_times):
            n = row_of.get(i)
            reasons = first.skipped.get(i, []) + first.warnings.get(i, [])
            row = [i, f"{t - t0:.4f}", "skipped" if n is None else "evaluated", "; ".join(reasons)]
            if n is None:
                w.writerow(row + [""] * (len(header) - len(row)))
                continue
            row += [f"{first.trace.times[n] - t0:.4f}", f"{first.obs_age_s[n] * 1e3:.2f}",
                    int(first.trace.valid[n].sum())]
            for r, cols, rows in per_backend:
                m = rows.get(i)
                width = len(cols) + len(r.trace.latency_ms)
                row += [""] * width if m is None else ([_num(v[m]) for v in cols.values()]
                                                       + [_num(v[m]) for v in r.trace.latency_ms.values()])
            w.writerow(row)


def _num(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6g}"


# One look per backend, told apart by colour, marker and line style, so that a second backend never hides the first.
STYLES = [dict(color="tab:blue", marker="o", ls="-"), dict(color="tab:orange", marker="x", ls="--"),
          dict(color="tab:green", marker="^", ls=":"), dict(color="tab:red", marker="s", ls="-."),
          dict(color="tab:purple", marker="+", ls=(0, (5, 1)))]


def style(b: int) -> dict:
    return STYLES[b % len(STYLES)]


def with_breaks(x: np.ndarray, y: np.ndarray, breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y with a NaN after every index where `breaks` is set, so that a line stops there."""
    idx = np.nonzero(breaks)[0] + 1
    return np.insert(np.asarray(x, float), idx, np.nan), np.insert(np.asarray(y, float), idx, np.nan)


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend() warns on the terminal
        ax.legend(**kwargs)


def plot_joints(ev: Evaluation, path: Path, max_chunks: int = 12) -> Figure:
    """Recorded actions, the executed part of each backend's chunks, and a few whole chunks, per joint."""
    p, t0 = ev.settings.params, ev.info.start_ns / 1e9
    names = p.joint_names
    height = 1.5 * len(names) + 1.0
    fig = Figure(figsize=(10, height))
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.45 / height, bottom=0.55 / height, hspace=0.12)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    per_tick = max(1, int(round(1.0 / (p.inference_rate_hz * p.control_period_s)))) if p.inference_rate_hz else 1
    rec_t = ev.actions.times - t0
    for j, ax in enumerate(axes):
        if len(rec_t):
            x, y = with_breaks(rec_t, ev.actions.values[:, j], np.diff(ev.actions.times) > ev.actions.max_gap_s)
            ax.plot(x, y, color="black", lw=1.2, label="recorded")
        for b, r in enumerate(ev.replays):
            tr, st = r.trace, style(b)
            if not len(tr.times):
                continue
            steps = (np.arange(tr.predicted.shape[1]) + tr.step_offset) * tr.control_period_s
            for i in np.linspace(0, len(tr.times) - 1, min(max_chunks, len(tr.times))).astype(int):
                ax.plot(tr.times[i] + steps - t0, tr.predicted[i, :, j], color=st["color"], ls=st["ls"], lw=0.6,
                        alpha=0.35)
            # The part of each chunk the robot would execute before the next tick replaces it.
            xs = (tr.times[:, None] + steps[None, :per_tick] - t0).reshape(-1)
            ys = tr.predicted[:, :per_tick, j].reshape(-1)
            ax.plot(xs, ys, st["marker"], color=st["color"], ms=3, mfc="none", label=f"{r.name} (executed part)")
        ax.set_ylabel(names[j], fontsize=8)
        ax.grid(alpha=0.3)
    _legend(axes[0], fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time since bag start (s)")
    fig.suptitle(f"{ev.info.path.name}: predicted chunks (thin: whole chunks) vs recorded actions", fontsize=10)
    fig.savefig(path, dpi=90)
    return fig


def _line_plot() -> tuple[Figure, object]:
    fig = Figure(figsize=(7, 3.5))
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)
    return fig, fig.subplots()


def _finish_line_plot(fig: Figure, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    fig.savefig(path, dpi=90)
    return fig


def plot_horizon_error(ev: Evaluation, path: Path) -> Figure:
    fig, ax = _line_plot()
    for b, r in enumerate(ev.replays):
        mae = summarize(r.trace, 1)["mae_by_step"]
        if any(v is not None for v in mae):
            ax.plot(np.arange(len(mae)), [np.nan if v is None else v for v in mae], ms=4, mfc="none", **style(b),
                    label=r.name)
    return _finish_line_plot(fig, ax, path, "chunk step", "MAE (robot units)",
                             "Error over the horizon (mean over ticks and joints)")


def plot_tick_error(ev: Evaluation, path: Path) -> Figure:
    """Each backend's error per scored tick; the line stops across skipped ticks, which are marked."""
    fig, ax = _line_plot()
    t0 = ev.info.start_ns / 1e9
    for b, r in enumerate(ev.replays):
        if not len(r.trace.times):
            continue
        mae, _ = tick_errors(r.trace)
        x, y = with_breaks(r.trace.times - t0, mae, np.diff(r.trace.ticks) > 1)
        ax.plot(x, y, ms=4, mfc="none", **style(b), label=r.name)
    skipped = [ev.first.tick_times[i] - t0 for i in ev.first.skipped]
    if skipped:
        ax.plot(skipped, np.zeros(len(skipped)), "|", color="gray", ms=10, label="skipped tick")
    return _finish_line_plot(fig, ax, path, "observation stamp since bag start (s)", "MAE over the chunk",
                             "Error per tick")


def plot_latency(ev: Evaluation, path: Path) -> Figure:
    stages = list(dict.fromkeys(k for r in ev.replays for k in r.trace.latency_ms))
    cols = min(3, max(len(stages), 1))
    rows = max(1, -(-len(stages) // cols))
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows))
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.35 / (2.8 * rows), bottom=0.55 / (2.8 * rows),
                        wspace=0.25, hspace=0.45)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    for ax, stage in zip(axes, stages, strict=False):
        for b, r in enumerate(ev.replays):
            v = r.trace.latency_ms.get(stage, np.zeros(0))
            v = v[np.isfinite(v)]
            if v.size:
                st = style(b)
                ax.hist(v, bins=30, histtype="step", lw=1.4, color=st["color"], ls=st["ls"],
                        label=f"{r.name} p50 {np.median(v):.2f}")
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("ms")
        _legend(ax, fontsize=7)
    if not stages:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no evaluated ticks", ha="center", va="center")
    fig.savefig(path, dpi=90)
    return fig


def write_html(metrics: dict, path: Path) -> None:
    e = html.escape
    ticks = metrics["ticks"]
    rows = []
    keys = ("mae", "mse", "mae_first_k", "mse_first_k")
    for name, m in metrics["backends"].items():
        total = m["latency_ms"].get("total", {}).get("p50")
        disc = m["discontinuity"]["p50"]
        cells = [name] + [_fmt(m[k]) for k in keys] + [_fmt(disc), _fmt(total)]
        rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("backend", *keys, "jump p50", "total ms p50"))
    parts = [
        "<!doctype html><meta charset='utf-8'><title>eval-bag report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}</style>",
        f"<h1>eval-bag: {e(metrics['bag']['path'])}</h1>",
        f"<p>{e(metrics['bag']['storage'])}, {metrics['bag']['duration_s']:.2f} s. Ticks: {ticks['scheduled']} "
        f"scheduled, {ticks['evaluated']} evaluated, {ticks['skipped']} skipped. "
        f"First k = {next(iter(metrics['backends'].values()))['first_k'] if metrics['backends'] else '-'} steps.</p>",
        f"<table><tr>{head}</tr>{''.join(rows)}</table>",
    ]
    for name, m in metrics["backends"].items():
        if m.get("stage_backends"):
            stages = ", ".join(f"{k}: {v}" for k, v in m["stage_backends"].items())
            parts.append(f"<p>{e(name)} ran {e(stages)}</p>")
    for c in metrics["comparison"]:
        a = c["actions"]
        parts.append(f"<p>{e(c['candidate'])} vs {e(c['baseline'])}: max |diff| {_fmt(a['max_abs_diff'])}, "
                     f"mean |diff| {_fmt(a['mean_abs_diff'])}, relative error {_fmt(a['rel_err'])}, "
                     f"MAE delta {_fmt(c['mae_delta'])}</p>")
    parts.append("<pre>" + e("\n".join(format_execution(metrics))) + "</pre>")
    parts.append(_list("Skipped ticks, by reason", reason_lines(ticks["skipped_details"])))
    parts.append(_list("Warnings (the tick ran), by reason", reason_lines(ticks["warning_details"])))
    parts.append(_list("Input problems", input_problem_lines(metrics["inputs"])))
    for name, title in PLOTS.items():
        parts.append(f"<h2>{e(title)}</h2><img src='{name}' alt='{e(title)}'>")
    parts.append("<p>All numbers: <a href='metrics.json'>metrics.json</a>, per tick: "
                 "<a href='ticks.csv'>ticks.csv</a>.</p>")
    path.write_text("\n".join(parts))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _list(title: str, items: list[str]) -> str:
    e = html.escape
    if not items:
        return f"<h3>{e(title)}</h3><p>none</p>"
    return f"<h3>{e(title)}</h3><ul>" + "".join(f"<li>{e(item)}</li>" for item in items) + "</ul>"


def write_report(ev: Evaluation, out: str | Path, first_k: int = 10, meta: dict | None = None) -> dict:
    """Write every report file into `out` (created if needed); returns the metrics dict.

    meta: how the run was made (command line, model), stored as metrics.json's "run".
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = build_metrics(ev, first_k, meta)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    write_ticks_csv(ev, out / "ticks.csv", first_k)
    plot_joints(ev, out / "joints.png")
    plot_horizon_error(ev, out / "horizon_error.png")
    plot_tick_error(ev, out / "tick_error.png")
    plot_latency(ev, out / "latency.png")
    plot_executed(ev, out / "executed.png")
    write_html(metrics, out / "index.html")
    return metrics


def format_summary(m: dict, out: str | Path) -> str:
    """The terminal summary of a report's metrics: ticks, why ticks were skipped or warned (real examples and
    times), input problems, then the table of backends."""
    lines = []
    t = m["ticks"]
    lines.append(f"ticks: {t['scheduled']} scheduled, {t['evaluated']} scored, {t['skipped']} skipped")
    lines += [f"  skipped {line}" for line in reason_lines(t["skipped_details"])]
    lines += [f"  warned {line}" for line in reason_lines(t["warning_details"])]
    lines += [f"  input: {line}" for line in input_problem_lines(m["inputs"])]
    lines.append(f"{'backend':<16}{'MAE':>10}{'MSE':>10}{'MAE@k':>10}{'jump p50':>10}{'total ms p50':>14}")
    for name, b in m["backends"].items():
        total = b["latency_ms"].get("total", {}).get("p50")
        cells = [b["mae"], b["mse"], b["mae_first_k"], b["discontinuity"]["p50"]]
        lines.append(f"{name:<16}" + "".join(f"{'-' if v is None else f'{v:.4g}':>10}" for v in cells)
                     + f"{'-' if total is None else f'{total:.2f}':>14}")
    for c in m["comparison"]:
        a = c["actions"]
        rel = "-" if a["rel_err"] is None else f"{a['rel_err']:.4g}"
        lines.append(f"{c['candidate']} vs {c['baseline']} on {c['common_ticks']} ticks: max |diff| "
                     f"{a['max_abs_diff']:.4g}, mean |diff| {a['mean_abs_diff']:.4g}, relative error {rel}")
    lines += format_execution(m)
    lines.append(f"report: {Path(out) / 'index.html'}")
    return "\n".join(lines)
