"""What an evaluation tells a person, in words: skip reasons with a real example and when they happened, input
problems with their first times and examples, and the verdict on how many ticks were scored.

The terminal summary and the HTML page both print these lines, from a report's metrics dict.
"""

from __future__ import annotations

from pi_policy.runtime.stats import threads_text


def _time(t: float) -> str:
    """Seconds with two decimals, or three where the milliseconds matter (2.015, not 2.02)."""
    text = f"{t:.3f}"
    return text[:-1] if text.endswith("0") else text


def _times(ts: list[float]) -> str:
    return ", ".join(_time(t) for t in ts) + " s"


def example(d: dict) -> str:
    """A group's first reason, and its worst where that is another."""
    worst = d.get("worst", d["example"])
    return d["example"] if worst == d["example"] else f"{d['example']}; worst: {worst}"


def reason_lines(details: dict[str, dict], what: str = "ticks") -> list[str]:
    """One line per group of reasons: how many, the first real reason (and the worst), the first few tick times."""
    lines = []
    for d in details.values():
        n = d["count"]
        text = example(d) if n == 1 else f"e.g. {example(d)}"
        lines.append(f"{n} {what if n != 1 else what.rstrip('s')}: {text} (first at {_times(d['first_s'])})")
    return lines


def input_problem_lines(inputs: dict) -> list[str]:
    """Notes, missing topics, rejected or undecodable messages (counts, first times, examples) and gaps."""
    notes = list(inputs.get("notes", []))
    lines = notes + [f"{topic}: not in the bag" for topic in inputs["missing_topics"]
                     if not any(topic in note for note in notes)]  # a note already says so (the prompt topic)
    for topic, r in [*inputs["topics"].items(), (inputs["actions"]["topic"], inputs["actions"])]:
        if r["undecodable"] or r["invalid"]:
            when = f", first at {_times(r['first_s'])}" if r.get("first_s") else ""
            unread = r.get("in_bag", 0) - r["messages"]
            read = f" read ({unread} more after the last tick)" if unread > 0 else ""
            lines.append(f"{topic}: {r['undecodable']} undecodable, {r['invalid']} rejected of {r['messages']} "
                         f"messages{read}{when}; e.g. " + " | ".join(r["examples"]))
    for topic, gaps in inputs["gaps"].items():
        shown = ", ".join(f"{g['start_s']:.2f}-{g['end_s']:.2f} s" for g in gaps[:3])
        more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
        longest = max(g["duration_s"] for g in gaps)
        lines.append(f"{topic}: {len(gaps)} gap(s) in the recording, longest {longest:.2f} s: {shown}{more}")
    return lines


def scored_verdict(metrics: dict, min_scored: float, top: int = 3) -> str | None:
    """None when every pass scored at least min_scored of the scheduled ticks; else why not, with the top
    reasons (real numbers) of the worst backend."""
    scheduled = metrics["ticks"]["scheduled"]
    if scheduled == 0:
        return "no tick was scheduled: the bag is shorter than one inference period"
    worst = min(metrics["backends"].items(), key=lambda kv: kv[1]["ticks"])
    name, b = worst
    if b["ticks"] >= min_scored * scheduled:
        return None
    reasons = "; ".join(f"{d['count']} x {d.get('worst', d['example'])}"
                        for d in list(b["skipped_details"].values())[:top])
    return (f"pass {name} scored {b['ticks']} of {scheduled} ticks ({b['ticks'] / scheduled:.0%}), fewer than "
            f"--min-scored {min_scored:.0%}" + (f"; top reasons: {reasons}" if reasons else ""))


def weights_note(run: dict) -> str | None:
    """Said first when the model had no checkpoint: random weights give noise, and the numbers only show that the
    pipeline runs."""
    if "checkpoint" not in run or run["checkpoint"]:
        return None
    return (f"random weights (no checkpoint, seed {run.get('seed', 0)}): the actions are noise; the numbers show "
            "that the pipeline runs, not how good a policy is")


def ran_lines(backends: dict) -> list[str]:
    """What ran each stage of each pass, as the policy reported it (a CPU runs float32 where a GPU runs bf16)."""
    lines = []
    for name, b in backends.items():
        stages = b.get("stage_backends") or {}
        if not stages:
            continue
        labels = set(stages.values())
        ran = next(iter(labels)) + " (every stage)" if len(labels) == 1 else \
            ", ".join(f"{stage} {label}" for stage, label in stages.items())
        threads = b.get("threads")
        lines.append(f"{name} ran {ran}" + (f", {threads_text(threads)}" if threads else ""))
    return lines


# What each number in a report means, for the page (and, shorter, the terminal).
METRICS = {
    "MAE, MSE": "mean absolute and squared difference between each chunk's steps and the recorded actions at the "
                "same times, over every joint and every step that has a recording (robot units)",
    "MAE@k": "the same over the first k steps of each chunk: the part the robot executes first",
    "jump@stamp": "a chunk's first step against the previous chunk at that time: the jump at a switch if chunks "
                  "arrived with no delay",
    "total ms, host ms": "the four model stages on the device, and numpy in to numpy out (what the node waits for)",
    "relative difference": "||candidate - baseline|| / ||baseline|| over every chunk: between backends, the "
                           "candidate's numerical error; between real-time chunking modes, how differently they "
                           "continue the chunks (not an error)",
    "executed: delay": "control periods from an observation to its chunk taking over on the robot",
    "executed: jump": "at each switch, after the delay: the new chunk's command against what the previous chunk "
                      "would have commanded then (what the robot feels; real-time chunking lowers it)",
    "executed: jerk": "|third difference| / period^3 of the executed trajectory, mean over joints",
    "executed: MAE": "the executed trajectory against the recording",
}
