"""Checkpoints: round trip in openpi's layout, LeRobot's prefix, and clear errors for wrong files."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from pi_policy.model import PiModel, get_config, init_random
from pi_policy.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    to_checkpoint_layout,
    weights_fingerprint,
)


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
def test_round_trip_is_exact(tmp_path, preset):
    cfg = get_config(preset)
    model = init_random(PiModel(cfg), seed=5)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    keys = set(load_file(str(path)))
    assert "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight" in keys
    assert "paligemma_with_expert.gemma_expert.model.layers.0.mlp.down_proj.weight" in keys
    assert ("time_mlp_in.weight" in keys) == cfg.pi05 and ("state_proj.weight" in keys) == (not cfg.pi05)
    loaded = load_checkpoint(PiModel(cfg), path)
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


def test_lerobot_and_legacy_layouts_load(tmp_path):
    cfg = get_config("tiny")
    model = init_random(PiModel(cfg), seed=6)
    legacy = {}
    for k, v in to_checkpoint_layout(model).items():
        k = k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        k = k.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        legacy["model." + k] = v
    legacy["model.paligemma_with_expert.paligemma.lm_head.weight"] = torch.zeros(cfg.vocab_size, cfg.llm.width)
    save_file(legacy, str(tmp_path / "model.safetensors"))
    loaded = load_checkpoint(PiModel(cfg), tmp_path)  # a folder holding the file
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


def test_wrong_checkpoint_lists_missing_unexpected_and_misshaped(tmp_path):
    cfg = get_config("tiny")
    sd = to_checkpoint_layout(init_random(PiModel(cfg)))
    del sd["action_out_proj.bias"]
    sd["some.extra.weight"] = torch.zeros(3)
    q = "paligemma_with_expert.paligemma.model.language_model.layers.1.self_attn.q_proj.weight"
    sd[q] = torch.zeros(7, 7)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(PiModel(cfg), tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1)" in msg and "action_out_proj.bias" in msg
    assert "unexpected keys (1)" in msg and "some.extra.weight" in msg
    assert "mis-shaped (1)" in msg and "(7, 7)" in msg


def test_pi05_checkpoint_into_pi0_preset_gets_a_hint(tmp_path):
    path = save_checkpoint(init_random(PiModel(get_config("tiny05"))), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="use --preset pi05"):
        load_checkpoint(PiModel(get_config("tiny")), path)


def test_nan_weights_are_refused(tmp_path):
    model = init_random(PiModel(get_config("tiny")))
    sd = to_checkpoint_layout(model)
    sd["action_in_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(PiModel(get_config("tiny")), tmp_path / "nan.safetensors")


def test_pickle_missing_and_corrupt_files_are_refused(tmp_path):
    model = PiModel(get_config("tiny"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(model, tmp_path / "junk.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(model, empty)
