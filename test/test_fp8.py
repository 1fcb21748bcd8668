"""FP8 prefill: quantization numerics, calibration, and the BF16 baseline staying bit-identical."""

import numpy as np
import pytest
import torch

from pi_policy.model.checkpoint import weights_fingerprint
from pi_policy.observation import Observation
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.prefill.calibration import load_calibration, save_calibration
from pi_policy.runtime.prefill.fp8 import build_fp8_prefill, shape_key
from pi_policy.runtime.prefill.fp8_linear import E4M3_MAX, FP8Linear, fp8_scale, quantize_fp8

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


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("scales", ["static", "row", "tensor"])
def test_scaled_mm_kernel_matches_the_simulated_numerics(per_channel, scales):
    # torch._scaled_mm also runs on a CPU: the GPU path's scale shapes and operand layout, checked against the
    # quantize-dequantize reference
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(3, 7, 64, generator=gen)
    dynamic = "tensor" if scales == "static" else scales
    sim, mm = (FP8Linear(lin, per_channel=per_channel, kernel=k, fuse_quant=False, dynamic=dynamic)
               for k in ("simulated", "scaled_mm"))
    if scales == "static":
        sim.act_scale = mm.act_scale = fp8_scale(x.abs().amax())
    with torch.no_grad():
        y, ref = mm(x), sim(x)
    assert y.shape == (3, 7, 48)
    assert rel(y, ref) < 1e-5


def test_per_row_scales_keep_small_rows_precise():
    # one token 1e5x larger than the rest: with one scale per tensor the others fall into e4m3's subnormal range
    # (below 2^-6 of the unit the scale sets), where its steps are coarse relative to the values
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, generator=gen)
    x[0] *= 1e5
    with torch.no_grad():
        ref = lin(x)[1:]
        row = FP8Linear(lin, dynamic="row")(x)[1:]
        tensor = FP8Linear(lin, dynamic="tensor")(x)[1:]
    assert rel(row, ref) < KV_REL_TOL
    assert rel(tensor, ref) > 3 * rel(row, ref)
    with pytest.raises(ValueError, match="dynamic activation scaling"):
        FP8Linear(lin, dynamic="channel")


def test_fp8_vision_close_to_the_model_which_stays_untouched(model, tmp_path):
    from pi_policy.runtime.calibrate import CalibrationSample, calibrate_fp8
    from pi_policy.runtime.vision.fp8 import build_fp8_vision

    cfg = model.cfg
    before = weights_fingerprint(model)
    gen = torch.Generator().manual_seed(3)
    s = cfg.vision.image_size
    images = torch.rand(1, cfg.num_cameras, 3, s, s, generator=gen) * 2 - 1
    vision, note = build_fp8_vision(model)
    assert "CPU: FP8 vision simulated" in note and f"{4 * cfg.vision.depth + 1}/{4 * cfg.vision.depth + 1}" in note
    with torch.no_grad():
        ref, got = model.embed_images(images), vision(images)
    assert got.shape == ref.shape
    assert 0 < rel(got, ref) < KV_REL_TOL
    embs, pad = prefix_inputs(model)
    cal = calibrate_fp8(model, [CalibrationSample(images, embs, pad)])
    assert {k for k in cal.amax if k.startswith("vision.")} == {"vision." + k for k in vision.linears()}
    assert "9 of the 9 FP8 linears of the vision tower" in cal.describe()
    path = save_calibration(tmp_path / "cal.json", cal.amax)
    from_file, _ = build_fp8_vision(model, str(path))
    from_samples, _ = build_fp8_vision(model, [images])
    with torch.no_grad():
        a, b = from_file(images), from_samples(images)
    assert torch.equal(a, b)
    assert all(lin.act_scale is not None for lin in from_file.linears().values())
    assert build_fp8_prefill(model, calibration=str(path)).fn.summary().count("5/5 with static") == 1
    with pytest.raises(ValueError, match="no scales for the vision tower"):
        build_fp8_vision(model, {k: v for k, v in cal.amax.items() if not k.startswith("vision.")})
    with pytest.raises(ValueError, match="unknown vision linear"):
        build_fp8_vision(model, keep_bf16=("wqkv",))
    assert weights_fingerprint(model) == before


def test_runner_with_fp8_vision_leaves_the_baseline_bit_identical():
    model = build_model(preset="tiny", seed=0)
    base = build_runner(model=model, progress=False)
    rng = np.random.default_rng(1)
    obs = Observation(images={c: rng.integers(0, 256, (60, 50, 3), dtype=np.uint8) for c in base.camera_names},
                      state=rng.normal(size=8).astype(np.float32), prompt="pick up the cube")
    noise = rng.standard_normal((model.cfg.horizon, model.cfg.action_dim)).astype(np.float32)
    first = base.infer(obs, noise).actions.copy()
    fp8 = build_runner(model=model, vision="fp8", backend="fp8", progress=False)
    out = fp8.infer(obs, noise)
    assert out.latency.backends["vision"] == "fp8-eager" and out.latency.backends["prefill"] == "fp8-eager"
    assert "FP8 vision simulated" in fp8.backend_note
    assert not np.array_equal(out.actions, first)
    assert np.array_equal(base.infer(obs, noise).actions, first)
    with pytest.raises(ValueError, match="vision_backend 'int8' is not one of bf16, fp8"):
        build_runner(model=model, vision="int8", progress=False)


def test_fp8_vision_and_calibration_are_node_parameters():
    from pi_policy.node.params import ParamError, params_from_dict

    base = {"joint_names": ["j1"], "preset": "tiny"}
    spec = params_from_dict(base | {"backend": "fp8", "vision_backend": "fp8",
                                    "fp8_calibration": "/opt/calib.json"}).runner_spec()
    assert spec.vision == "fp8" and spec.fp8.calibration == "/opt/calib.json"
    assert params_from_dict(base).runner_spec().fp8.calibration is None
    with pytest.raises(ParamError, match="vision_backend 'int8' is not one of bf16, fp8"):
        params_from_dict(base | {"vision_backend": "int8"})
    with pytest.raises(ParamError, match="fp8_calibration is set, but neither backend nor vision_backend is fp8"):
        params_from_dict(base | {"fp8_calibration": "/opt/calib.json"})


@pytest.mark.parametrize("dynamic", ["row", "tensor"])
def test_batched_fp8_rows_are_each_robots_own(dynamic):
    # with a scale per token a robot's chunk does not depend on what the others in its batch see; with one scale per
    # tensor it does (the brightest robot sets everyone's scale)
    from pi_policy.runtime.spec import FP8Options

    model = build_model(preset="tiny", seed=0)
    runner = build_runner(model=model, vision="fp8", backend="fp8", fp8=FP8Options(dynamic=dynamic),
                          batch_sizes=(1, 2), progress=False)
    rng = np.random.default_rng(2)

    def obs(scale):
        return Observation(images={c: (rng.integers(0, 256, (56, 56, 3)) * scale).astype(np.uint8)
                                   for c in runner.camera_names},
                           state=rng.normal(size=8).astype(np.float32) * scale, prompt="pick up the cube")

    dim, bright = obs(0.05), obs(1.0)
    noise = rng.standard_normal((model.cfg.horizon, model.cfg.action_dim)).astype(np.float32)
    alone = runner.infer(dim, noise).actions
    together = runner.infer_batch([dim, bright], [noise, noise])[0].actions
    err = rel(torch.from_numpy(together), torch.from_numpy(alone))
    assert err < 1e-5 if dynamic == "row" else err > 1e-4
