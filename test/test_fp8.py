"""FP8 prefill: quantization numerics, calibration, and the BF16 baseline staying bit-identical."""

import numpy as np
import pytest
import torch

from pi_policy.model.checkpoint import weights_fingerprint
from pi_policy.observation import Observation
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.prefill.calibration import load_calibration, save_calibration
from pi_policy.runtime.prefill.fp8 import E4M3_MAX, FP8Linear, build_fp8_prefill, fp8_scale, quantize_fp8, shape_key

# e4m3 keeps 3 mantissa bits: each operand is rounded by up to 1/16 relative (RMS about 2.7%), so a dot
# product of rounded activations and weights is off by about 4% RMS. 6% leaves room without hiding a bug
# (a wrong scale, transpose or RoPE gives errors of order 100%).
KV_REL_TOL = 0.06


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def model():
    return build_model(preset="tiny", seed=0)


def prefix_inputs(model, seed=1, valid=None):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    embs = torch.randn(1, cfg.prefix_len, cfg.llm.width, generator=g)
    pad = torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    pad[0, valid or cfg.prefix_len - 7:] = False
    return embs, pad


def test_scale_is_bf16_exact_and_never_overflows():
    for amax in (1e-4, 0.3, 1.0, 7.77, 448.0, 1e5):
        s = fp8_scale(torch.tensor(amax))
        assert s.to(torch.bfloat16).float() == s
        assert amax / float(s) <= E4M3_MAX


def test_quantize_saturates_instead_of_nan():
    q = quantize_fp8(torch.tensor([1e6, -1e6, 0.5]), torch.tensor(1.0))
    assert torch.isfinite(q.float()).all()
    assert q.float().tolist() == [448.0, -448.0, 0.5]


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_linear_close_to_float(per_channel):
    lin = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(5, 7, 64)
    q = FP8Linear(lin, per_channel=per_channel)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    assert rel(y, ref) < KV_REL_TOL
    assert q.weight.dtype == torch.float8_e4m3fn


def test_simulated_prefill_within_tolerance(model):
    embs, pad = prefix_inputs(model)
    with torch.no_grad():
        k_ref, v_ref = model.prefill(embs, pad)
        k, v = build_fp8_prefill(model).fn(embs, pad, None)
    for i in range(model.cfg.llm.depth):
        assert rel(k[i], k_ref[i]) < KV_REL_TOL, f"layer {i} K"
        assert rel(v[i], v_ref[i]) < KV_REL_TOL, f"layer {i} V"


def test_fp8_writes_the_runner_cache_in_place(model):
    embs, pad = prefix_inputs(model)
    shape = (model.cfg.llm.depth, 1, model.cfg.llm.num_kv_heads, model.cfg.prefix_len, model.cfg.llm.head_dim)
    kv = (torch.zeros(shape), torch.zeros(shape))
    ptrs = [t.data_ptr() for t in kv]
    with torch.no_grad():
        build_fp8_prefill(model).fn(embs, pad, kv)
    assert [t.data_ptr() for t in kv] == ptrs
    assert kv[0].abs().sum() > 0 and kv[1].abs().sum() > 0


def test_static_calibration_roundtrip(model, tmp_path):
    embs, pad = prefix_inputs(model)
    choice = build_fp8_prefill(model, calibration=[(embs, pad)])
    lins = choice.fn.linears()
    assert len(lins) == 4 * model.cfg.llm.depth
    static = {name for name, lin in lins.items() if lin.act_scale is not None}
    assert {f"layers.{i}.wqkv" for i in range(model.cfg.llm.depth)} <= static
    amax = {name: float(lins[name].act_scale) * E4M3_MAX for name in static}
    path = save_calibration(tmp_path / "cal.json", amax)
    assert load_calibration(path) == amax
    again = build_fp8_prefill(model, calibration=str(path))
    with torch.no_grad():
        a, b = choice.fn(embs, pad, None), again.fn(embs, pad, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="does not fit"):
        build_fp8_prefill(model, calibration={"layers.99.wqkv": 1.0})
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an FP8 calibration file"):
        load_calibration(bad)


def test_decisions_keep_losing_shapes_in_bf16(model):
    cfg = model.cfg
    down = shape_key(cfg.prefix_len, cfg.llm.mlp_dim, cfg.llm.width)
    choice = build_fp8_prefill(model, decisions={down: False})
    names = choice.fn.linears()
    assert not any(name.endswith("mlp.down") for name in names)
    assert len(names) == 3 * cfg.llm.depth
    assert choice.fn.layers[0].mlp.down is model.llm.layers[0].mlp.down  # shared, read-only


def test_scaled_mm_refused_without_fp8_gpu(model):
    with pytest.raises(RuntimeError, match="compute capability"):
        build_fp8_prefill(model, kernel="scaled_mm")


def test_bf16_then_fp8_then_bf16_is_bit_identical():
    model = build_model(preset="tiny", seed=0)
    before = weights_fingerprint(model)
    base = build_runner(model=model, progress=False)
    rng = np.random.default_rng(0)
    obs = Observation(images={c: rng.integers(0, 256, (60, 50, 3), dtype=np.uint8) for c in base.camera_names},
                      state=rng.normal(size=8).astype(np.float32), prompt="pick up the cube")
    noise = rng.standard_normal((model.cfg.horizon, model.cfg.action_dim)).astype(np.float32)
    first = base.infer(obs, noise).actions.copy()
    kv_first = [t.clone() for t in base.buf.kv]
    fp8 = build_runner(model=model, backend="fp8", progress=False)  # the same model instance, on purpose
    out = fp8.infer(obs, noise)
    assert out.latency.backends["prefill"].startswith("fp8")
    assert not np.array_equal(out.actions, first)  # the candidate really ran something else
    again = base.infer(obs, noise).actions
    assert np.array_equal(first, again)
    assert all(torch.equal(a, b) for a, b in zip(kv_first, base.buf.kv, strict=True))
    assert weights_fingerprint(model) == before
