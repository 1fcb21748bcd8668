"""The staged model: composition, pi0 joint attention, masks for missing cameras, reproducibility."""

import math

import pytest
import torch

from pi_policy.model import PiModel, get_config, init_random
from pi_policy.model.pi0 import cast_for_inference, euler_times, time_embedding


def inputs(cfg, seed=0, cameras=(True, True, False), prompt_len=5):
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.rand(1, cfg.num_cameras, 3, s, s, generator=g) * 2 - 1
    image_masks = torch.tensor([cameras])
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_token_len), generator=g)
    token_masks = torch.arange(cfg.max_token_len)[None] < prompt_len
    state = torch.randn(1, cfg.action_dim, generator=g)
    noise = torch.randn(1, cfg.horizon, cfg.action_dim, generator=g)
    return images, image_masks, tokens, token_masks, state, noise


def joint_reference_velocity(model, embs, pad, x_t, t, state):
    """pi0's joint attention written out directly: one pass over [prefix, suffix] per layer, prefix through
    the LLM's weights and suffix through the expert's, with openpi's cumulative-block mask and positions."""
    cfg = model.cfg
    with torch.no_grad():
        # Suffix embedding through the model's own velocity pieces, to isolate attention/caching.
        tokens = model.action_in(x_t)
        t_emb = time_embedding(t, cfg.expert.width)
        cond = None
        if cfg.pi05:
            cond = torch.nn.functional.silu(model.time_out(torch.nn.functional.silu(model.time_in(t_emb))))
        else:
            at = torch.cat([tokens, t_emb[:, None].expand_as(tokens)], -1)
            tokens = model.action_time_out(torch.nn.functional.silu(model.action_time_in(at)))
            tokens = torch.cat([model.state_proj(state)[:, None], tokens], 1)
        s = tokens.shape[1]
        ar = [0] * pad.shape[1] + ([1] if not cfg.pi05 else []) + [1] + [0] * (cfg.horizon - 1)
        full_pad = torch.cat([pad, torch.ones(1, s, dtype=torch.bool)], 1)
        cum = torch.cumsum(torch.tensor(ar), 0)
        mask = (cum[None, :] <= cum[:, None])[None] & full_pad[:, None, :] & full_pad[:, :, None]
        mask |= torch.eye(mask.shape[-1], dtype=torch.bool)  # padded rows: keep finite (as the model does)
        positions = torch.cumsum(full_pad.long(), 1) - 1
        from pi_policy.model.layers import rope_cos_sin

        cos, sin = rope_cos_sin(positions, cfg.llm.head_dim, cfg.llm.rope_base)
        p = pad.shape[1]
        xp, xs = embs, tokens
        for lp, ls in zip(model.llm.layers, model.expert.layers, strict=True):
            qp, kp, vp, gp = lp.qkv(xp, cos[:, :p], sin[:, :p], None)
            qs, ks, vs, gs = ls.qkv(xs, cos[:, p:], sin[:, p:], cond)
            q, k, v = (torch.cat(z, 2) for z in ((qp, qs), (kp, ks), (vp, vs)))
            k, v = k.repeat_interleave(q.shape[1], 1), v.repeat_interleave(q.shape[1], 1)
            scores = (q @ k.transpose(-1, -2)) / cfg.llm.head_dim**0.5
            att = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ v
            xp, xs = lp.finish(xp, att[:, :, :p], gp, None), ls.finish(xs, att[:, :, p:], gs, cond)
        out, _ = model.expert.norm(xs, cond)
        return model.action_out(out[:, -cfg.horizon:])


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
def test_cached_denoise_equals_joint_attention(preset):
    cfg = get_config(preset)
    model = init_random(PiModel(cfg), 3).eval()
    images, im, tok, tm, state, noise = inputs(cfg)
    with torch.no_grad():
        embs, pad = model.embed_prefix(model.embed_images(images), im, tok, tm)
        cache = model.prefill(embs, pad)
        mask, cos, sin = model.suffix_attention(pad)
        t = torch.tensor([0.7])
        got = model.velocity(noise, t, state, cache, mask, cos, sin)
    expected = joint_reference_velocity(model, embs, pad, noise, t, state)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
def test_sample_actions_is_the_composition_of_stages_and_reproducible(preset):
    cfg = get_config(preset)
    model = init_random(PiModel(cfg)).eval()
    args = inputs(cfg)
    a = model.sample_actions(*args)
    b = model.sample_actions(*args)
    assert a.shape == (1, cfg.horizon, cfg.action_dim) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    images, im, tok, tm, state, noise = args
    with torch.no_grad():
        embs, pad = model.embed_prefix(model.embed_images(images), im, tok, tm)
        assert embs.shape == (1, cfg.prefix_len, cfg.llm.width) and pad.shape == (1, cfg.prefix_len)
        cache = model.prefill(embs, pad)
        assert cache[0].shape == (cfg.llm.depth, 1, cfg.llm.num_kv_heads, cfg.prefix_len, cfg.llm.head_dim)
        staged = model.denoise(cache, pad, state, noise)
    assert torch.equal(a, staged)
    other = model.sample_actions(images, im, tok, tm, state, torch.randn_like(noise))
    assert not torch.allclose(a, other)


def test_masked_camera_and_padding_do_not_leak():
    """What sits in a masked camera slot or in padded prompt positions must not change the actions."""
    cfg = get_config("tiny")
    model = init_random(PiModel(cfg)).eval()
    images, im, tok, tm, state, noise = inputs(cfg, cameras=(True, False, True))
    a = model.sample_actions(images, im, tok, tm, state, noise)
    images2, tok2 = images.clone(), tok.clone()
    images2[:, 1] = torch.rand_like(images2[:, 1])
    tok2[~tm] = (tok2[~tm] + 7) % cfg.vocab_size
    b = model.sample_actions(images2, im, tok2, tm, state, noise)
    assert (a - b).abs().max().item() < 1e-5
    images2[:, 0] = torch.rand_like(images2[:, 0])  # a visible camera does matter
    c = model.sample_actions(images2, im, tok2, tm, state, noise)
    assert (a - c).abs().max().item() > 1e-4


def test_full_size_presets_have_the_published_shapes():
    pi0, pi05 = get_config("pi0"), get_config("pi05")
    assert pi0.prefix_len == 3 * 256 + 48 and pi05.max_token_len == 200
    assert (pi0.llm.width, pi0.llm.depth, pi0.llm.mlp_dim, pi0.llm.num_heads, pi0.llm.num_kv_heads,
            pi0.llm.head_dim) == (2048, 18, 16384, 8, 1, 256)
    assert (pi0.expert.width, pi0.expert.mlp_dim) == (1024, 4096)
    assert (pi0.vision.width, pi0.vision.depth, pi0.vision.mlp_dim, pi0.vision.num_tokens) == (1152, 27, 4304, 256)
    assert pi0.suffix_len == 51 and pi05.suffix_len == 50
    with torch.device("meta"):
        n = sum(p.numel() for p in PiModel(pi0).parameters())
    assert 3.2e9 < n < 3.6e9  # pi0 is a ~3.3B-parameter model
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("pi1")


def test_time_embedding_and_steps_are_the_peers():
    """openpi's create_sinusoidal_pos_embedding (LeRobot's is a copy) in float64, cast to float32; and the float32
    times its sampling loop visits (time = 1.0; time += dt)."""
    t = torch.tensor([1.0, 0.9, 0.3, 0.0999999, 0.0], dtype=torch.float32)
    fraction = torch.linspace(0.0, 1.0, 512, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    sin_input = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    peers = torch.cat([torch.sin(sin_input), torch.cos(sin_input)], dim=1).type(torch.float32)
    assert torch.equal(time_embedding(t, 1024), peers)
    float32 = torch.cat([(sin_input.float()).sin(), (sin_input.float()).cos()], dim=1)
    assert (float32 - peers).abs().max() > 1e-5  # what computing it in float32 would get wrong

    dt, time, times = torch.tensor(-0.1, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32), []
    while time >= -dt / 2:
        times.append(time.item())
        time += dt
    assert euler_times(10) == (dt.item(), times)


def test_bfloat16_weights_keep_the_float64_time_embedding():
    """A time-frequency buffer would be rounded to bfloat16 by model.to(): a phase error of radians at t = 1."""
    half = cast_for_inference(init_random(PiModel(get_config("tiny05"))), torch.bfloat16)
    assert [name for name, b in half.named_buffers() if b.is_floating_point()] == []
