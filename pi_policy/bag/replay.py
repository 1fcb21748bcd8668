"""Replay a bag tick by tick through the node's own logic (pi_policy.node.logic) and record every chunk."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pi_policy.bag.actions import ActionSeries, find_gaps, load_action_series
from pi_policy.bag.metrics import Trace
from pi_policy.bag.preflight import preflight
from pi_policy.bag.reader import TYPESTORE, BagInfo, BagMessage, TopicReport, inspect_bag, read_messages
from pi_policy.node.logic import DROPPED, PolicyNodeLogic
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.node.params import NODE_NAME, NodeParams, is_compressed_topic
from pi_policy.observation import STAGES, Policy
from pi_policy.runtime.options import parse_delay

FACTORY = MessageFactory(MessageClasses.from_typestore(TYPESTORE))
ACTION_SOURCES = ("topic", "joints")
NO_ACTIONS = "not scored: no recorded actions cover the chunk (past the recording or in a gap)"
BUSY = "dropped: the previous inference was still running (realtime replay)"
PolicyFactory = Callable[[str], Policy]


def resolve_topic(name: str, namespace: str = "/", node: str = NODE_NAME) -> str:
    """A ROS topic name as the node resolves it: relative names live in its namespace, ~ in its own."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if name.startswith("/"):
        return name
    if name.startswith("~"):
        return f"{ns}/{node}{name[1:]}"
    return f"{ns}/{name}"


@dataclass
class ReplaySetup:
    """The node's parameters, plus the evaluation's own choices: where the recorded actions come from, the
    namespace the node's relative topics resolve in, a tick limit, and whether inference takes bag time.

    realtime: a tick that comes before the previous chunk would have reached the robot (its observation stamp
    plus the fixed inference_delay_steps, or the tick plus the measured host latency with 'auto') is dropped,
    as the node drops it; otherwise every tick runs.
    """

    params: NodeParams
    action_source: str = "topic"
    action_topic: str | None = None  # the recorded actions, when action_source is "topic"
    namespace: str = "/"
    max_ticks: int | None = None
    realtime: bool = False

    def __post_init__(self) -> None:
        if self.action_source not in ACTION_SOURCES:
            raise ValueError(f"action source must be one of {ACTION_SOURCES}, got {self.action_source!r}")

    def topic(self, name: str) -> str:
        return resolve_topic(name, self.namespace)

    @property
    def cameras(self) -> dict[str, str]:
        """Camera name (as the policy knows it) -> absolute image topic, as it appears in a bag."""
        return {name: self.topic(topic) for name, topic, _ in self.params.cameras()}

    @property
    def joint_states_topic(self) -> str:
        return self.topic(self.params.joint_state_topic)

    @property
    def prompt_topic(self) -> str | None:
        return self.topic(self.params.prompt_topic) if self.params.prompt_topic else None

    @property
    def rate_hz(self) -> float:
        return self.params.inference_rate_hz

    @property
    def step_offset(self) -> int:
        """Chunk step k is compared with the recorded action at stamp + (k + offset) * control period.

        The node sends step k at stamp + k * period, to be reached one period later: a recorded command
        is compared at the time it was sent, a recorded joint position at the time it was reached.
        """
        return 0 if self.action_source == "topic" else 1

    @property
    def action_series_topic(self) -> str:
        if self.action_source == "joints":
            return self.joint_states_topic
        return self.topic(self.action_topic) if self.action_topic else ""  # none set: the pre-flight check says so

    @property
    def input_topics(self) -> list[str]:
        topics = list(self.cameras.values()) + [self.joint_states_topic]
        return topics + ([self.prompt_topic] if self.prompt_topic else [])

    def describe(self) -> dict:
        """What the report records about the replay."""
        p = self.params
        return {"cameras": self.cameras, "joint_names": list(p.joint_names),
                "joint_states_topic": self.joint_states_topic, "prompt_topic": self.prompt_topic,
                "rate_hz": p.inference_rate_hz, "control_period_s": p.control_period_s,
                "max_age_s": p.max_observation_age_s, "max_future_s": p.max_future_skew_s,
                "required_cameras": list(p.camera_set().required), "prompt": p.prompt,
                "latency_budget_ms": p.latency_budget_ms, "action_source": self.action_source,
                "action_topic": self.action_series_topic, "namespace": self.namespace,
                "max_ticks": self.max_ticks, "step_offset": self.step_offset, "realtime": self.realtime,
                "inference_delay_steps": p.inference_delay_steps}


def load_actions(bag: str | Path, setup: ReplaySetup) -> tuple[ActionSeries, TopicReport]:
    """The recorded actions the chunks are compared with (action topic or future joint positions)."""
    return load_action_series(bag, setup.action_series_topic, setup.action_source, setup.params.joint_names)


@dataclass
class Output:
    """What the node published at one tick, for --write-bag."""

    log_ns: int  # tick time plus the inference's host latency
    trajectory: object | None  # trajectory_msgs/JointTrajectory
    diagnostics: object | None  # diagnostic_msgs/DiagnosticArray


@dataclass
class Replay:
    """One backend's pass over the bag."""

    backend: str
    trace: Trace
    tick_times: np.ndarray  # (T,) every tick, seconds
    evaluated: list[int]  # indices of the scored ticks
    skipped: dict[int, list[str]]  # tick index -> reasons
    warnings: dict[int, list[str]]
    obs_age_s: np.ndarray  # (N,) for the scored ticks
    topics: dict[str, TopicReport]
    arrival: dict[str, list[float]]  # topic -> log times (s) of the messages read
    outputs: list[Output] = field(default_factory=list)
    stage_backends: dict[str, str] = field(default_factory=dict)  # what ran each stage, as the policy says


def reason_key(reason: str) -> str:
    """Group reasons that differ only in their numbers ('stale by 12 ms' and 'stale by 40 ms')."""
    return re.sub(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", "N", reason)


def skip_counts(skipped: dict[int, list[str]]) -> dict[str, int]:
    """How many ticks each (number-free) reason skipped; a tick with two reasons counts for both."""
    counts = Counter(reason_key(r) for reasons in skipped.values() for r in reasons)
    return dict(counts.most_common())


def reason_details(by_tick: dict[int, list[str]], tick_times: np.ndarray, t0: float = 0.0,
                   first: int = 3) -> dict[str, dict]:
    """skip_counts' groups, each with its count, its first real reason (numbers and all) and the times (s since
    t0) of its first few ticks: what a reader needs to find the problem in the bag."""
    details: dict[str, dict] = {}
    for i in sorted(by_tick):
        for reason in by_tick[i]:
            d = details.setdefault(reason_key(reason), {"count": 0, "example": reason, "first_s": []})
            d["count"] += 1
            if len(d["first_s"]) < first:
                d["first_s"].append(round(float(tick_times[i]) - t0, 3))
    return dict(sorted(details.items(), key=lambda kv: -kv[1]["count"]))


class _Feeder:
    """Hands bag messages to the node logic's subscription callbacks and counts what they reject."""

    def __init__(self, settings: ReplaySetup, logic: PolicyNodeLogic):
        self.s, self.logic = settings, logic
        self.cam_of = {topic: cam for cam, topic in settings.cameras.items()}
        self.topics = {t: TopicReport() for t in settings.input_topics}
        self.arrival: dict[str, list[float]] = {t: [] for t in settings.input_topics}

    def feed(self, bm: BagMessage) -> bool:
        """True when the node accepted the message."""
        report = self.topics[bm.topic]
        report.messages += 1
        self.arrival[bm.topic].append(bm.log_ns / 1e9)
        if bm.msg is None:
            report.problem("undecodable", bm.error, bm.log_ns / 1e9)
            return False
        expected = self._expected(bm.topic)
        if bm.msgtype != expected:
            # a subscription of another type would never see these messages
            report.problem("invalid", f"{bm.topic} carries {bm.msgtype}; the node subscribes {expected}",
                           bm.log_ns / 1e9)
            return False
        if bm.topic in self.cam_of:
            error = self.logic.on_image(self.cam_of[bm.topic], bm.msg, compressed=is_compressed_topic(bm.topic))
        elif bm.topic == self.s.joint_states_topic:
            error = self.logic.on_joint_state(bm.msg)
        else:
            error = self.logic.on_prompt(bm.msg)
        if error is not None:
            report.problem("invalid", error, bm.log_ns / 1e9)
        return error is None

    def _expected(self, topic: str) -> str:
        if topic in self.cam_of:
            return "sensor_msgs/msg/CompressedImage" if is_compressed_topic(topic) else "sensor_msgs/msg/Image"
        if topic == self.s.joint_states_topic:
            return "sensor_msgs/msg/JointState"
        return "std_msgs/msg/String"


def _ticks(stream: Iterator[BagMessage], feeder: _Feeder, info: BagInfo, s: ReplaySetup) -> Iterator[int]:
    """Feed the messages in recorded order and yield each tick time (ns) as the node's timer would fire.

    With a rate, ticks fall every period from one period after the first message to the last message.
    With rate 0 the node ticks whenever a camera frame was accepted (and inference is free, which it
    always is here: replay does not model inference running late).
    """
    if s.rate_hz > 0:
        period_ns = round(1e9 / s.rate_hz)
        pending = next(stream, None)
        for tick_ns in range(info.start_ns + period_ns, info.end_ns + 1, period_ns):
            while pending is not None and pending.log_ns <= tick_ns:
                feeder.feed(pending)
                pending = next(stream, None)
            yield tick_ns
        return
    for bm in stream:
        if feeder.feed(bm) and bm.topic in feeder.cam_of:
            yield bm.log_ns


def replay(bag: str | Path, settings: ReplaySetup, policy: Policy, actions: ActionSeries,
           backend: str = "policy", info: BagInfo | None = None, progress: bool = True,
           keep_outputs: bool = False) -> Replay:
    """One pass over the bag with one policy, through the node's logic."""
    info = info or inspect_bag(bag)
    s, params = settings, settings.params
    if policy.action_dim < len(params.joint_names):
        raise ValueError(f"policy action_dim {policy.action_dim} < {len(params.joint_names)} configured joints")
    logic = PolicyNodeLogic.from_params(params, policy, FACTORY, NODE_NAME, hardware_id="")
    feeder = _Feeder(s, logic)
    stream = read_messages(bag, [t for t in s.input_topics if t in info.topics])
    if s.rate_hz > 0:
        total = max(0, (info.end_ns - info.start_ns) // round(1e9 / s.rate_hz))
    else:
        total = sum(info.counts.get(t, 0) for t in s.cameras.values())
    total = min(total, s.max_ticks) if s.max_ticks is not None else total
    horizon, n_joints = policy.horizon, len(params.joint_names)
    steps = (np.arange(horizon) + s.step_offset) * params.control_period_s
    tick_times, evaluated, skipped, warnings, outputs = [], [], {}, {}, []
    stamps, ages, predicted, recorded, valid = [], [], [], [], []
    latency: dict[str, list[float]] = {}
    stage_backends: dict[str, str] = {}
    bar = tqdm(total=total, desc=f"replay {backend}", unit="tick", disable=not progress)
    delay, busy_until_ns = parse_delay(params.inference_delay_steps), 0
    for tick_ns in _ticks(stream, feeder, info, s):
        if s.max_ticks is not None and len(tick_times) >= s.max_ticks:
            break
        i = len(tick_times)
        tick_times.append(tick_ns / 1e9)
        bar.update()
        if s.realtime and tick_ns < busy_until_ns:
            skipped[i] = [BUSY]
            continue
        result = logic.tick(tick_ns / 1e9, require_new=s.rate_hz == 0)
        if s.realtime and result.output is not None:
            stamp_s = result.assembled.observation.stamp
            busy_until_ns = (round((stamp_s + delay * params.control_period_s) * 1e9) if delay is not None
                             else tick_ns + round(result.output.latency.host_ms * 1e6))
        assembled = result.assembled
        if keep_outputs and result.level != DROPPED:
            done_ns = tick_ns + (round(result.output.latency.host_ms * 1e6) if result.output else 0)
            outputs.append(Output(done_ns, result.trajectory, result.diagnostics))
        if assembled is not None and assembled.warnings:
            warnings[i] = assembled.warnings
        if result.output is None:  # skipped by the node, or inference failed
            skipped[i] = result.skip_reasons
            continue
        obs = assembled.observation
        target, ok = actions.sample(obs.stamp + steps)
        if not ok.any():
            skipped[i] = [NO_ACTIONS]
            continue
        chunk = np.asarray(result.output.actions)
        if chunk.shape != (horizon, policy.action_dim):
            raise ValueError(f"policy returned actions of shape {chunk.shape}, "
                             f"expected {(horizon, policy.action_dim)}")
        evaluated.append(i)
        stamps.append(obs.stamp)
        ages.append(assembled.age_s)
        predicted.append(chunk[:, :n_joints].astype(np.float64))
        recorded.append(target.astype(np.float32).astype(np.float64))  # actions are float32 robot units
        valid.append(ok)
        lat = result.output.latency
        stage_backends = stage_backends or dict(lat.backends)
        row = dict(lat.stages_ms) | {"total": lat.total_ms, "host": lat.host_ms}
        for key in set(latency) | set(row):
            latency.setdefault(key, [np.nan] * (len(evaluated) - 1)).append(row.get(key, np.nan))
    bar.close()
    stream.close()  # messages after the last tick cannot change any tick
    order = [k for k in STAGES if k in latency] + sorted(k for k in latency if k not in STAGES)
    trace = Trace(
        backend=backend, joint_names=list(params.joint_names), control_period_s=params.control_period_s,
        step_offset=s.step_offset, ticks=np.asarray(evaluated, np.int64), times=np.asarray(stamps, np.float64),
        predicted=np.asarray(predicted).reshape(-1, horizon, n_joints),
        recorded=np.asarray(recorded).reshape(-1, horizon, n_joints),
        valid=np.asarray(valid, bool).reshape(-1, horizon),
        latency_ms={k: np.asarray(latency[k], np.float64) for k in order},
    )
    return Replay(backend, trace, np.asarray(tick_times, np.float64), evaluated, skipped, warnings,
                  np.asarray(ages, np.float64), feeder.topics, feeder.arrival, outputs, stage_backends)


@dataclass
class Evaluation:
    info: BagInfo
    settings: ReplaySetup
    actions: ActionSeries
    action_report: TopicReport
    replays: list[Replay]
    missing_topics: list[str]
    gaps: dict[str, list[tuple[float, float]]]
    notes: list[str] = field(default_factory=list)  # what the pre-flight check noticed without failing

    @property
    def first(self) -> Replay:
        return self.replays[0]


def evaluate(bag: str | Path, settings: ReplaySetup, make_policy: PolicyFactory, backends: list[str],
             progress: bool = True, keep_outputs: bool = False,
             setups: dict[str, ReplaySetup] | None = None) -> Evaluation:
    """Check the bag against the settings (pre-flight, before any policy exists), then replay it once per backend,
    each pass with the policy make_policy(backend) returns. `setups` may give a pass its own node parameters
    (eval-bag --rtc: one pass per real-time chunking mode).

    Backends run one after another, never side by side, each on its own model, so the first (the baseline of
    comparisons) runs in a state that no other backend touched. Every pass sees the same ticks; comparisons use
    the ticks that all of them scored.
    """
    if not backends:
        raise ValueError("no backend to evaluate")
    if len(set(backends)) != len(backends):
        raise ValueError(f"backends repeat: {backends}")
    info = inspect_bag(bag)
    notes = preflight(info, settings)  # before any model is built
    wanted = [*settings.input_topics, settings.action_series_topic]
    missing = [t for t in dict.fromkeys(wanted) if not info.counts.get(t)]
    actions, action_report = load_actions(bag, settings)
    replays = []
    for backend in backends:
        policy = make_policy(backend)
        setup = (setups or {}).get(backend, settings)
        replays.append(replay(bag, setup, policy, actions, backend, info, progress, keep_outputs))
        del policy
    gaps = {}
    for topic, times in replays[0].arrival.items():
        _, found = find_gaps(np.asarray(times), factor=3.0)
        if found:
            gaps[topic] = found
    if actions.gaps:
        gaps.setdefault(settings.action_series_topic, actions.gaps)
    return Evaluation(info, settings, actions, action_report, replays, missing, gaps, notes)
