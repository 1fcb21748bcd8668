"""Named policy configurations set what openpi's training configs of those names set; a checkpoint's config.json
is read as the peer wrote it; explicit parameters override both, and a disagreement between them is an error."""

import pytest

from pi_policy.policy_config import (
    CONFIGS,
    PolicyOverrides,
    get_policy_config,
    recorded_settings,
    resolve_policy,
)

PI0 = {"action_horizon": 50, "denoise_steps": 10, "max_token_len": 48, "model_action_dim": 32}
PI05 = PI0 | {"max_token_len": 200}

# From openpi's src/openpi/training/config.py (and training/misc/polaris_config.py): name -> (pi05, action_horizon,
# max_token_len, discrete_state_input, delta mask, ALOHA adapt_to_pi, robot action dims kept by the output transform,
# asset_id, default prompt)
OPENPI = {
    "pi0_aloha": (False, 50, 48, False, (6, -1, 6, -1), True, 14, "trossen", ""),
    "pi05_aloha": (True, 50, 200, True, (6, -1, 6, -1), True, 14, "trossen", ""),
    "pi0_aloha_towel": (False, 50, 48, False, (6, -1, 6, -1), True, 14, "trossen", "fold the towel"),
    "pi0_aloha_tupperware": (False, 50, 48, False, (6, -1, 6, -1), True, 14, "trossen",
                             "open the tupperware and put the food on the plate"),
    "pi0_aloha_pen_uncap": (False, 50, 48, False, (6, -1, 6, -1), True, 14, "trossen", "uncap the pen"),
    "pi05_aloha_pen_uncap": (True, 50, 200, True, (6, -1, 6, -1), True, 14, "trossen", "uncap the pen"),
    "pi0_aloha_sim": (False, 50, 48, False, (), True, 14, "lerobot/aloha_sim_transfer_cube_human", "Transfer cube"),
    "pi0_droid": (False, 10, 48, False, (), False, 8, "droid", ""),
    "pi05_droid": (True, 15, 200, True, (), False, 8, "droid", ""),
    "pi05_droid_finetune": (True, 16, 200, True, (), False, 8, "droid", ""),
    "pi05_full_droid_finetune": (True, 16, 200, True, (7, -1), False, 8, "droid", ""),
    "pi05_droid_jointpos_polaris": (True, 15, 200, True, (7, -1), False, 8, "droid", ""),
    "pi0_droid_jointpos_polaris": (False, 10, 100, False, (7, -1), False, 8, "droid", ""),
    "pi0_droid_jointpos_100k_polaris": (False, 10, 100, False, (7, -1), False, 8, "droid", ""),
    "pi0_libero": (False, 50, 48, False, (6, -1), False, 7, "physical-intelligence/libero", ""),
    "pi05_libero": (True, 10, 200, False, (), False, 7, "physical-intelligence/libero", ""),
}


@pytest.mark.parametrize("name", sorted(OPENPI))
def test_each_named_config_sets_what_openpi_sets(name):
    pi05, horizon, tokens, state_input, mask, aloha, action_dim, asset_id, prompt = OPENPI[name]
    s = resolve_policy(pi05, "pi05" if pi05 else "pi0", PI05 if pi05 else PI0, name)
    assert (s["action_horizon"], s["max_token_len"], s["discrete_state_input"], s["delta_action_mask"],
            s["robot_conversion"], s["action_dim"], s["denoise_steps"], s["model_action_dim"]) == \
        (horizon, tokens, state_input, mask, "aloha" if aloha else "none", action_dim, 10, 32)
    cfg = s.config
    assert (cfg.asset_id, cfg.default_prompt) == (asset_id, prompt)
    assert cfg.reset_pose == ((0, -1.5, 1.5, 0, 0, 0) if aloha else ())
    assert s.settings["action_horizon"].origin == f"policy_config {name}"


def test_every_config_is_listed():
    assert set(CONFIGS) == set(OPENPI)


def test_without_a_name_the_preset_decides_and_parameters_override():
    s = resolve_policy(True, "pi05", PI05)
    assert (s["action_horizon"], s["max_token_len"], s["discrete_state_input"], s["delta_action_mask"]) == \
        (50, 200, True, ())
    assert s.settings["action_horizon"].origin == "preset pi05" and s.transforms.identity
    s = resolve_policy(True, "pi05", PI05, "pi05_droid",
                       overrides=PolicyOverrides(action_horizon=12, denoise_steps=5, delta_action_mask=(7, -1),
                                                 discrete_state_input=False))
    assert (s["action_horizon"], s["denoise_steps"], s["delta_action_mask"], s["discrete_state_input"]) == \
        (12, 5, (7, -1), False)
    assert s.settings["denoise_steps"].origin == "parameter" and s["action_dim"] == 8
    assert ("action_horizon", "12 (parameter)") in s.describe()
    assert s.model_overrides() == {"horizon": 12, "num_steps": 5, "max_token_len": 200, "action_dim": 32}


def test_bad_names_kinds_and_values_are_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown policy_config 'pi0_drod' \(did you mean 'pi0_droid'\?\)"):
        get_policy_config("pi0_drod")
    with pytest.raises(ValueError, match="policy_config pi05_droid is a pi05 configuration, but preset 'tiny' is pi0"):
        resolve_policy(False, "tiny", PI0, "pi05_droid")
    for kwargs, message in (({"action_horizon": 0}, "action_horizon must be a whole number >= 1"),
                            ({"max_token_len": 1}, "max_token_len must be at least 2"),
                            ({"robot_conversion": "trossen"}, "robot_conversion 'trossen' is not one of"),
                            ({"delta_action_mask": (6, 0)}, "run lengths must be non-zero")):
        with pytest.raises(ValueError, match=message):
            PolicyOverrides(**kwargs)


def lerobot_config(**extra):
    return {"type": "pi05", "chunk_size": 16, "n_action_steps": 8, "num_inference_steps": 5,
            "tokenizer_max_length": 180, "max_state_dim": 32, "max_action_dim": 32,
            "output_features": {"action": {"type": "ACTION", "shape": [8]}}} | extra


def test_a_lerobot_config_json_records_the_shape_and_the_relative_actions():
    rec = recorded_settings(lerobot_config(), "lerobot")
    s = resolve_policy(True, "pi05", PI05, recorded=rec)
    assert (s["action_horizon"], s["denoise_steps"], s["max_token_len"], s["action_dim"], s["delta_action_mask"]) \
        == (16, 5, 180, 8, ())
    assert s.settings["action_horizon"].origin == "config.json chunk_size" and rec.n_action_steps == 8
    names = [f"joint_{i}" for i in range(7)] + ["Gripper_pos"]
    rec = recorded_settings(lerobot_config(use_relative_actions=True, action_feature_names=names,
                                           relative_exclude_joints=["gripper"]), "lerobot")
    assert rec.settings["delta_action_mask"].value == (7, -1)
    rec = recorded_settings(lerobot_config(use_relative_actions=True, relative_exclude_joints=["gripper"]), "lerobot")
    assert rec.settings["delta_action_mask"].value == (8,)  # without names LeRobot makes every dim relative
    openpi = recorded_settings({"action_dim": 32, "action_horizon": 10, "paligemma_variant": "gemma_2b"}, "openpi")
    assert {k: v.value for k, v in openpi.settings.items()} == {"action_horizon": 10, "model_action_dim": 32}
    bad = recorded_settings({"type": "pi0", "max_state_dim": 14, "max_action_dim": 32,
                             "use_proprioceptive_memory": True}, "lerobot")
    assert len(bad.problems) == 2 and "max_state_dim 14 differs from max_action_dim 32" in bad.problems[0]


def test_a_name_that_contradicts_the_checkpoint_is_an_error_a_parameter_resolves():
    rec = recorded_settings(lerobot_config(chunk_size=50, type="pi05"), "lerobot")
    with pytest.raises(ValueError) as e:
        resolve_policy(True, "pi05", PI05, "pi05_droid", rec)
    text = str(e.value)
    assert "action_horizon: policy_config pi05_droid sets 15, config.json chunk_size says 50" in text
    assert "max_token_len: policy_config pi05_droid sets 200, config.json tokenizer_max_length says 180" in text
    assert "\n" not in text
    s = resolve_policy(True, "pi05", PI05, "pi05_droid", rec, PolicyOverrides(action_horizon=15, max_token_len=200))
    assert s["action_horizon"] == 15 and s.notes == (
        "action_horizon 15 replaces 50 (config.json chunk_size)",
        "max_token_len 200 replaces 180 (config.json tokenizer_max_length)")
    rec = recorded_settings(lerobot_config(), "lerobot")  # LeRobot converts no joints: not an ALOHA policy
    with pytest.raises(ValueError, match="robot_conversion: policy_config pi05_aloha sets aloha, LeRobot's pi0 / "
                                         "pi0.5 convert no joints says none"):
        resolve_policy(True, "pi05", PI05, "pi05_aloha", rec, PolicyOverrides(action_horizon=50, max_token_len=200,
                                                                              action_dim=14))
