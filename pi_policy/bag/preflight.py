"""Before any model is built: does the bag hold every input and the recorded actions that the config names?

Each camera, the joint states and the recorded actions must be in the bag, with messages, of a type the node
(or the action reader) takes; the first joint states and the first recorded actions must name every configured
joint. Every mismatch goes into one BagMismatch that says what is missing, what the bag has instead and the
closest names. A missing prompt topic only means the configured prompt is used: it is a note, not an error.
"""

from __future__ import annotations

import difflib
from contextlib import closing

from pi_policy.bag.actions import ACTION_TYPES
from pi_policy.bag.reader import BagError, BagInfo, read_messages
from pi_policy.bag.setup import COMPRESSED, IMAGE, JOINT_STATE, STRING, ReplaySetup, image_type

PEEK = 5  # decodable messages read per topic to learn its joint names
LISTED = 25  # topics listed when saying what the bag has


class BagMismatch(BagError):
    """The bag does not fit the configuration; nothing was run."""


def short(msgtype: str) -> str:
    return msgtype.replace("/msg/", "/")


def preflight(info: BagInfo, setup: ReplaySetup) -> list[str]:
    """Check the bag against the replay's configuration; returns notes, raises BagMismatch listing every problem."""
    problems: list[str] = []
    notes: list[str] = []
    params = setup.params
    required = setup.required_cameras
    images = _topics_of(info, IMAGE, COMPRESSED)
    for cam, topic in setup.cameras.items():
        problem = _topic_problem(info, topic, (image_type(topic),), images, "image")
        if problem:
            role = "required" if cam in required else "optional"
            problems.append(f"camera {cam} ({role}): {problem}")

    js = setup.joint_states_topic
    problem = _topic_problem(info, js, (JOINT_STATE,), _topics_of(info, JOINT_STATE), "joint state")
    if problem:
        problems.append(f"joint states: {problem}")
    else:
        problems += _joint_problems(info, js, params.joint_names, "joint states")

    if setup.prompt_topic:
        if not info.counts.get(setup.prompt_topic):
            notes.append(f"prompt topic {setup.prompt_topic} is not in the bag: every tick uses the configured "
                         f"prompt {params.prompt!r}")
        elif info.topics[setup.prompt_topic] != STRING:
            problems.append(f"prompt: {setup.prompt_topic} carries {short(info.topics[setup.prompt_topic])}, "
                            f"expected {short(STRING)}")

    if setup.action_source == "topic":
        candidates = _topics_of(info, *ACTION_TYPES)
        topic = setup.action_series_topic
        if not topic:
            listed = ", ".join(f"{t} ({short(info.topics[t])})" for t in candidates) or "none"
            problem = ("no recorded-action topic is set: give --recorded-action-topic, or recorded_action_topic in "
                       f"the config's eval_bag section (or --recorded-action-source joints); candidates: {listed}")
        else:
            problem = _topic_problem(info, topic, ACTION_TYPES, candidates, "action")
        if problem:
            problems.append(f"recorded actions: {problem}")
        else:
            problems += _joint_problems(info, topic, params.joint_names, "recorded actions")

    if problems:
        raise BagMismatch(f"{info.path} does not match the configuration (nothing was run):\n  - "
                          + "\n  - ".join(problems) + "\n  " + describe_topics(info))
    return notes


def describe_topics(info: BagInfo) -> str:
    """The bag's topics with their types and message counts, for an error message."""
    items = [f"{t} ({short(info.topics[t])}, {info.counts.get(t, 0)})" for t in sorted(info.topics)]
    more = f", and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return "the bag has: " + ", ".join(items[:LISTED]) + more


def _topics_of(info: BagInfo, *types: str) -> list[str]:
    return sorted(t for t, ty in info.topics.items() if ty in types and info.counts.get(t))


def _topic_problem(info: BagInfo, topic: str, types: tuple[str, ...], candidates: list[str],
                   label: str) -> str | None:
    """Why `topic` cannot be read as one of `types`, with the closest of the bag's `label` topics; None if it can."""
    kinds = " or ".join(short(t) for t in types)
    if topic not in info.topics:
        close = difflib.get_close_matches(topic, candidates, n=3, cutoff=0.5)
        if close:
            hint = f"; closest {label} topics: {', '.join(close)}"
        elif candidates:
            hint = f"; {label} topics in the bag: {', '.join(candidates[:8])}"
        else:
            hint = f"; the bag has no {label} topic ({kinds})"
        return f"topic {topic} is not in the bag{hint}"
    if not info.counts.get(topic):
        return f"topic {topic} has no messages"
    if info.topics[topic] not in types:
        why = ""
        if COMPRESSED in (info.topics[topic], *types) and IMAGE in (info.topics[topic], *types):
            why = " (a camera topic ending in /compressed is read as CompressedImage, any other as Image)"
        return f"{topic} carries {short(info.topics[topic])}, expected {kinds}{why}"
    return None


def _joint_problems(info: BagInfo, topic: str, joints: list[str], what: str) -> list[str]:
    """The configured joints the first messages on `topic` do not carry (by name, or by count for arrays)."""
    names: list[str] = []
    sizes: list[int] = []
    errors: list[str] = []
    decoded = 0
    with closing(read_messages(info.path, [topic])) as stream:
        for bm in stream:
            if bm.msg is None:
                errors.append(bm.error or "undecodable")
                if len(errors) >= 4 * PEEK:
                    break
                continue
            if bm.msgtype == JOINT_STATE:
                names += [n for n in bm.msg.name if n not in names]
            elif bm.msgtype == "trajectory_msgs/msg/JointTrajectory":
                names += [n for n in bm.msg.joint_names if n not in names]
            else:
                sizes.append(len(bm.msg.data))
            decoded += 1
            if decoded >= PEEK:
                break
    if not decoded:
        return [f"{what}: none of the first messages on {topic} decodes ({errors[0] if errors else 'no messages'})"]
    if sizes:
        if min(sizes) < len(joints):
            return [f"{what}: {topic} carries arrays of {min(sizes)} values, fewer than the {len(joints)} "
                    f"configured joints ({', '.join(joints)})"]
        return []
    missing = [j for j in joints if j not in names]
    if not missing:
        return []
    spare = [n for n in names if n not in joints]
    hints = [f"{j} -> {c[0]}" for j in missing if (c := difflib.get_close_matches(j, spare, n=1, cutoff=0.6))]
    return [f"{what}: missing joints {', '.join(missing)} on {topic}; its messages name "
            f"{', '.join(names) or 'no joints'}" + (f" (closest: {', '.join(hints)})" if hints else "")]
