"""Checkpoint folders written the way openpi and LeRobot write them, for the tests.

The weights: the peers' module tree, built from transformers' own PaliGemma and Gemma classes (so the key names
and the tied LM head are transformers', not this project's key map), saved with safetensors.torch.save_model as
both peers do. Beside them: openpi's assets/<asset_id>/norm_stats.json and conversion config.json, or LeRobot's
config.json and policy_{pre,post}processor files with their safetensors statistics, in LeRobot 0.4's layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from pi_policy.model import PiModel
from pi_policy.model.checkpoint import to_checkpoint_layout
from pi_policy.model.config import PiConfig
from pi_policy.model.normalize import NormStats, save_norm_stats


class AdaRMSNorm(nn.Module):
    """The pi0.5 expert's norm in openpi's transformers_replace (and LeRobot's PiGemma): no weight, a Dense
    layer giving scale, shift and gate from the time condition."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, 3 * width)


class Holder(nn.Module):
    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def peer_module(cfg: PiConfig, transformers_5_vision: bool = False) -> nn.Module:
    """openpi's PI0Pytorch (LeRobot's PI0Pytorch has the same tree). openpi pins transformers 4.53, whose
    SiglipVisionModel nests the tower under `vision_model`; transformers 5 does not (`transformers_5_vision`)."""
    transformers = pytest.importorskip("transformers")
    v, g, e = cfg.vision, cfg.llm, cfg.expert
    pg = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
        text_config=dict(model_type="gemma", hidden_size=g.width, intermediate_size=g.mlp_dim,
                         num_hidden_layers=g.depth, num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads,
                         head_dim=g.head_dim, vocab_size=cfg.vocab_size),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                           num_hidden_layers=v.depth, num_attention_heads=v.num_heads, image_size=v.image_size,
                           patch_size=v.patch_size, projection_dim=g.width, vision_use_head=False),
        vocab_size=cfg.vocab_size, image_token_index=cfg.vocab_size - 1, projection_dim=g.width))
    assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight, "PaliGemma's LM head should be tied"
    if not transformers_5_vision:
        pg.model.vision_tower = Holder(vision_model=pg.model.vision_tower)
    expert = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        hidden_size=e.width, intermediate_size=e.mlp_dim, num_hidden_layers=e.depth, num_attention_heads=e.num_heads,
        num_key_value_heads=e.num_kv_heads, head_dim=e.head_dim, vocab_size=cfg.vocab_size))
    expert.model.embed_tokens = None  # as both peers do: the expert reads embeddings, never tokens
    if cfg.pi05:
        for layer in expert.model.layers:
            layer.input_layernorm, layer.post_attention_layernorm = AdaRMSNorm(e.width), AdaRMSNorm(e.width)
        expert.model.norm = AdaRMSNorm(e.width)
    a, w = cfg.action_dim, e.width
    heads = {"action_in_proj": nn.Linear(a, w), "action_out_proj": nn.Linear(w, a)}
    if cfg.pi05:
        heads |= {"time_mlp_in": nn.Linear(w, w), "time_mlp_out": nn.Linear(w, w)}
    else:
        heads |= {"state_proj": nn.Linear(a, w), "action_time_mlp_in": nn.Linear(2 * w, w),
                  "action_time_mlp_out": nn.Linear(w, w)}
    return Holder(paligemma_with_expert=Holder(paligemma=pg, gemma_expert=expert), **heads)


def copy_weights(model: PiModel, peer: nn.Module, transformers_5_vision: bool = False) -> None:
    """Put `model`'s weights into the peer module; strict, so every name must exist in transformers' modules."""
    state = to_checkpoint_layout(model)
    if transformers_5_vision:
        state = {k.replace("vision_tower.vision_model.", "vision_tower."): t for k, t in state.items()}
    embed = state["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
    state["paligemma_with_expert.paligemma.lm_head.weight"] = embed
    lm_head = "paligemma_with_expert.gemma_expert.lm_head.weight"
    state[lm_head] = peer.state_dict()[lm_head]  # untied leftover of GemmaForCausalLM; unused by either peer
    peer.load_state_dict(state, strict=True)


def save_like_peer(model: PiModel, root: Path, source: str, transformers_5_vision: bool = False) -> Path:
    """root/model.safetensors as `source` ("openpi" or "lerobot") saves it; returns the file."""
    peer = peer_module(model.cfg, transformers_5_vision)
    copy_weights(model, peer, transformers_5_vision)
    if source == "lerobot":  # PI0Policy / PI05Policy keep the PI0Pytorch module as `model`
        peer = Holder(model=peer)
    root.mkdir(parents=True, exist_ok=True)
    save_model(peer, str(root / "model.safetensors"))
    return root / "model.safetensors"


def random_stats(dim: int, seed: int) -> NormStats:
    rng = np.random.default_rng(seed)
    mean, std = rng.normal(size=dim), rng.uniform(0.2, 2.0, size=dim)
    return NormStats(mean, std, mean - 2 * std, mean + 2 * std, mean - 3 * std, mean + 3 * std)


def write_openpi_dir(model: PiModel, root: Path, state_dim: int = 14, asset_id: str = "robot") -> dict:
    """What openpi's training (or its JAX->PyTorch conversion) leaves: weights, assets/<id>/norm_stats.json,
    config.json, and metadata.pt (a pickle, never to be read)."""
    save_like_peer(model, root, "openpi")
    stats = {"state": random_stats(state_dim, 1), "actions": random_stats(state_dim, 2)}
    save_norm_stats(root / "assets" / asset_id / "norm_stats.json", stats)
    cfg = model.cfg
    (root / "config.json").write_text(json.dumps({"action_dim": cfg.action_dim, "action_horizon": cfg.horizon,
                                                  "paligemma_variant": "gemma_2b",
                                                  "action_expert_variant": "gemma_300m", "precision": "float32"}))
    torch.save({"global_step": 1}, root / "metadata.pt")
    return stats


def write_lerobot_dir(model: PiModel, root: Path, state_dim: int = 14,
                      cameras: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")) -> dict:
    """What LeRobot 0.4's PreTrainedPolicy.save_pretrained and PolicyProcessorPipeline.save_pretrained leave."""
    cfg = model.cfg
    modes = {"STATE": "QUANTILES", "ACTION": "QUANTILES"} if cfg.pi05 else {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    save_like_peer(model, root, "lerobot")
    stats = {"state": random_stats(state_dim, 3), "actions": random_stats(state_dim, 4)}
    size = cfg.vision.image_size
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, size, size]} for c in cameras}
    inputs["observation.state"] = {"type": "STATE", "shape": [state_dim]}
    (root / "config.json").write_text(json.dumps({
        "type": "pi05" if cfg.pi05 else "pi0", "n_obs_steps": 1, "input_features": inputs,
        "output_features": {"action": {"type": "ACTION", "shape": [state_dim]}}, "device": "cpu", "use_amp": False,
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m", "dtype": "float32",
        "chunk_size": cfg.horizon, "n_action_steps": cfg.horizon, "max_state_dim": 32, "max_action_dim": 32,
        "num_inference_steps": cfg.num_steps, "image_resolution": [size, size],
        "normalization_mapping": {"VISUAL": "IDENTITY", **modes}, "tokenizer_max_length": cfg.max_token_len},
        indent=4))
    write_lerobot_processors(root, stats, modes, cameras, cfg.pi05, cfg.max_token_len)
    return stats


def write_lerobot_processors(root: Path, stats: dict[str, NormStats], modes: dict[str, str],
                             cameras: tuple[str, ...] = ("base_0_rgb",), pi05: bool = False, max_length: int = 48,
                             eps: float = 1e-8) -> None:
    """policy_{pre,post}processor.json and their statistics files, as PolicyProcessorPipeline.save_pretrained
    writes them: a step list, and `<pipeline>_step_<i>_<registry name>.safetensors` of `<feature>.<stat>`."""

    def flat(feature: str, s: NormStats) -> dict[str, torch.Tensor]:
        values = {k: getattr(s, k) for k in ("mean", "std", "min", "max", "q01", "q99") if getattr(s, k) is not None}
        out = {f"{feature}.{k}": torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
        out[f"{feature}.count"] = torch.tensor([1000])
        return out

    root.mkdir(parents=True, exist_ok=True)
    state_dim, action_dim = stats["state"].dim, stats["actions"].dim
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, 224, 224]} for c in cameras}
    inputs["observation.state"] = {"type": "STATE", "shape": [state_dim]}
    outputs = {"action": {"type": "ACTION", "shape": [action_dim]}}
    norm_map = {"VISUAL": "IDENTITY", **modes}
    images = {f"observation.images.{c}.{k}": torch.full((3, 1, 1), 0.5) for c in cameras for k in ("mean", "std")}
    pre_state = "policy_preprocessor_step_2_normalizer_processor.safetensors"
    save_file(flat("observation.state", stats["state"]) | flat("action", stats["actions"]) | images,
              str(root / pre_state))
    prompt_step = ({"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {"max_state_dim": 32}}
                   if pi05 else {"registry_name": "pi0_new_line_processor", "config": {}})
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": {"eps": eps, "features": inputs | outputs,
                                                             "norm_map": norm_map}, "state_file": pre_state},
        prompt_step,
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": max_length, "task_key": "task", "padding_side": "right", "padding": "max_length",
            "truncation": True, "tokenizer_name": "google/paligemma-3b-pt-224"}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_file(flat("action", stats["actions"]), str(root / post_state))
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {"eps": eps, "features": outputs,
                                                               "norm_map": norm_map}, "state_file": post_state},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    (root / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
    (root / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))
