"""The fused action expert's Triton kernels, under Triton's CPU interpreter, against the PyTorch reference layers."""


import pytest
import torch
import torch.nn.functional as F
from interpreted_kernels import few_programs  # noqa: F401 - first: sets up Triton's interpreter

from pi_policy.model import PiModel, get_config, init_random
from pi_policy.model.gemma import GemmaBlock
from pi_policy.model.layers import RMSNorm, attention
from pi_policy.runtime.expert import kernels
from pi_policy.runtime.expert.fused import FusedExpert, dequantize, pack
from pi_policy.runtime.prefill.fp8_linear import FP8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def expert_model(preset: str, steps: int = 2) -> PiModel:
    """Random weights; pi0.5's gates pushed to ~1 so that its layers matter (random init leaves them ~0)."""
    model = init_random(PiModel(get_config(preset, num_steps=steps)), 3).eval()
    if model.cfg.pi05:
        with torch.no_grad():
            w = model.cfg.expert.width
            for m in model.expert.modules():
                if isinstance(m, RMSNorm) and m.dense is not None:
                    m.dense.bias[2 * w:] = 1.0
                    m.dense.bias[:w] = 0.1
    return model


def prefix(model: PiModel, missing: tuple[int, int] | None = (16, 32), seed: int = 0, batch: int = 1):
    """The LLM's cache over random embeddings, with a masked camera and prompt padding (invalid keys in the middle);
    a second batch entry has neither."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    pad = torch.ones(batch, cfg.prefix_len, dtype=torch.bool)
    if missing:
        pad[0, missing[0]:missing[1]] = False
    pad[0, -7:] = False
    with torch.no_grad():
        cache = model.prefill(torch.randn(batch, cfg.prefix_len, cfg.llm.width, generator=gen), pad)
    state = torch.randn(batch, cfg.action_dim, generator=gen)
    noise = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=gen)
    return cache, pad, state, noise


@pytest.mark.parametrize("fp8", [False, True])
def test_splitk_linear_with_norm_statistics_matches_torch(fp8):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 48, generator=gen), torch.randn(80, 48, generator=gen) * 0.1
    mod, gate = 1 + 0.1 * torch.randn(48, generator=gen), torch.randn(80, generator=gen)
    wk, scale = pack(w, None, fp8)
    out, ss = torch.full((37, 80), 0.5), torch.zeros(37)
    kernels.linear_splitk(x, wk, out, wscale=scale, mod=mod, ss=ss, tiles=dict(bn=32, bk=16, split=2, warps=4,
                                                                                   stages=1))
    ref = 0.5 + (x * mod) @ dequantize(wk, scale).T
    assert rel(out, ref) < 1e-5 and torch.allclose(ss, x.pow(2).sum(-1), rtol=1e-5)
    a = torch.randn(37, 48, generator=gen).bfloat16()
    out = torch.zeros(37, 80)
    kernels.linear_splitk(a, wk, out, wscale=scale, gate=gate, tiles=dict(bn=16, bk=16, split=3, warps=4, stages=1))
    assert rel(out, (a.float() @ dequantize(wk, scale).T) * gate) < 1e-5


@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_geglu_matches_the_reference_norm_and_mlp(adaptive):
    cfg = get_config("tiny05" if adaptive else "tiny").expert
    blk = init_random_block(cfg, adaptive)
    x = torch.randn(45, cfg.width)
    cond = torch.randn(1, cfg.width) if adaptive else None
    h_ref, _ = blk.mlp_norm(x[None], cond)
    gate, up = blk.mlp.gate_up(h_ref).chunk(2, dim=-1)
    ref = F.gelu(gate, approximate="tanh") * up
    wk, _ = pack(blk.mlp.gate_up.weight, None if adaptive else blk.mlp_norm.weight, False)
    mod = bias = None
    if adaptive:
        scale, shift, _ = blk.mlp_norm.dense(cond).float().chunk(3, dim=-1)
        mod, bias = (1 + scale)[0], (shift @ wk.float().T)[0]
    h = torch.empty(45, cfg.mlp_dim, dtype=torch.bfloat16)
    kernels.norm_geglu(x, wk, h, cfg.eps, mod=mod, bias=bias, tiles=dict(bn=16, bk=16, warps=4, stages=1))
    assert rel(h, ref[0]) < 1e-2 and cosine(h, ref[0]) > 0.9999


def init_random_block(cfg, adaptive: bool) -> GemmaBlock:
    torch.manual_seed(1)
    blk = GemmaBlock(cfg, cfg.width if adaptive else None)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)
    return blk


@pytest.mark.parametrize("adaptive", [False, True])
def test_qkv_and_attention_match_the_reference_block(adaptive):
    """qkv projection (split-K, sums of squares) -> attention over [cache with holes, block-causal suffix] -> the
    combine, against GemmaBlock.qkv + layers.attention with pi0's mask."""
    model = expert_model("tiny05" if adaptive else "tiny")
    cfg, e = model.cfg, model.cfg.expert
    blk = model.expert.layers[0]
    cache, pad, _, _ = prefix(model)
    mask, cos, sin = model.suffix_attention(pad)
    s = cfg.suffix_len
    x = torch.randn(1, s, e.width)
    cond = torch.randn(1, e.width) if adaptive else None
    q, k, v, _ = blk.qkv(x, cos, sin, cond)
    ref = attention(q, torch.cat([cache[0][0], k], 2), torch.cat([cache[1][0], v], 2), mask)
    ref = ref.transpose(1, 2).reshape(s, -1)

    wk, _ = pack(blk.wqkv.weight, None if adaptive else blk.attn_norm.weight, False)
    mod = bias = None
    if adaptive:
        scale, shift, _ = blk.attn_norm.dense(cond).float().chunk(3, dim=-1)
        mod, bias = (1 + scale)[0], (shift @ wk.float().T)[0]
    qkv, ss = torch.zeros(s, wk.shape[0]), torch.zeros(s)
    kernels.linear_splitk(x[0], wk, qkv, mod=mod, ss=ss)
    out = torch.empty(s, e.num_heads * e.head_dim, dtype=torch.bfloat16)
    kernels.attention(qkv, ss, cache[0][0], cache[1][0], pad.to(torch.int8), cos[0], sin[0], out,
                      num_heads=e.num_heads, n_state=s - cfg.horizon, norm_dim=e.width, eps=e.eps, bias=bias,
                      tiles=dict(bm=32, bn=16, bs=16, chunk=32, warps=4, stages=1, tokens=64))
    assert rel(out, ref) < 1e-2 and cosine(out, ref) > 0.9999
    assert not qkv.any() and not ss.any()  # cleared for the next layer


def test_action_out_is_the_final_norm_projection_and_an_euler_step():
    model = expert_model("tiny")
    cfg = model.cfg
    x = torch.randn(2 * cfg.suffix_len, cfg.expert.width)
    xt = torch.randn(2, cfg.horizon, cfg.action_dim)
    h, _ = model.expert.norm(x.view(2, cfg.suffix_len, -1))
    expected = xt - 0.1 * model.action_out(h[:, -cfg.horizon:])
    w, _ = pack(model.action_out.weight, model.expert.norm.weight, False)
    kernels.action_out(x, w, model.action_out.bias.float(), xt, cfg.expert.eps, -0.1)
    assert rel(xt, expected) < 1e-2


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
def test_fused_velocity_matches_the_model(preset):
    model = expert_model(preset)
    cache, pad, state, noise = prefix(model)
    mask, cos, sin = model.suffix_attention(pad)
    t = torch.full((1,), 0.7)
    with torch.no_grad():
        ref = model.velocity(noise, t, state, cache, mask, cos, sin)
    got = FusedExpert(model).velocity(noise, t, state, cache, mask, cos, sin)
    assert rel(got, ref) < 1e-2 and cosine(got, ref) > 0.9999


@pytest.mark.parametrize("preset, missing, batch", [("tiny", None, 1), ("tiny05", (0, 16), 2)])
def test_fused_denoise_matches_the_model(preset, missing, batch):
    model = expert_model(preset)
    cache, pad, state, noise = prefix(model, missing, batch=batch)
    with torch.no_grad():
        ref = model.denoise(cache, pad, state, noise)
    got = FusedExpert(model).denoise(cache, pad, state, noise)
    assert rel(got, ref) < 5e-3 and cosine(got, ref) > 0.9999


def test_fp8_weights_round_trip_and_the_fp8_expert_matches_its_dequantized_math():
    model = expert_model("tiny")
    w = model.expert.layers[0].mlp.down.weight
    w8, scale = pack(w, None, True)
    assert w8.dtype == FP8 and scale.shape == (w.shape[0],)
    assert rel(dequantize(w8, scale), w) < 0.05  # e4m3: 3 mantissa bits
    assert (dequantize(w8, scale).abs().amax(1) - w.abs().amax(1)).abs().max() < 1e-6 + 0.01 * w.abs().max()

    cache, pad, state, noise = prefix(model)
    exact = FusedExpert(model).denoise(cache, pad, state, noise)
    fp8 = FusedExpert(model, "fp8")
    got = fp8.denoise(cache, pad, state, noise)
    # the same math in PyTorch, on a model whose expert weights are the dequantized FP8 ones
    for blk, packed in zip(model.expert.layers, fp8.layers, strict=True):
        with torch.no_grad():
            blk.wqkv.weight.copy_(dequantize(*packed["qkv"]) / (1 + blk.attn_norm.weight)[None])
            blk.wo.weight.copy_(dequantize(*packed["wo"]))
            blk.mlp.gate_up.weight.copy_(dequantize(*packed["gate_up"]) / (1 + blk.mlp_norm.weight)[None])
            blk.mlp.down.weight.copy_(dequantize(*packed["down"]))
    with torch.no_grad():
        ref = model.denoise(cache, pad, state, noise)
    assert rel(got, ref) < 5e-3 and 0 < rel(got, exact) < 0.05
