"""Checkpoints saved the way openpi and LeRobot save them: they load in both layouts, act exactly as the weights
they were saved from, and bring their statistics and prompt format from beside the weights; what is missing is
one clear error, and `pi-policy inspect` says so first."""

import json

import numpy as np
import pytest
import torch
from peers import copy_weights, peer_module, save_like_peer, write_lerobot_dir, write_openpi_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.model import PiModel, get_config, init_random
from pi_policy.model.checkpoint import LM_HEAD, PG, CheckpointError, load_checkpoint, weights_fingerprint
from pi_policy.model.checkpoint_dir import find_checkpoint, load_statistics, resolve_assets
from pi_policy.node.params import params_from_dict
from pi_policy.runtime import build_runner
from pi_policy.tools.cli import main
from pi_policy.tools.synthetic import synthetic_observation

EMBED = PG + "language_model.embed_tokens.weight"
WRITERS = {"openpi": write_openpi_dir, "lerobot": write_lerobot_dir}


@pytest.fixture(autouse=True)
def _empty_caches(monkeypatch, tmp_path):
    """This machine's openpi / Hugging Face caches must not decide what a test finds."""
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "openpi-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def tensor_names(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def run(runner, seed: int) -> np.ndarray:
    obs = synthetic_observation(DEFAULT_CAMERAS, 64, 14, seed)
    noise = np.random.default_rng(seed).standard_normal((runner.cfg.horizon, runner.cfg.action_dim))
    return runner.infer(obs, noise=noise.astype(np.float32)).actions


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
@pytest.mark.parametrize("source", ["openpi", "lerobot"])
def test_peer_folder_loads_and_acts_like_the_weights_it_was_saved_from(tmp_path, preset, source):
    model = init_random(PiModel(get_config(preset)), seed=7)
    root = tmp_path / source
    WRITERS[source](model, root)
    prefix = "model." if source == "lerobot" else ""
    names = tensor_names(root / "model.safetensors")
    assert prefix + LM_HEAD in names and prefix + EMBED not in names  # save_model kept one name of the tied pair

    ck = find_checkpoint(root)
    assert (ck.source, ck.layout, ck.tied_lm_head) == (source, source, True)
    assert weights_fingerprint(load_checkpoint(PiModel(model.cfg), root)) == weights_fingerprint(model)

    # statistics and prompt format from the folder
    runner = build_runner(preset=preset, checkpoint=str(root), progress=False)
    assert runner.tokenizer.prompt_format == source and runner.normalizer.convention == source
    reference = build_runner(preset=preset, model=model, norm_stats=str(ck.stats_file), prompt_format=source,
                             progress=False)
    for seed in range(2):
        np.testing.assert_array_equal(run(runner, seed), run(reference, seed))
    if model.cfg.pi05:  # the state bins in the prompt: LeRobot pads the 14 joints to 32 dims, openpi does not
        text = runner.tokenizer.decode(np.array(runner.tokenizer.token_ids("go", np.zeros(14))))
        bins = text.split("State: ")[1].split(";")[0].split()
        assert len(bins) == (32 if source == "lerobot" else 14)


def test_a_weights_file_finds_what_lies_beside_it(tmp_path):
    model = init_random(PiModel(get_config("tiny05")), seed=8)
    write_lerobot_dir(model, tmp_path)
    runner = build_runner(preset="tiny05", checkpoint=str(tmp_path / "model.safetensors"), progress=False)
    assert runner.tokenizer.prompt_format == "lerobot" and runner.normalizer.state_dim == 14


def test_transformers_5_layout_and_files_without_tie_metadata_load(tmp_path):
    model = init_random(PiModel(get_config("tiny")), seed=9)
    path = save_like_peer(model, tmp_path / "v5", "openpi", transformers_5_vision=True)
    assert not any("vision_model" in k for k in tensor_names(path))
    assert weights_fingerprint(load_checkpoint(PiModel(model.cfg), path)) == weights_fingerprint(model)
    bare = tmp_path / "bare.safetensors"  # the tie known without save_model's metadata (openpi's dedup + save_file)
    save_file(load_file(str(path)), str(bare))
    assert weights_fingerprint(load_checkpoint(PiModel(model.cfg), bare)) == weights_fingerprint(model)


def test_sharded_index_and_other_weight_names(tmp_path):
    model = init_random(PiModel(get_config("tiny")), seed=10)
    write_lerobot_dir(model, tmp_path / "lerobot")
    tensors = load_file(str(tmp_path / "lerobot" / "model.safetensors"))
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(shards / name))
        weight_map |= {k: name for k in part}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert weights_fingerprint(load_checkpoint(PiModel(model.cfg), shards)) == weights_fingerprint(model)
    # Another weights name in a LeRobot folder: the processors' statistics files are not taken for weights.
    (tmp_path / "lerobot" / "model.safetensors").rename(tmp_path / "lerobot" / "pi0.safetensors")
    assert weights_fingerprint(load_checkpoint(PiModel(model.cfg), tmp_path / "lerobot")) == weights_fingerprint(model)
    (shards / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard"):
        load_checkpoint(PiModel(model.cfg), shards)


def test_without_statistics_a_checkpoint_is_refused_with_one_clear_line(tmp_path):
    model = init_random(PiModel(get_config("tiny")), seed=11)
    write_openpi_dir(model, tmp_path)
    (tmp_path / "assets" / "robot" / "norm_stats.json").unlink()
    values = {"preset": "tiny", "checkpoint": str(tmp_path), "device": "cpu", "joint_names": ["j"]}
    with pytest.raises(ValueError, match="no normalization statistics .*norm_stats.json.*motors"):
        build_runner(params_from_dict(values).runner_spec())  # the node's own path
    # The random-weights demo needs none; a benchmark may run without them on purpose.
    assert build_runner(preset="tiny", progress=False).normalizer.stats is None
    bench = build_runner(preset="tiny", checkpoint=str(tmp_path), require_assets=False, progress=False)
    assert bench.normalizer.stats is None
    # Two robots' statistics and no choice made: refused, naming both.
    write_openpi_dir(model, tmp_path / "two", asset_id="a")
    (tmp_path / "two" / "assets" / "b").mkdir()
    (tmp_path / "two" / "assets" / "b" / "norm_stats.json").write_bytes(
        (tmp_path / "two" / "assets" / "a" / "norm_stats.json").read_bytes())
    with pytest.raises(ValueError, match="several norm_stats.json"):
        build_runner(preset="tiny", checkpoint=str(tmp_path / "two"), progress=False)


def test_full_size_checkpoint_needs_the_tokenizer_found_beside_it(tmp_path):
    write_openpi_dir(init_random(PiModel(get_config("tiny")), seed=12), tmp_path)
    with pytest.raises(ValueError, match="no PaliGemma tokenizer"):
        resolve_assets(get_config("pi0"), str(tmp_path))
    (tmp_path / "paligemma_tokenizer.model").write_bytes(b"stand-in")
    assert resolve_assets(get_config("pi0"), str(tmp_path)).tokenizer == str(tmp_path / "paligemma_tokenizer.model")


def test_explicit_parameters_win_over_what_is_found(tmp_path):
    model = init_random(PiModel(get_config("tiny")), seed=13)
    write_lerobot_dir(model, tmp_path / "lerobot")
    openpi_stats = write_openpi_dir(model, tmp_path / "openpi")
    assets = resolve_assets(model.cfg, str(tmp_path / "lerobot"), str(tmp_path / "openpi" / "assets" / "robot"),
                            prompt_format="openpi")
    assert assets.prompt_format == "openpi" and assets.statistics.convention == "openpi"
    np.testing.assert_array_equal(assets.statistics.stats["state"].mean, openpi_stats["state"].mean)
    for path in (tmp_path / "lerobot", tmp_path / "lerobot" / "policy_preprocessor.json"):
        assert load_statistics(path).convention == "lerobot"
    with pytest.raises(ValueError, match="prompt_format"):
        resolve_assets(model.cfg, prompt_format="hf")


def test_peer_module_has_the_peers_names_not_ours(tmp_path):
    """The test's peer module is transformers' tree: a key the project invented would not load into it."""
    cfg = get_config("tiny")
    peer = peer_module(cfg)
    assert "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight" \
        in peer.state_dict()
    model = init_random(PiModel(cfg))
    copy_weights(model, peer)  # strict: every key of the project's map exists in transformers' modules
    sd = peer.state_dict()
    assert sd[LM_HEAD].data_ptr() == sd[EMBED].data_ptr()
    with pytest.raises(RuntimeError, match="Unexpected"):
        peer.load_state_dict(sd | {"paligemma_with_expert.paligemma.model.language_model.embed.weight":
                                   torch.zeros(1)})


def test_inspect_reports_a_ready_folder_and_what_is_missing(tmp_path, capsys):
    model = init_random(PiModel(get_config("tiny05")), seed=14)
    write_lerobot_dir(model, tmp_path / "lerobot")
    assert main(["inspect", str(tmp_path / "lerobot")]) == 0
    out = capsys.readouterr().out
    for line in ("layout      LeRobot's (keys under 'model.'); PaliGemma's lm_head stands in for the tied token",
                 "written by  lerobot (policy_preprocessor.json, policy_postprocessor.json)",
                 "preset      tiny05 (every tensor fits)", "the state zero-padded to 32 dims",
                 "lerobot formulas, quantile, state 14 dims, actions 14 dims",
                 "cameras     base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb", "missing     nothing: ready",
                 f"run with    preset: tiny05, checkpoint: {tmp_path / 'lerobot'}"):
        assert line in out, line

    write_openpi_dir(init_random(PiModel(get_config("tiny"))), tmp_path / "openpi")
    (tmp_path / "openpi" / "assets" / "robot" / "norm_stats.json").unlink()
    assert main(["inspect", str(tmp_path / "openpi" / "model.safetensors"), "--preset", "tiny05"]) == 1
    out = capsys.readouterr().out
    assert "written by  openpi (config.json of an openpi conversion)" in out
    assert "does not fit preset 'tiny05'" in out and "use --preset pi0" in out
    assert "- no norm_stats.json beside the weights" in out and "statistics  none found" in out
    (tmp_path / "lerobot" / "paligemma_tokenizer.model").write_bytes(b"not a SentencePiece model")
    assert main(["inspect", str(tmp_path / "lerobot")]) == 1
    assert "- a usable tokenizer: " in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
