"""eval-bag's own settings in a parameter file: an `eval_bag` section next to the node's, which the node never reads.

A ROS 2 parameter file may hold sections for several nodes, and each node takes only its own. eval-bag reads
the section named `eval_bag`, shaped like a node's (`eval_bag: ros__parameters: ...`) so that rcl still parses
the file when the node is launched with it. Keeping these keys out of the node's section keeps them out of the
node's parameters: `recorded_action_topic` (what the robot was commanded: the evaluation's target) cannot be
mistaken for the node's `action_topic` (what the node publishes).

    eval_bag:
      ros__parameters:
        recorded_action_source: topic          # or joints: future measured joint positions
        recorded_action_topic: /leader/joint_command
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from pi_policy.bag.setup import ACTION_SOURCES
from pi_policy.node.params import ParamError

SECTION = "eval_bag"


@dataclass
class EvalConfig:
    recorded_action_source: str = "topic"  # one of ACTION_SOURCES
    recorded_action_topic: str = ""  # JointTrajectory, JointState or Float32/64MultiArray, for source "topic"

    def __post_init__(self) -> None:
        if self.recorded_action_source not in ACTION_SOURCES:
            raise ParamError(f"{SECTION}.recorded_action_source must be one of {', '.join(ACTION_SOURCES)}, "
                             f"got {self.recorded_action_source!r}")


def read_eval_config(path: str | Path) -> EvalConfig:
    """The `eval_bag` section of a parameter file (defaults where it or a key is absent), checked."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"cannot read parameter file {path}: {e}") from None
    section = doc.get(SECTION) if isinstance(doc, dict) else None
    if section is None:
        return EvalConfig()
    values = section.get("ros__parameters") if isinstance(section, dict) else None
    if not isinstance(values, dict):
        raise ParamError(f"{path}: section '{SECTION}' needs a 'ros__parameters' mapping (as a node's section has, "
                         "so that ROS still reads the file)")
    known = [f.name for f in fields(EvalConfig)]
    problems = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                            + f"; {SECTION} takes {', '.join(known)}")
        elif not isinstance(value, str):
            problems.append(f"'{key}' must be a string, got {value!r}")
    if problems:
        raise ParamError(f"{path}: section '{SECTION}': " + "; ".join(problems))
    try:
        return EvalConfig(**values)
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
