"""openpi's inference transforms for pi0 / pi0.5, written out from its source for the tests to hold this runtime to.

From Physical-Intelligence/openpi: src/openpi/transforms.py (Normalize, Unnormalize, DeltaActions, AbsoluteActions,
PadStatesAndActions), src/openpi/policies/aloha_policy.py (AlohaInputs / AlohaOutputs with adapt_to_pi),
droid_policy.py, libero_policy.py, and src/openpi/policies/policy_config.py (the order: data transforms in,
Normalize, model transforms; out: Unnormalize, then the data transforms' outputs, AbsoluteActions first).
Only numpy; the constants are openpi's.
"""

from __future__ import annotations

import numpy as np

MODEL_DIM = 32


def bool_mask(*dims: int) -> np.ndarray:
    return np.array([d > 0 for d in dims for _ in range(abs(d))], dtype=bool)


# aloha_policy.py
FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])


def _gripper_to_angular(v):
    v = v * (0.05800 - 0.01844) + 0.01844
    v = np.arcsin(np.clip((0.022**2 + v**2 - 0.036**2) / (2 * 0.022 * v), -1.0, 1.0))
    return (v - 0.5476) / (1.6296 - 0.5476)


def _gripper_from_angular(v):
    return (v + 0.5476 - -0.6213) / (1.4910 - -0.6213)


def aloha_decode_state(state):
    state = FLIP * np.asarray(state, dtype=np.float64)
    state[[6, 13]] = _gripper_to_angular(state[[6, 13]])
    return state


def aloha_encode_actions(actions):
    actions = FLIP * actions[:, :14]
    actions[:, [6, 13]] = _gripper_from_angular(actions[:, [6, 13]])
    return actions


# transforms.py
def normalize(x, stats, quantile):
    n = x.shape[-1]
    if quantile:
        q01, q99 = stats.q01[:n], stats.q99[:n]
        return (x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
    return (x - stats.mean[:n]) / (stats.std[:n] + 1e-6)


def unnormalize(x, stats, quantile):
    if quantile:
        d = stats.q01.shape[-1]
        head = (x[..., :d] + 1.0) / 2.0 * (stats.q99 - stats.q01 + 1e-6) + stats.q01
        return np.concatenate([head, x[..., d:]], axis=-1)
    pad = x.shape[-1] - stats.mean.shape[-1]
    mean, std = np.pad(stats.mean, (0, pad)), np.pad(stats.std, (0, pad), constant_values=1.0)
    return x * (std + 1e-6) + mean


def pad(x, dim=MODEL_DIM):
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])])


def absolute_actions(actions, state, mask):
    actions = actions.copy()
    d = mask.shape[-1]
    actions[..., :d] += np.expand_dims(np.where(mask, state[..., :d], 0), axis=-2)
    return actions


ROBOTS = {  # config name -> (decode the state, encode the actions, delta mask or None, quantile norm)
    "pi0_aloha": (aloha_decode_state, aloha_encode_actions, bool_mask(6, -1, 6, -1), False),
    "pi05_aloha": (aloha_decode_state, aloha_encode_actions, bool_mask(6, -1, 6, -1), True),
    "pi0_droid": (lambda s: np.asarray(s, np.float64), lambda a: a[:, :8], None, False),
    "pi05_droid": (lambda s: np.asarray(s, np.float64), lambda a: a[:, :8], None, True),
    "pi0_libero": (lambda s: np.asarray(s, np.float64), lambda a: a[:, :7], bool_mask(6, -1), False),
    "pi05_libero": (lambda s: np.asarray(s, np.float64), lambda a: a[:, :7], None, True),
}


def model_state(config: str, robot_state, stats) -> np.ndarray:
    """What openpi's input transforms hand the model as the state: decoded, normalized, zero-padded to 32."""
    decode, _, _, quantile = ROBOTS[config]
    return pad(normalize(decode(robot_state), stats["state"], quantile))


def robot_actions(config: str, model_actions, robot_state, stats) -> np.ndarray:
    """openpi's output chain: Unnormalize (actions and the model-side state), AbsoluteActions, the robot's
    output transform."""
    _, encode, mask, quantile = ROBOTS[config]
    state = unnormalize(model_state(config, robot_state, stats), stats["state"], quantile)
    actions = unnormalize(np.asarray(model_actions, np.float64), stats["actions"], quantile)
    if mask is not None:
        actions = absolute_actions(actions, state, mask)
    return encode(actions)
