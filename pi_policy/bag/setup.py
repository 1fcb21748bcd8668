"""What a replay is set up with: the node's parameters, the topics they resolve to in a bag, the message type the
node takes on each, and where the recorded actions come from. The pre-flight check and the replay both read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pi_policy.bag.actions import ActionSeries, load_action_series
from pi_policy.bag.reader import TopicReport
from pi_policy.node.params import NODE_NAME, NodeParams, is_compressed_topic

ACTION_SOURCES = ("topic", "joints")
IMAGE, COMPRESSED = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"
JOINT_STATE, STRING = "sensor_msgs/msg/JointState", "std_msgs/msg/String"


def resolve_topic(name: str, namespace: str = "/", node: str = NODE_NAME) -> str:
    """A ROS topic name as the node resolves it: relative names live in its namespace, ~ in its own."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if name.startswith("/"):
        return name
    if name.startswith("~"):
        return f"{ns}/{node}{name[1:]}"
    return f"{ns}/{name}"


def image_type(topic: str) -> str:
    """The message type the node subscribes on a camera topic: CompressedImage for one ending in /compressed."""
    return COMPRESSED if is_compressed_topic(topic) else IMAGE


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
    def required_cameras(self) -> list[str]:
        """The cameras without which a tick is skipped (pi_policy.cameras: empty configured = every camera)."""
        return list(self.params.camera_set().required)

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

    def input_type(self, topic: str) -> str:
        """The message type the node subscribes on one of its input topics."""
        if topic in self.cameras.values():
            return image_type(topic)
        if topic == self.joint_states_topic:
            return JOINT_STATE
        if topic == self.prompt_topic:
            return STRING
        raise KeyError(f"{topic} is not one of the node's input topics")

    def describe(self) -> dict:
        """What the report records about the replay."""
        p = self.params
        return {"cameras": self.cameras, "joint_names": list(p.joint_names),
                "joint_states_topic": self.joint_states_topic, "prompt_topic": self.prompt_topic,
                "rate_hz": p.inference_rate_hz, "control_period_s": p.control_period_s,
                "max_age_s": p.max_observation_age_s, "max_future_s": p.max_future_skew_s,
                "required_cameras": self.required_cameras, "prompt": p.prompt,
                "latency_budget_ms": p.latency_budget_ms, "action_source": self.action_source,
                "action_topic": self.action_series_topic, "namespace": self.namespace,
                "max_ticks": self.max_ticks, "step_offset": self.step_offset, "realtime": self.realtime,
                "inference_delay_steps": p.inference_delay_steps}


def load_actions(bag: str | Path, setup: ReplaySetup) -> tuple[ActionSeries, TopicReport]:
    """The recorded actions the chunks are compared with (action topic or future joint positions)."""
    return load_action_series(bag, setup.action_series_topic, setup.action_source, setup.params.joint_names)
