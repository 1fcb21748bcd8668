"""The policy around the model: openpi's named training configurations, what a checkpoint folder records, and
the settings a runner is built with once explicit parameters, the named configuration, the checkpoint and the
preset have each had their say. Torch-free: parameter checks and `inspect` use it on any machine.

Precedence, per setting: an explicit parameter; else the named configuration and the checkpoint's record (they
must agree: a disagreement is an error that names both, resolved by setting the parameter); else the preset.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from pi_policy.robot_transforms import CONVERSIONS, RobotTransforms, make_bool_mask, mask_dims, mask_text, parse_mask

# What openpi's output transforms keep of the 32 model dims, per robot family.
ALOHA_ACTIONS, DROID_ACTIONS, LIBERO_ACTIONS = 14, 8, 7
ALOHA_RESET_POSE = (0.0, -1.5, 1.5, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class PolicyConfig:
    """One of openpi's pi0 / pi0.5 training configurations (src/openpi/training/config.py), as inference needs it:
    the model fields it sets and its data transforms."""

    name: str
    pi05: bool
    action_dim: int  # robot action dims the config's output transform returns
    asset_id: str  # the checkpoint's assets/<asset_id>/norm_stats.json
    robot: str  # what the robot sends and takes
    action_horizon: int = 50
    max_token_len: int | None = None  # openpi's Pi0Config: 200 for pi0.5, 48 for pi0
    discrete_state_input: bool | None = None  # openpi's Pi0Config: the state is in the prompt for pi0.5
    delta_action_mask: tuple[int, ...] = ()
    conversion: str = "none"
    default_prompt: str = ""
    reset_pose: tuple[float, ...] = ()  # policy metadata openpi's ALOHA client reads

    @property
    def kind(self) -> str:
        return "pi05" if self.pi05 else "pi0"

    def settings(self) -> dict[str, Any]:
        """The runner settings this configuration fixes, by setting name."""
        out = {"action_horizon": self.action_horizon,
               "max_token_len": self.max_token_len or (200 if self.pi05 else 48), "model_action_dim": 32,
               "delta_action_mask": self.delta_action_mask, "robot_conversion": self.conversion,
               "action_dim": self.action_dim}
        if self.pi05:
            out["discrete_state_input"] = True if self.discrete_state_input is None else self.discrete_state_input
        return out


def _aloha(name: str, pi05: bool, prompt: str = "", delta: bool = True, asset_id: str = "trossen") -> PolicyConfig:
    # LeRobotAlohaDataConfig: adapt_to_pi, joints as deltas (make_bool_mask(6, -1, 6, -1)) unless turned off
    return PolicyConfig(name, pi05, ALOHA_ACTIONS, asset_id, "ALOHA: 2 x (6 joints + gripper) positions",
                        delta_action_mask=(6, -1, 6, -1) if delta else (), conversion="aloha",
                        default_prompt=prompt, reset_pose=ALOHA_RESET_POSE)


def _droid(name: str, pi05: bool, horizon: int, joint_position: bool = False, max_token_len: int | None = None
           ) -> PolicyConfig:
    # DroidInputs / DroidOutputs; RLDS joint-position training adds DeltaActions(make_bool_mask(7, -1))
    robot = "DROID: 7 joint positions + gripper in; " + ("7 joint positions" if joint_position else
                                                         "7 joint velocities") + " + gripper position out"
    return PolicyConfig(name, pi05, DROID_ACTIONS, "droid", robot, action_horizon=horizon,
                        max_token_len=max_token_len, delta_action_mask=(7, -1) if joint_position else ())


_LIBERO = "LIBERO: eef position, axis-angle, 2 gripper joints in; 6 eef deltas + gripper out"
CONFIGS: dict[str, PolicyConfig] = {c.name: c for c in (
    _aloha("pi0_aloha", False),
    _aloha("pi05_aloha", True),
    _aloha("pi0_aloha_towel", False, "fold the towel"),
    _aloha("pi0_aloha_tupperware", False, "open the tupperware and put the food on the plate"),
    _aloha("pi0_aloha_pen_uncap", False, "uncap the pen"),
    _aloha("pi05_aloha_pen_uncap", True, "uncap the pen"),
    _aloha("pi0_aloha_sim", False, "Transfer cube", delta=False, asset_id="lerobot/aloha_sim_transfer_cube_human"),
    _droid("pi0_droid", False, 10),
    _droid("pi05_droid", True, 15),
    _droid("pi05_droid_finetune", True, 16),
    _droid("pi05_full_droid_finetune", True, 16, joint_position=True),
    _droid("pi05_droid_jointpos_polaris", True, 15, joint_position=True),
    _droid("pi0_droid_jointpos_polaris", False, 10, joint_position=True, max_token_len=100),
    _droid("pi0_droid_jointpos_100k_polaris", False, 10, joint_position=True, max_token_len=100),
    # LeRobotLiberoDataConfig: old pi0 checkpoints add DeltaActions(make_bool_mask(6, -1)) (extra_delta_transform)
    PolicyConfig("pi0_libero", False, LIBERO_ACTIONS, "physical-intelligence/libero", _LIBERO,
                 delta_action_mask=(6, -1)),
    PolicyConfig("pi05_libero", True, LIBERO_ACTIONS, "physical-intelligence/libero", _LIBERO, action_horizon=10,
                 discrete_state_input=False),
)}


def get_policy_config(name: str) -> PolicyConfig:
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, CONFIGS, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown policy_config {name!r}{hint}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


# -- parameter and flag text -> setting values (None: auto, left to the named config, the checkpoint, the preset) --
AUTO = "auto"
STATE_INPUTS = (AUTO, "true", "false")


def state_input_value(text: str) -> bool | None:
    if text not in STATE_INPUTS:
        raise ValueError(f"discrete_state_input '{text}' is not one of {', '.join(STATE_INPUTS)} (quote it in YAML)")
    return None if text == AUTO else text == "true"


def mask_value(text: str) -> tuple[int, ...] | None:
    return None if str(text).strip() == AUTO else parse_mask(text)


def conversion_value(text: str) -> str | None:
    if text != AUTO and text not in CONVERSIONS:
        raise ValueError(f"robot_conversion '{text}' is not one of {AUTO}, {', '.join(CONVERSIONS)}")
    return None if text == AUTO else text


# -- the settings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    value: Any
    origin: str  # where it came from, for logs and `inspect`


SETTINGS = ("action_horizon", "denoise_steps", "max_token_len", "model_action_dim", "discrete_state_input",
            "delta_action_mask", "robot_conversion", "action_dim")


@dataclass(frozen=True)
class PolicyOverrides:
    """Settings given explicitly (parameters, flags); None = not given."""

    action_horizon: int | None = None
    denoise_steps: int | None = None
    max_token_len: int | None = None
    discrete_state_input: bool | None = None
    delta_action_mask: tuple[int, ...] | None = None
    robot_conversion: str | None = None
    action_dim: int | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("action_horizon", "denoise_steps", "max_token_len", "action_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                out.append(f"{name} must be a whole number >= 1, got {v!r}")
            elif name == "max_token_len" and v is not None and v < 2:
                out.append(f"max_token_len must be at least 2 (BOS and one token), got {v}")
        if self.discrete_state_input is not None and not isinstance(self.discrete_state_input, bool):
            out.append(f"discrete_state_input must be true or false, got {self.discrete_state_input!r}")
        if self.robot_conversion is not None and self.robot_conversion not in CONVERSIONS:
            out.append(f"robot_conversion {self.robot_conversion!r} is not one of {', '.join(CONVERSIONS)}")
        if self.delta_action_mask is not None:
            try:
                RobotTransforms(tuple(self.delta_action_mask))
            except (ValueError, TypeError) as e:
                out.append(str(e))
        return out


@dataclass(frozen=True)
class PolicySettings:
    """What a runner is built with, each setting with its origin."""

    settings: dict[str, Setting]
    config: PolicyConfig | None = None
    notes: tuple[str, ...] = ()  # explicit parameters that replace what the checkpoint records

    def __getitem__(self, name: str) -> Any:
        return self.settings[name].value

    @property
    def transforms(self) -> RobotTransforms:
        return RobotTransforms(tuple(self["delta_action_mask"]), self["robot_conversion"])

    def model_overrides(self) -> dict[str, int]:
        """The model config's fields (pi_policy.model.config.PiConfig) these settings fix."""
        return {"horizon": self["action_horizon"], "num_steps": self["denoise_steps"],
                "max_token_len": self["max_token_len"], "action_dim": self["model_action_dim"]}

    def describe(self) -> list[tuple[str, str]]:
        """(setting, 'value (origin)') rows."""
        rows = []
        for name in SETTINGS:
            s = self.settings[name]
            value = mask_text(s.value) if name == "delta_action_mask" else \
                "the statistics' action dims" if s.value is None else s.value
            rows.append((name, f"{value} ({s.origin})"))
        return rows


@dataclass
class Recorded:
    """What a checkpoint's config.json says about the policy; `problems` are settings this runtime cannot run."""

    settings: dict[str, Setting] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    n_action_steps: int | None = None  # LeRobot: steps executed per chunk (its queue), for information


def _lerobot_delta_mask(config: dict) -> tuple[int, ...]:
    """LeRobot's RelativeActionsProcessorStep mask: every action dim relative except those whose name contains
    (lower case) one of relative_exclude_joints; all of them when the names are not recorded."""
    dim = _action_dim(config) or config.get("max_action_dim", 32)
    names = config.get("action_feature_names")
    exclude = [str(t).lower() for t in config.get("relative_exclude_joints") or [] if t]
    if not exclude or not names:
        return mask_dims([True] * dim)
    mask = [not any(t == str(n).lower() or t in str(n).lower() for t in exclude) for n in names[:dim]]
    return mask_dims(mask + [True] * (dim - len(mask)))


def _action_dim(config: dict) -> int | None:
    shape = ((config.get("output_features") or {}).get("action") or {}).get("shape")
    return int(shape[0]) if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) else None


def recorded_settings(config: dict, source: str) -> Recorded:
    """The settings a checkpoint's config.json records: LeRobot's policy config, or openpi's conversion config."""
    rec = Recorded()
    s = rec.settings

    def take(key: str, name: str) -> None:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            s[name] = Setting(v, f"config.json {key}")

    if source == "lerobot" and config:
        take("chunk_size", "action_horizon")
        take("num_inference_steps", "denoise_steps")
        take("tokenizer_max_length", "max_token_len")
        take("max_action_dim", "model_action_dim")
        if config.get("type") == "pi05":
            s["discrete_state_input"] = Setting(True, "LeRobot's pi0.5 writes the state into the prompt")
        if isinstance(config.get("use_relative_actions"), bool):
            mask = _lerobot_delta_mask(config) if config["use_relative_actions"] else ()
            s["delta_action_mask"] = Setting(mask, "config.json use_relative_actions")
        else:
            s["delta_action_mask"] = Setting((), "LeRobot before 0.5 has no relative actions")
        s["robot_conversion"] = Setting("none", "LeRobot's pi0 / pi0.5 convert no joints")
        if (dim := _action_dim(config)) is not None:
            s["action_dim"] = Setting(dim, "config.json output_features")
        if isinstance(config.get("n_action_steps"), int):
            rec.n_action_steps = config["n_action_steps"]
        state_dim, action_dim = config.get("max_state_dim"), config.get("max_action_dim")
        if config.get("type") == "pi0" and state_dim is not None and action_dim is not None and state_dim != action_dim:
            rec.problems.append(f"config.json max_state_dim {state_dim} differs from max_action_dim {action_dim}: "
                                "this runtime's pi0 pads state and actions to one width")
        for key in ("use_visual_memory", "use_proprioceptive_memory"):
            if config.get(key) is True:
                rec.problems.append(f"config.json {key} is true: observation memory is not supported")
    elif source == "openpi" and "paligemma_variant" in config:  # openpi's JAX -> PyTorch conversion writes this
        take("action_horizon", "action_horizon")
        take("action_dim", "model_action_dim")
    return rec


def resolve_policy(preset: Any, policy_config: str | None = None, recorded: Recorded | None = None,
                   overrides: PolicyOverrides | None = None) -> PolicySettings:
    """The runner's settings for a model preset (pi_policy.model.config.PiConfig: its name, pi05, horizon,
    num_steps, max_token_len and action_dim give the defaults)."""
    pi05, defaults = preset.pi05, {"action_horizon": preset.horizon, "denoise_steps": preset.num_steps,
                                   "max_token_len": preset.max_token_len, "model_action_dim": preset.action_dim}
    preset = preset.name
    overrides = overrides or PolicyOverrides()
    if overrides.problems():
        raise ValueError("; ".join(overrides.problems()))
    cfg = get_policy_config(policy_config) if policy_config else None
    kind = "pi05" if pi05 else "pi0"
    if cfg is not None and cfg.pi05 != pi05:
        raise ValueError(f"policy_config {cfg.name} is a {cfg.kind} configuration, but preset {preset!r} is {kind}")
    named = {k: Setting(v, f"policy_config {cfg.name}") for k, v in cfg.settings().items()} if cfg else {}
    rec = recorded.settings if recorded else {}
    base = {**defaults, "discrete_state_input": pi05, "delta_action_mask": (), "robot_conversion": "none",
            "action_dim": None}
    out, conflicts, notes = {}, [], []
    for name in SETTINGS:
        given = getattr(overrides, name, None)
        if name == "model_action_dim":  # the weights' width: recorded or the preset's, not a parameter
            given = None
        if given is not None:
            out[name] = Setting(tuple(given) if name == "delta_action_mask" else given, "parameter")
            if name in rec and _shown(name, rec[name].value) != _shown(name, out[name].value):
                notes.append(f"{name} {_shown(name, given)} replaces {_shown(name, rec[name].value)} "
                             f"({rec[name].origin})")
            continue
        a, b = named.get(name), rec.get(name)
        if a is not None and b is not None and _shown(name, a.value) != _shown(name, b.value):
            conflicts.append(f"{name}: {a.origin} sets {_shown(name, a.value)}, {b.origin} says "
                             f"{_shown(name, b.value)}")
        out[name] = a or b or Setting(base[name], f"preset {preset}" if name in defaults else "default")
    if conflicts:
        raise ValueError("the named policy configuration and the checkpoint disagree (set the parameter to choose): "
                         + "; ".join(conflicts))
    if not pi05:
        out["discrete_state_input"] = Setting(False, "pi0 feeds the state to the action expert")
    RobotTransforms(tuple(out["delta_action_mask"].value), out["robot_conversion"].value)  # checks both
    return PolicySettings(out, cfg, tuple(notes))


def _shown(name: str, value: Any) -> Any:
    """A value as compared and printed: masks in canonical notation (a trailing absolute run changes nothing)."""
    if name != "delta_action_mask":
        return value
    dims = list(mask_dims(make_bool_mask(*value)))
    while dims and dims[-1] < 0:
        dims.pop()
    return mask_text(dims)
