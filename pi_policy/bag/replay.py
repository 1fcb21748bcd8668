"""Replay a bag tick by tick through the node's own logic (pi_policy.node.logic), once per pass, and record every
chunk: the bag's messages go to the logic's subscription callbacks in recorded order, its timer fires on bag time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pi_policy.bag.actions import ActionSeries, find_gaps
from pi_policy.bag.passes import ReplayPass, as_passes
from pi_policy.bag.preflight import preflight
from pi_policy.bag.reader import TYPESTORE, BagInfo, BagMessage, TopicReport, inspect_bag, read_messages
from pi_policy.bag.reasons import BUSY, NO_ACTIONS
from pi_policy.bag.recorder import Output, Replay, ReplayRecorder
from pi_policy.bag.setup import ReplaySetup, load_actions
from pi_policy.node.logic import DROPPED, PolicyNodeLogic, TickResult
from pi_policy.node.outputs import MessageClasses, MessageFactory
from pi_policy.node.params import NODE_NAME, is_compressed_topic
from pi_policy.observation import Policy
from pi_policy.runtime.options import parse_delay

FACTORY = MessageFactory(MessageClasses.from_typestore(TYPESTORE))
PolicyFactory = Callable[[str], Policy]  # pass name -> the policy that pass runs


class _Feeder:
    """Hands bag messages to the node logic's subscription callbacks and counts what they reject."""

    def __init__(self, setup: ReplaySetup, logic: PolicyNodeLogic):
        self.s, self.logic = setup, logic
        self.cam_of = {topic: cam for cam, topic in setup.cameras.items()}
        self.topics = {t: TopicReport() for t in setup.input_topics}
        self.arrival: dict[str, list[float]] = {t: [] for t in setup.input_topics}

    def feed(self, bm: BagMessage) -> bool:
        """True when the node accepted the message."""
        report = self.topics[bm.topic]
        report.messages += 1
        self.arrival[bm.topic].append(bm.log_ns / 1e9)
        if bm.msg is None:
            report.problem("undecodable", bm.error, bm.log_ns / 1e9)
            return False
        expected = self.s.input_type(bm.topic)
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


def _tick_count(info: BagInfo, s: ReplaySetup) -> int:
    """How many ticks the replay will schedule (for the progress bar)."""
    if s.rate_hz > 0:
        total = max(0, (info.end_ns - info.start_ns) // round(1e9 / s.rate_hz))
    else:
        total = sum(info.counts.get(t, 0) for t in s.cameras.values())
    return min(total, s.max_ticks) if s.max_ticks is not None else total


class _Busy:
    """Realtime replay: until when the previous inference keeps the node busy, in bag time.

    Its chunk reaches the robot at its observation stamp plus the fixed inference_delay_steps, or (delay 'auto')
    one measured host latency after its tick; a tick before that is dropped, as the node drops it.
    """

    def __init__(self, setup: ReplaySetup):
        self.on, self.period_s = setup.realtime, setup.params.control_period_s
        self.delay = parse_delay(setup.params.inference_delay_steps)
        self.until_ns = 0

    def __call__(self, tick_ns: int) -> bool:
        return self.on and tick_ns < self.until_ns

    def ran(self, tick_ns: int, result: TickResult) -> None:
        if not self.on or result.output is None:
            return
        stamp_s = result.assembled.observation.stamp
        self.until_ns = (round((stamp_s + self.delay * self.period_s) * 1e9) if self.delay is not None
                         else tick_ns + round(result.output.latency.host_ms * 1e6))


def replay(bag: str | Path, setup: ReplaySetup, policy: Policy, actions: ActionSeries, name: str = "policy",
           info: BagInfo | None = None, progress: bool = True, keep_outputs: bool = False) -> Replay:
    """One pass over the bag with one policy, through the node's logic."""
    info = info or inspect_bag(bag)
    s, params = setup, setup.params
    if policy.action_dim < len(params.joint_names):
        raise ValueError(f"policy action_dim {policy.action_dim} < {len(params.joint_names)} configured joints")
    logic = PolicyNodeLogic.from_params(params, policy, FACTORY, NODE_NAME, hardware_id="")
    feeder = _Feeder(s, logic)
    stream = read_messages(bag, [t for t in s.input_topics if t in info.topics])
    horizon = policy.horizon
    steps = (np.arange(horizon) + s.step_offset) * params.control_period_s
    rec = ReplayRecorder(name, params.joint_names, horizon, params.control_period_s, s.step_offset)
    busy = _Busy(s)
    bar = tqdm(total=_tick_count(info, s), desc=f"replay {name}", unit="tick", disable=not progress)
    for tick_ns in _ticks(stream, feeder, info, s):
        if s.max_ticks is not None and len(rec) >= s.max_ticks:
            break
        rec.tick(tick_ns / 1e9)
        bar.update()
        if busy(tick_ns):
            rec.skip([BUSY])
            continue
        result = logic.tick(tick_ns / 1e9, require_new=s.rate_hz == 0)
        busy.ran(tick_ns, result)
        if keep_outputs and result.level != DROPPED:
            done_ns = tick_ns + (round(result.output.latency.host_ms * 1e6) if result.output else 0)
            rec.publish(Output(done_ns, result.trajectory, result.diagnostics))
        assembled = result.assembled
        if assembled is not None:
            rec.warn(assembled.warnings)
        if result.output is None:  # skipped by the node, or inference failed
            rec.skip(result.skip_reasons)
            continue
        target, ok = actions.sample(assembled.observation.stamp + steps)
        if not ok.any():
            rec.skip([NO_ACTIONS])
            continue
        chunk = np.asarray(result.output.actions)
        if chunk.shape != (horizon, policy.action_dim):
            raise ValueError(f"policy returned actions of shape {chunk.shape}, "
                             f"expected {(horizon, policy.action_dim)}")
        rec.score(assembled.observation.stamp, assembled.age_s, chunk, target, ok, result.output.latency)
    bar.close()
    stream.close()  # messages after the last tick cannot change any tick
    return rec.replay(feeder.topics, feeder.arrival)


@dataclass
class Evaluation:
    info: BagInfo
    settings: ReplaySetup  # the baseline's; every pass reads the same topics
    actions: ActionSeries
    action_report: TopicReport
    replays: list[Replay]
    missing_topics: list[str]
    gaps: dict[str, list[tuple[float, float]]]
    notes: list[str] = field(default_factory=list)  # what the pre-flight check noticed without failing
    passes: list[ReplayPass] = field(default_factory=list)

    @property
    def first(self) -> Replay:
        return self.replays[0]


def evaluate(bag: str | Path, settings: ReplaySetup, make_policy: PolicyFactory,
             passes: Sequence[ReplayPass | str], progress: bool = True, keep_outputs: bool = False) -> Evaluation:
    """Check the bag against the settings (pre-flight, before any policy exists), then replay it once per pass, each
    with its own setup and the policy make_policy(pass name) returns. A bare name is a pass on `settings`.

    Passes run one after another, never side by side, each on its own model, so the first (the baseline of
    comparisons) runs in a state that no other pass touched. Every pass sees the same ticks; comparisons use
    the ticks that all of them scored.
    """
    passes = as_passes(settings, passes)
    info = inspect_bag(bag)
    notes = preflight(info, settings)  # before any model is built
    wanted = [*settings.input_topics, settings.action_series_topic]
    missing = [t for t in dict.fromkeys(wanted) if not info.counts.get(t)]
    actions, action_report = load_actions(bag, settings)
    replays = []
    for p in passes:
        policy = make_policy(p.name)
        replays.append(replay(bag, p.setup, policy, actions, p.name, info, progress, keep_outputs))
        del policy
    gaps = {}
    for topic, times in replays[0].arrival.items():
        _, found = find_gaps(np.asarray(times), factor=3.0)
        if found:
            gaps[topic] = found
    if actions.gaps:
        gaps.setdefault(settings.action_series_topic, actions.gaps)
    return Evaluation(info, settings, actions, action_report, replays, missing, gaps, notes, passes)
