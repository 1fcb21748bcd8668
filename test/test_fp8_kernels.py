"""The kernels that quantize the FP8 prefill's activations where they are produced (RMSNorm -> e4m3, GeGLU -> e4m3),
under Triton's CPU interpreter, against the PyTorch reference: the shared layers, then quantize_fp8."""

import interpreted_kernels  # noqa: F401 - first: sets up Triton's interpreter
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pi_policy.model.layers import RMSNorm
from pi_policy.runtime import build_model
from pi_policy.runtime.prefill import fp8_kernels
from pi_policy.runtime.prefill.fp8 import build_fp8_prefill
from pi_policy.runtime.prefill.fp8_fused import FusedGeGLU, NormToFP8, unavailable
from pi_policy.runtime.prefill.fp8_linear import FP8Activation, fp8_scale, quantize_fp8


def e4m3_step(q: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values at each element's magnitude (2^-9 below the normal range)."""
    return torch.exp2(torch.floor(torch.log2(q.float().abs().clamp(min=2.0**-6))) - 3)


def assert_codes_match(q: torch.Tensor, ref: torch.Tensor) -> None:
    """Same e4m3 values, except where a last-bit difference in the float32 math flips a rounding: one step, rarely."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == ref.shape
    a, b = q.float(), ref.float()
    assert torch.isfinite(a).all()
    assert ((a - b).abs() <= e4m3_step(b)).all()
    assert (a == b).float().mean() >= 0.999


def rmsnorm_reference(x, weight, scale=None):
    norm = RMSNorm(x.shape[1])
    norm.weight.data = weight
    with torch.no_grad():
        y = norm(x)[0]
    s = scale if scale is not None else fp8_scale(y.abs().amax(dim=1, keepdim=True))
    return quantize_fp8(y, s), s


@pytest.fixture
def small_blocks(monkeypatch):
    """Rows wider than one load: the kernels' column loops run several times."""
    monkeypatch.setattr(fp8_kernels, "MAX_BLOCK", 64)


@pytest.mark.parametrize("wide", [False, True])
def test_rmsnorm_fp8_per_row_and_static_match_the_reference(wide, request):
    if wide:
        request.getfixturevalue("small_blocks")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 200, generator=gen) * 3
    x[4, 7] = 90.0  # an outlier row: its scale is its own
    x[9] = 0.0  # an empty row: finite scale, zeros out
    w = torch.randn(200, generator=gen) * 0.3
    q, rows = fp8_kernels.rmsnorm_fp8(x, w, 1e-6)
    ref, ref_rows = rmsnorm_reference(x, w)
    assert rows.shape == (23, 1) and torch.equal(rows, ref_rows)
    assert_codes_match(q, ref)
    assert (q[9].float() == 0).all()
    static = fp8_scale(torch.tensor(2.5))
    q, s = fp8_kernels.rmsnorm_fp8(x, w, 1e-6, static)
    assert s is static
    assert_codes_match(q, rmsnorm_reference(x, w, static)[0])  # values beyond 448 * scale saturate, as there


@pytest.mark.parametrize("wide", [False, True])
def test_geglu_fp8_per_row_and_static_match_the_reference(wide, request):
    if wide:
        request.getfixturevalue("small_blocks")
    gen = torch.Generator().manual_seed(1)
    gu = torch.randn(19, 2 * 150, generator=gen) * 2
    gu[3, 20] = 40.0
    h = F.gelu(gu[:, :150], approximate="tanh") * gu[:, 150:]  # GeGLU.forward after its gate_up projection
    q, rows = fp8_kernels.geglu_fp8(gu)
    ref_rows = fp8_scale(h.abs().amax(dim=1, keepdim=True))
    assert torch.equal(rows, ref_rows)
    assert_codes_match(q, quantize_fp8(h, ref_rows))
    static = fp8_scale(h.abs().amax() / 2)  # half the range: the largest values saturate
    q, _ = fp8_kernels.geglu_fp8(gu, static)
    assert_codes_match(q, quantize_fp8(h, static))
    with pytest.raises(ValueError, match="even number"):
        fp8_kernels.geglu_fp8(gu[:, :-1].contiguous())
    with pytest.raises(ValueError, match="row-major"):
        fp8_kernels.geglu_fp8(gu.t().contiguous().t())  # column-major


@triton.jit
def _cast(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(q_ptr + r, fp8_kernels._e4m3(tl.load(x_ptr + r, mask=r < n, other=0.0)), mask=r < n)


def test_e4m3_conversion_rounds_to_nearest_even_like_torch():
    # ties between e4m3 values, just below powers of two (the round-up carries into the exponent), subnormals
    grid = torch.tensor([2.0 ** e * (1 + m / 8) for e in range(-9, 9) for m in range(8)])
    grid = grid[grid <= 448]
    x = torch.cat([grid, grid * (1 + 1 / 16), grid * (1 - 1 / 64), grid * (1 + 1 / 32), -grid * (1 + 1 / 16),
                   torch.tensor([0.0, -0.0, 1e-4, -3e-3, 0.498, 7.906, 440.0, -448.0])]).clamp(-448, 448)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    _cast[(triton.cdiv(x.numel(), 128),)](x, q, x.numel(), BLOCK=128)
    assert torch.equal(q.float(), x.to(torch.float8_e4m3fn).float())


@pytest.fixture(scope="module")
def model():
    return build_model(preset="tiny", seed=0)


def prefix(model, seed=1):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    pad = torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    pad[0, -7:] = False
    return torch.randn(1, cfg.prefix_len, cfg.llm.width, generator=gen), pad


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("static", [False, True])
def test_fused_prefill_matches_the_unfused_one(model, static):
    embs, pad = prefix(model)
    cal = [prefix(model, 5)] if static else None
    fused = build_fp8_prefill(model, calibration=cal, fuse_producers=True)
    plain = build_fp8_prefill(model, calibration=cal, fuse_producers=False)
    blk = fused.fn.layers[0]
    assert isinstance(blk.attn_norm, NormToFP8) and isinstance(blk.mlp_norm, NormToFP8)
    assert isinstance(blk.mlp, FusedGeGLU)
    assert "4 norms and GeGLUs quantize their own output" in fused.note  # tiny: 2 layers, the last runs only K/V
    assert "quantize their own output" not in plain.note
    with torch.no_grad():
        k, v = fused.fn(embs, pad, None)
        k_ref, v_ref = plain.fn(embs, pad, None)
        k_model, _ = model.prefill(embs, pad)
    for i in range(model.cfg.llm.depth):
        # the same quantization in another place: equal up to a rare one-step flip (an error would be percents)
        assert rel(k[i], k_ref[i]) < 2e-3 and rel(v[i], v_ref[i]) < 2e-3, f"layer {i}"
        assert rel(k[i], k_model[i]) < 0.06


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-rows", "static"])
def test_fused_blocks_trace_whole_under_torch_compile(model, static):
    # on a GPU the FP8 blocks are torch.compile'd: the kernels must be single opaque ops (their fake versions give
    # the shapes) and the quantized activation must pass between them without a graph break
    embs, pad = prefix(model)
    cal = [prefix(model, 5)] if static else None
    fused = build_fp8_prefill(model, calibration=cal, fuse_producers=True, dynamic="row")
    with torch.no_grad():
        k_ref, v_ref = fused.fn(embs, pad, None)
        fused.fn.compiled = torch.nn.ModuleList(torch.compile(blk, dynamic=False, fullgraph=True, backend="aot_eager")
                                                for blk in fused.fn.layers)
        k, v = fused.fn(embs, pad, None)
    for i in range(model.cfg.llm.depth):
        assert torch.equal(k[i], k_ref[i]) and torch.equal(v[i], v_ref[i]), f"layer {i}"


def test_calibration_and_export_see_the_unquantized_activation(model):
    embs, pad = prefix(model)
    fused = build_fp8_prefill(model, fuse_producers=True)
    plain = build_fp8_prefill(model, fuse_producers=False)
    assert fused.fn.calibrate([(embs, pad)]) == plain.fn.calibrate([(embs, pad)])
    blk = fused.fn.layers[0]
    x = embs[0]
    assert isinstance(blk.attn_norm(x)[0], FP8Activation)
    blk.wqkv.exporting = True
    try:
        out = blk.attn_norm(x)[0]
    finally:
        blk.wqkv.exporting = False
    assert isinstance(out, torch.Tensor) and out.dtype == x.dtype


def test_without_the_kernels_a_separate_pass_quantizes_and_says_why(model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "needs a CUDA GPU" in unavailable(torch.device("cpu"))
    choice = build_fp8_prefill(model, fuse_producers=True)
    assert "fused FP8 activation quantization unavailable (needs a CUDA GPU (here cpu))" in choice.note
    assert not isinstance(choice.fn.layers[0].attn_norm, NormToFP8)
