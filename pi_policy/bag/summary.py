"""What an evaluation tells a person, in words: skip reasons with a real example and when they happened, input
problems with their first times and examples, and the verdict on how many ticks were scored.

The terminal summary and the HTML page both print these lines, from a report's metrics dict.
"""

from __future__ import annotations


def _times(ts: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in ts) + " s"


def reason_lines(details: dict[str, dict], what: str = "ticks") -> list[str]:
    """One line per group of reasons: how many, the first real reason, the first few tick times."""
    lines = []
    for d in details.values():
        n = d["count"]
        example = d["example"] if n == 1 else f"e.g. {d['example']}"
        lines.append(f"{n} {what if n != 1 else what.rstrip('s')}: {example} (first at {_times(d['first_s'])})")
    return lines


def input_problem_lines(inputs: dict) -> list[str]:
    """Notes, missing topics, rejected or undecodable messages (counts, first times, examples) and gaps."""
    lines = list(inputs.get("notes", []))
    lines += [f"{topic}: not in the bag" for topic in inputs["missing_topics"]]
    for topic, r in [*inputs["topics"].items(), (inputs["actions"]["topic"], inputs["actions"])]:
        if r["undecodable"] or r["invalid"]:
            when = f", first at {_times(r['first_s'])}" if r.get("first_s") else ""
            lines.append(f"{topic}: {r['undecodable']} undecodable, {r['invalid']} rejected of {r['messages']} "
                         f"messages{when}; e.g. " + " | ".join(r["examples"]))
    for topic, gaps in inputs["gaps"].items():
        shown = ", ".join(f"{g['start_s']:.2f}-{g['end_s']:.2f} s" for g in gaps[:3])
        more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
        longest = max(g["duration_s"] for g in gaps)
        lines.append(f"{topic}: {len(gaps)} gap(s) in the recording, longest {longest:.2f} s: {shown}{more}")
    return lines


def scored_verdict(metrics: dict, min_scored: float, top: int = 3) -> str | None:
    """None when every backend scored at least min_scored of the scheduled ticks; else why not, with the top
    reasons (real numbers) of the worst backend."""
    scheduled = metrics["ticks"]["scheduled"]
    if scheduled == 0:
        return "no tick was scheduled: the bag is shorter than one inference period"
    worst = min(metrics["backends"].items(), key=lambda kv: kv[1]["ticks"])
    name, b = worst
    if b["ticks"] >= min_scored * scheduled:
        return None
    reasons = "; ".join(f"{d['count']} x {d['example']}" for d in list(b["skipped_details"].values())[:top])
    return (f"backend {name} scored {b['ticks']} of {scheduled} ticks ({b['ticks'] / scheduled:.0%}), fewer than "
            f"--min-scored {min_scored:.0%}" + (f"; top reasons: {reasons}" if reasons else ""))
