"""The report over many bags: a per-bag table, metrics pooled over every scored tick of every bag, the worst
ticks across bags and skip reasons summed, as aggregate.json, bags.csv, bags.png and an index.html."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pi_policy.bag.batch import WORST, BagResult
from pi_policy.bag.metrics import Pool, summarize
from pi_policy.bag.report import style
from pi_policy.bag.summary import reason_lines

AGGREGATE_FILES = ("aggregate.json", "bags.csv", "bags.png", "index.html")
COLUMNS = ("mae", "mse", "mae_first_k")


def _status(r: BagResult) -> str:
    return "failed" if r.error else "too few scored" if r.verdict else "ok"


def aggregate(results: list[BagResult], passes: list[str], first_k: int, root: str | Path,
              min_scored: float = 0.5) -> dict:
    """The aggregate.json dict of the results (in name order), pooled per pass (backend or RTC mode); report links
    are relative to `root`."""
    root = Path(root)
    results = sorted(results, key=lambda r: r.name)
    ok = [r for r in results if r.metrics is not None]
    rows = []
    for r in results:
        row = {"name": r.name, "bag": r.bag, "status": _status(r), "problem": r.error or r.verdict}
        if r.metrics is not None:
            m, t = r.metrics, r.metrics["ticks"]
            row |= {"report": Path(r.out).resolve().relative_to(root.resolve()).joinpath("index.html").as_posix(),
                    "duration_s": m["bag"]["duration_s"], "scheduled": t["scheduled"], "scored": t["evaluated"],
                    "skipped": t["skipped"],
                    "backends": {b: {k: v[k] for k in COLUMNS} | {"jump_p50": v["discontinuity"]["p50"],
                                                                 "total_ms_p50": v["latency_ms"].get("total", {})
                                                                 .get("p50")}
                                 for b, v in m["backends"].items()}}
        rows.append(row)
    pooled = {}
    for b in passes:
        pools = [r.pools[b] for r in ok if b in r.pools]
        if pools:
            pooled[b] = summarize(Pool.merge(pools), first_k)
    reasons: dict[str, dict] = {}
    for r in ok:
        for key, d in r.metrics["ticks"]["skipped_details"].items():
            into = reasons.setdefault(key, {"count": 0, "example": f"{d['example']} [{r.name}]", "bags": 0,
                                            "first_s": []})
            into["count"] += d["count"]
            into["bags"] += 1
            if not into["first_s"]:
                into["first_s"] = d["first_s"]
    worst = sorted(([w | {"bag": r.name} for r in ok for w in r.worst]), key=lambda w: -w["mae"])[:WORST]
    report_of = {row["name"]: row.get("report") for row in rows}
    return {
        "min_scored": min_scored,
        "bags": rows,
        "counts": {"bags": len(results), "evaluated": len(ok), "failed": sum(r.error is not None for r in results),
                   "too_few_scored": sum(r.verdict is not None for r in results)},
        "ticks": {"scheduled": sum(r.metrics["ticks"]["scheduled"] for r in ok),
                  "scored": sum(r.metrics["ticks"]["evaluated"] for r in ok),
                  "skipped": sum(r.metrics["ticks"]["skipped"] for r in ok),
                  "skipped_details": dict(sorted(reasons.items(), key=lambda kv: -kv[1]["count"]))},
        "pooled": pooled,
        "worst_ticks": [w | {"report": report_of[w["bag"]]} for w in worst],
    }


def write_bags_csv(agg: dict, path: Path) -> None:
    backends = list(dict.fromkeys(b for row in agg["bags"] for b in row.get("backends", {})))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "bag", "status", "duration_s", "scheduled", "scored", "skipped"]
                   + [f"{b}_{c}" for b in backends for c in (*COLUMNS, "jump_p50", "total_ms_p50")] + ["problem"])
        for row in agg["bags"]:
            cells = [row["name"], row["bag"], row["status"]] + [row.get(k, "") for k in
                                                                 ("duration_s", "scheduled", "scored", "skipped")]
            for b in backends:
                v = row.get("backends", {}).get(b, {})
                cells += [_num(v.get(c)) for c in (*COLUMNS, "jump_p50", "total_ms_p50")]
            w.writerow(cells + [row["problem"] or ""])


def plot_bags(agg: dict, path: Path) -> Figure:
    """Per bag: each backend's MAE (bars side by side, the pooled value as a line) and the share of ticks scored."""
    rows = agg["bags"]
    backends = list(agg["pooled"])
    height = 1.4 + 0.3 * max(1, len(rows)) * max(1, len(backends))
    left = 0.3 + 0.075 * max((len(row["name"]) for row in rows), default=4)  # inches for the bag names
    fig = Figure(figsize=(10, height))
    fig.subplots_adjust(left=left / 10, right=0.97, top=1 - 0.75 / height, bottom=0.55 / height, wspace=0.06)
    ax_err, ax_scored = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    y = np.arange(len(rows))
    bar = 0.8 / max(1, len(backends))
    for b, name in enumerate(backends):
        mae = [row.get("backends", {}).get(name, {}).get("mae") for row in rows]
        st = style(b)
        ax_err.barh(y + (b - (len(backends) - 1) / 2) * bar, [0.0 if v is None else v for v in mae], height=bar,
                    color=st["color"], hatch=["", "//", "..", "xx", "\\\\"][b % 5], edgecolor="white", label=name)
        pooled = agg["pooled"][name]["mae"]
        if pooled is not None:
            ax_err.axvline(pooled, color="black", ls=st["ls"], lw=1, label=f"{name} pooled {pooled:.3g}")
    scored = [row["scored"] / row["scheduled"] if row.get("scheduled") else 0.0 for row in rows]
    ax_scored.barh(y, scored, color=["tab:gray" if row["status"] == "ok" else "tab:red" for row in rows])
    ax_scored.axvline(agg["min_scored"], color="tab:red", ls="--", lw=1)
    ax_scored.set_xlim(0, 1)
    ax_scored.set_xlabel("ticks scored (dashed: --min-scored)", fontsize=8)
    ax_err.set_yticks(y, [row["name"] for row in rows], fontsize=8)
    ax_err.invert_yaxis()
    ax_err.set_xlabel("MAE over the chunk (robot units)")
    for ax in (ax_err, ax_scored):
        ax.grid(axis="x", alpha=0.3)
    if backends:
        ax_err.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2 * len(backends), frameon=False)
    fig.suptitle(f"{len(rows)} bags: error per bag and pooled, share of ticks scored", fontsize=10)
    fig.savefig(path, dpi=90)
    return fig


def write_index(agg: dict, path: Path) -> None:
    e = html.escape
    backends = list(agg["pooled"])
    c, t = agg["counts"], agg["ticks"]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>eval-bag: many bags</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}.bad{color:#b00}</style>",
        f"<h1>eval-bag: {c['bags']} bags</h1>",
        f"<p>{c['evaluated']} evaluated, {c['failed']} failed, {c['too_few_scored']} with too few ticks scored. "
        f"Ticks: {t['scheduled']} scheduled, {t['scored']} scored, {t['skipped']} skipped.</p>",
        "<h2>Pooled over every scored tick</h2>",
        _table(["backend", "ticks", *COLUMNS, "jump p50", "total ms p50"],
               [[b, m["ticks"], *(_num(m[k]) for k in COLUMNS), _num(m["discontinuity"]["p50"]),
                 _num(m["latency_ms"].get("total", {}).get("p50"))] for b, m in agg["pooled"].items()]),
        "<h2>Per bag</h2><img src='bags.png' alt='error per bag'>",
    ]
    rows = []
    for row in agg["bags"]:
        link = f"<a href='{e(row['report'])}'>{e(row['name'])}</a>" if row.get("report") else e(row["name"])
        cells = [link, e(row["status"]), row.get("scheduled", ""), row.get("scored", "")]
        cells += [_num(row.get("backends", {}).get(b, {}).get("mae")) for b in backends]
        cells.append(f"<span class='bad'>{e(row['problem'])}</span>" if row["problem"] else "")
        rows.append(cells)
    parts.append(_table(["bag", "status", "scheduled", "scored", *(f"{b} MAE" for b in backends), "problem"], rows,
                        escape=False))
    parts.append("<h2>Worst ticks across bags</h2>")
    parts.append(_table(["bag", "tick", "time s", "backend", "MAE"],
                        [[f"<a href='{e(w['report'])}'>{e(w['bag'])}</a>", w["tick"], f"{w['time_s']:.2f}",
                          e(w["backend"]), _num(w["mae"])] for w in agg["worst_ticks"]], escape=False))
    lines = reason_lines(t["skipped_details"])
    parts.append("<h2>Skipped ticks, by reason (all bags)</h2>"
                 + ("<ul>" + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>" if lines else "<p>none</p>"))
    parts.append("<p>All numbers: <a href='aggregate.json'>aggregate.json</a>, per bag: "
                 "<a href='bags.csv'>bags.csv</a>.</p>")
    path.write_text("\n".join(parts))


def _table(head: list[str], rows: list[list], escape: bool = True) -> str:
    cell = (lambda x: html.escape(str(x))) if escape else str
    body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{body}</table>"


def _num(x) -> str:
    return "-" if x is None or x == "" else f"{x:.4g}"


def write_aggregate(results: list[BagResult], passes: list[str], first_k: int, out: str | Path,
                    min_scored: float = 0.5) -> dict:
    """Write every aggregate file into `out` (next to the per-bag report folders); returns the aggregate dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(results, passes, first_k, out, min_scored)
    (out / "aggregate.json").write_text(json.dumps(agg, indent=2, allow_nan=False))
    write_bags_csv(agg, out / "bags.csv")
    plot_bags(agg, out / "bags.png")
    write_index(agg, out / "index.html")
    return agg


def format_aggregate(agg: dict, out: str | Path) -> str:
    """The terminal summary over many bags."""
    backends = list(agg["pooled"])
    c, t = agg["counts"], agg["ticks"]
    lines = [f"{c['bags']} bags: {c['evaluated']} evaluated, {c['failed']} failed, {c['too_few_scored']} with too few "
             f"ticks scored; ticks: {t['scheduled']} scheduled, {t['scored']} scored, {t['skipped']} skipped",
             f"{'bag':<24}{'scored':>10}" + "".join(f"{b + ' MAE':>14}" for b in backends) + "  status"]
    for row in agg["bags"]:
        scored = f"{row['scored']}/{row['scheduled']}" if "scored" in row else "-"
        maes = "".join(f"{_num(row.get('backends', {}).get(b, {}).get('mae')):>14}" for b in backends)
        lines.append(f"{row['name'][:23]:<24}{scored:>10}{maes}  {row['status']}")
        if row["problem"]:
            lines.append(f"    {row['problem']}")
    lines.append(f"pooled{'':<10}{'ticks':>8}" + "".join(f"{k:>12}" for k in (*COLUMNS, "jump p50", "total ms")))
    for b, m in agg["pooled"].items():
        vals = [m[k] for k in COLUMNS] + [m["discontinuity"]["p50"], m["latency_ms"].get("total", {}).get("p50")]
        lines.append(f"{b:<16}{m['ticks']:>8}" + "".join(f"{_num(v):>12}" for v in vals))
    for w in agg["worst_ticks"][:3]:
        lines.append(f"worst tick: {w['bag']} tick {w['tick']} at {w['time_s']:.2f} s, MAE {w['mae']:.4g} "
                     f"({w['backend']})")
    lines.append(f"report: {Path(out) / 'index.html'}")
    return "\n".join(lines)
