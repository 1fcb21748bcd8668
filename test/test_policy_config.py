"""Named policy configurations set what openpi's training configs of those names set; a checkpoint's config.json
is read as the peer wrote it; explicit parameters override both, and a disagreement between them is an error."""

import pytest

from pi_policy.model.config import get_config
from pi_policy.policy_config import (
    CONFIGS,
    PolicyOverrides,
    get_policy_config,
    recorded_settings,
    resolve_policy,
)

PI0, PI05, TINY = get_config("pi0"), get_config("pi05"), get_config("tiny")

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
    s = resolve_policy(PI05 if pi05 else PI0, name)
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
    s = resolve_policy(PI05)
    assert (s["action_horizon"], s["max_token_len"], s["discrete_state_input"], s["delta_action_mask"]) == \
        (50, 200, True, ())
    assert s.settings["action_horizon"].origin == "preset pi05" and s.transforms.identity
    s = resolve_policy(PI05, "pi05_droid",
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
        resolve_policy(TINY, "pi05_droid")
    for kwargs, message in (({"action_horizon": 0}, "action_horizon must be a whole number >= 1"),
                            ({"max_token_len": 1}, "max_token_len must be at least 2"),
                            ({"robot_conversion": "trossen"}, "robot_conversion 'trossen' is not one of"),
                            ({"delta_action_mask": (6, 0)}, "run lengths must be non-zero")):
        assert message in PolicyOverrides(**kwargs).problems()[0]
        with pytest.raises(ValueError, match=message):
            resolve_policy(PI0, overrides=PolicyOverrides(**kwargs))


def lerobot_config(**extra):
    return {"type": "pi05", "chunk_size": 16, "n_action_steps": 8, "num_inference_steps": 5,
            "tokenizer_max_length": 180, "max_state_dim": 32, "max_action_dim": 32,
            "output_features": {"action": {"type": "ACTION", "shape": [8]}}} | extra


def test_a_lerobot_config_json_records_the_shape_and_the_relative_actions():
    rec = recorded_settings(lerobot_config(), "lerobot")
    s = resolve_policy(PI05, recorded=rec)
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
        resolve_policy(PI05, "pi05_droid", rec)
    text = str(e.value)
    assert "action_horizon: policy_config pi05_droid sets 15, config.json chunk_size says 50" in text
    assert "max_token_len: policy_config pi05_droid sets 200, config.json tokenizer_max_length says 180" in text
    assert "\n" not in text
    s = resolve_policy(PI05, "pi05_droid", rec, PolicyOverrides(action_horizon=15, max_token_len=200))
    assert s["action_horizon"] == 15 and s.notes == (
        "action_horizon 15 replaces 50 (config.json chunk_size)",
        "max_token_len 200 replaces 180 (config.json tokenizer_max_length)")
    rec = recorded_settings(lerobot_config(), "lerobot")  # LeRobot converts no joints: not an ALOHA policy
    with pytest.raises(ValueError, match="robot_conversion: policy_config pi05_aloha sets aloha, LeRobot's pi0 / "
                                         "pi0.5 convert no joints says none"):
        resolve_policy(PI05, "pi05_aloha", rec, PolicyOverrides(action_horizon=50, max_token_len=200,
                                                                              action_dim=14))


def test_inspect_says_what_a_folder_implies_and_what_is_left_to_set(tmp_path, capsys):
    from peers import write_lerobot_dir, write_openpi_dir

    from pi_policy.model import PiModel, init_random
    from pi_policy.tools.cli import main

    tiny, tiny05 = init_random(PiModel(TINY)), init_random(PiModel(get_config("tiny05")))
    write_lerobot_dir(init_random(PiModel(get_config("tiny05", horizon=16, num_steps=5))), tmp_path / "lerobot")
    assert main(["inspect", str(tmp_path / "lerobot")]) == 0
    out = capsys.readouterr().out
    for line in ("policy      action_horizon 16 (config.json chunk_size)", "denoise_steps 5 (config.json "
                 "num_inference_steps)", "delta_action_mask none (LeRobot before 0.5 has no relative actions)",
                 "action_dim 14 (config.json output_features)", "missing     nothing: ready"):
        assert line in out, line
    assert "to set" not in out  # LeRobot's processors record every transform

    write_openpi_dir(tiny, tmp_path / "openpi", asset_id="trossen")
    assert main(["inspect", str(tmp_path / "openpi")]) == 0
    out = capsys.readouterr().out
    assert "to set      openpi does not store delta actions, ALOHA's joint conversion or the horizon in a checkpoint" \
        in out and "the asset id of its statistics, trossen, fits pi0_aloha, pi0_aloha_towel" in out
    assert main(["inspect", str(tmp_path / "openpi"), "--policy-config", "pi0_aloha"]) == 0
    out = capsys.readouterr().out
    for line in ("delta_action_mask 6,-1,6,-1 (policy_config pi0_aloha)", "robot_conversion aloha (policy_config "
                 "pi0_aloha)", "action_dim 14 (policy_config pi0_aloha)", "to set" not in out,
                 f"run with    preset: tiny, checkpoint: {tmp_path / 'openpi'}, policy_config: pi0_aloha"):
        assert line is True or line in out, line
    # the conversion's config.json records horizon 50; pi0_droid trains 10: the folder is not pi0_droid's
    assert main(["inspect", str(tmp_path / "openpi"), "--policy-config", "pi0_droid"]) == 1
    out = capsys.readouterr().out
    assert "action_horizon: policy_config pi0_droid sets 10, config.json action_horizon says 50" in out
    assert "note        policy_config pi0_droid reads assets/droid/norm_stats.json, which is not here" in out

    # openpi's LIBERO statistics sit under a two-part asset id; several ids: the named configuration picks its own
    write_openpi_dir(tiny05, tmp_path / "libero", state_dim=8, asset_id="physical-intelligence/libero")
    write_openpi_dir(tiny05, tmp_path / "libero", state_dim=9, asset_id="other")
    assert main(["inspect", str(tmp_path / "libero")]) == 1
    assert "several norm_stats.json (assets/other/norm_stats.json, assets/physical-intelligence/libero/norm_stats" \
        in capsys.readouterr().out
    (tmp_path / "libero" / "config.json").unlink()
    assert main(["inspect", str(tmp_path / "libero"), "--policy-config", "pi05_libero"]) == 0
    out = capsys.readouterr().out
    assert "physical-intelligence/libero/norm_stats.json: openpi formulas, quantile (the preset default), state 8" \
        in out
    assert "action_horizon 10 (policy_config pi05_libero)" in out and "discrete_state_input False" in out


def test_parameters_and_flags_give_the_same_policy_settings():
    import argparse

    from pi_policy.node.params import ParamError, params_from_dict
    from pi_policy.tools.flags import add_model_arguments, spec_from_args

    params = params_from_dict({"preset": "tiny05", "device": "cpu", "joint_names": ["a"], "policy_config": "pi05_aloha",
                               "action_horizon": 12, "denoise_steps": 4, "max_token_len": 64,
                               "discrete_state_input": "false", "delta_action_mask": "6,-1,6,-1",
                               "robot_conversion": "none", "action_dim": 14})
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--preset", "tiny05", "--device", "cpu", "--policy-config", "pi05_aloha",
                              "--action-horizon", "12", "--denoise-steps", "4", "--max-token-len", "64",
                              "--discrete-state-input", "false", "--delta-action-mask", "6,-1,6,-1",
                              "--robot-conversion", "none"])
    assert spec_from_args(args, action_dim=14).replace(progress=True) == params.runner_spec()
    defaults = params_from_dict({"preset": "tiny", "joint_names": ["a"]}).runner_spec()
    assert (defaults.policy_config, defaults.action_horizon, defaults.discrete_state_input, defaults.delta_action_mask,
            defaults.robot_conversion) == (None, None, None, None, None)
    with pytest.raises(ParamError) as e:
        params_from_dict({"preset": "tiny", "joint_names": ["a"], "policy_config": "pi05_droid",
                          "denoise_steps": -1})
    text = str(e.value)
    assert "policy_config pi05_droid is a pi05 configuration, but preset tiny is pi0" in text
    assert "denoise_steps must be a whole number >= 1, got -1" in text
    for values, message in (({"discrete_state_input": "no"}, "discrete_state_input 'no' is not one of auto, true"),
                            ({"delta_action_mask": "6;-1"}, "expected whole numbers in openpi's make_bool_mask"),
                            ({"robot_conversion": "trossen"}, "robot_conversion 'trossen' is not one of auto, none"),
                            ({"policy_config": "pi0_alhoa"}, "did you mean 'pi0_aloha'")):
        with pytest.raises(ParamError, match=message):
            params_from_dict({"preset": "tiny", "joint_names": ["a"]} | values)
