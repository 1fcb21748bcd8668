"""The FP8 prefill exported to ONNX: checker-clean, FP8 Q/DQ present, and equal to PyTorch under onnxruntime."""

import onnx
import pytest
import torch

from pi_policy.runtime import build_model
from pi_policy.runtime.prefill.fp8 import build_fp8_prefill
from pi_policy.runtime.prefill.onnx_export import export_prefill_onnx, run_onnxruntime

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_model(preset="tiny", seed=0)
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    embs = torch.randn(1, cfg.prefix_len, cfg.llm.width, generator=g)
    pad = torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    pad[0, cfg.prefix_len - 9:] = False
    pad[0, 5:9] = False  # a missing camera's tokens in the middle
    prefill = build_fp8_prefill(model, calibration=[(embs, pad)]).fn
    path = tmp_path_factory.mktemp("onnx") / "prefill.onnx"
    info = export_prefill_onnx(prefill, path)
    return model, prefill, path, info, embs, pad


def test_checker_and_qdq_nodes(exported):
    model, _, path, info, _, _ = exported
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert info["opset"] >= 19
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 19
    fp8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    depth = model.cfg.llm.depth
    # The last layer contributes only its K/V projection: its attention output and MLP feed nothing.
    assert len(fp8_weights) == 4 * (depth - 1) + 1
    assert info["quantize_linear"] == len(fp8_weights)
    assert info["dequantize_linear"] == 2 * len(fp8_weights)
    assert [i.name for i in proto.graph.input] == ["prefix_embs", "prefix_pad"]
    assert [o.name for o in proto.graph.output] == ["k_cache", "v_cache"]


def test_onnxruntime_matches_pytorch(exported):
    _, prefill, path, info, embs, pad = exported
    k, v = run_onnxruntime(path, embs, pad)
    with torch.no_grad():
        k_ref, v_ref = prefill(embs, pad, None)
    assert list(k.shape) == info["outputs"]["k_cache"]
    # Same graph, same float32 math: only op-order rounding differs (an FP8 rounding flip would show as ~1e-2).
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)


def test_onnxruntime_with_other_inputs(exported):
    model, prefill, path, _, _, _ = exported
    cfg = model.cfg
    embs = torch.randn(1, cfg.prefix_len, cfg.llm.width, generator=torch.Generator().manual_seed(9))
    pad = torch.ones(1, cfg.prefix_len, dtype=torch.bool)
    k, v = run_onnxruntime(path, embs, pad)
    with torch.no_grad():
        k_ref, v_ref = prefill(embs, pad, None)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)


def test_export_refuses_dynamic_scales(tmp_path):
    model = build_model(preset="tiny", seed=0)
    with pytest.raises(ValueError, match="static activation scale"):
        export_prefill_onnx(build_fp8_prefill(model).fn, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_prefill_onnx(build_fp8_prefill(model).fn, tmp_path / "x.onnx", opset=17)
