"""Our SigLIP tower and Gemma stack against transformers' implementations, with the same random weights."""

import math

import pytest
import torch

from pi_policy.model import PiModel, get_config
from pi_policy.model.checkpoint import PG, key_map
from pi_policy.model.layers import rope_cos_sin
from pi_policy.model.siglip import SiglipVision

transformers = pytest.importorskip("transformers")


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def load_from_hf(dst_module: torch.nn.Module, dst_prefix: str, hf_state: dict, src_prefix: str, cfg) -> None:
    """Copy through the checkpoint key map, so the map itself is under test."""
    params = dict(dst_module.named_parameters())
    n = 0
    with torch.no_grad():
        for dst, entry in key_map(cfg).items():
            if not dst.startswith(dst_prefix):
                continue
            parts = [hf_state[k[len(src_prefix):]] for k in entry.sources]
            params[dst[len(dst_prefix):]].copy_(torch.cat(parts, 0))
            n += 1
    assert n == len(params), f"mapped {n} of {len(params)} parameters"


def test_siglip_matches_transformers():
    cfg = get_config("tiny")
    v = cfg.vision
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.eps, hidden_act="gelu_pytorch_tanh",
        vision_use_head=False)
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    randomize(hf, 1)
    ours = SiglipVision(v).eval()
    # Older transformers prefix the tower's keys with "vision_model."; newer ones do not.
    state = {k.removeprefix("vision_model."): t for k, t in hf.state_dict().items()}
    load_from_hf(ours, "vision.", state, PG + "vision_tower.vision_model.", cfg)
    images = torch.rand(2, 3, v.image_size, v.image_size) * 2 - 1
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state
        got = ours(images)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("stack", ["llm", "expert"])
def test_gemma_stack_matches_transformers(stack):
    cfg = get_config("tiny")
    g = getattr(cfg, stack)
    hf_cfg = transformers.GemmaConfig(
        vocab_size=cfg.vocab_size, hidden_size=g.width, intermediate_size=g.mlp_dim, num_hidden_layers=g.depth,
        num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads, head_dim=g.head_dim,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=g.eps, attn_implementation="eager")
    hf = transformers.GemmaModel(hf_cfg).eval()
    randomize(hf, 2)
    model = PiModel(cfg).eval()
    src_prefix = PG + "language_model." if stack == "llm" else "paligemma_with_expert.gemma_expert.model."
    load_from_hf(getattr(model, stack), stack + ".", hf.state_dict(), src_prefix, cfg)

    t = 12
    ids = torch.randint(0, cfg.vocab_size, (2, t))
    positions = torch.arange(t)[None].repeat(2, 1) + torch.tensor([[0], [5]])  # non-trivial offsets
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=positions).last_hidden_state
        h = hf.embed_tokens.weight[ids] * math.sqrt(g.width)  # Gemma scales token embeddings by sqrt(width)
        cos, sin = rope_cos_sin(positions, g.head_dim, g.rope_base)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None].repeat(2, 1, 1)
        for layer in getattr(model, stack).layers:
            h, _, _ = layer(h, cos, sin, causal)
        got, _ = getattr(model, stack).norm(h)
    assert (got - expected).abs().max().item() < 1e-5
