"""TensorRT engine metadata: a mismatch is refused with a clear reason; the backend falls back visibly."""

import json

import pytest

from pi_policy.runtime import build_model
from pi_policy.runtime.prefill.tensorrt import (
    META_FORMAT,
    EngineMismatch,
    check_engine_meta,
    expected_shapes,
    load_tensorrt_prefill,
    meta_path,
    read_meta,
)


def meta(**over):
    base = {"format": META_FORMAT, "gpu_name": "NVIDIA Thor", "compute_capability": "11.0",
            "tensorrt_version": "10.13.3", "checkpoint": "sha256:abc", "llm_weights": "f00d", "preset": "pi0",
            "dtype": "bfloat16", "shapes": {"prefix_embs": [1, 816, 2048]}, "layers_compiled": "18/18"}
    return {**base, **over}


def running(**over):
    m = meta(**over)
    m.pop("format")
    m.pop("layers_compiled")
    return m


def test_matching_engine_accepted():
    assert check_engine_meta(meta(), running()) == []


@pytest.mark.parametrize("key, value, words", [
    ("gpu_name", "NVIDIA H100 80GB HBM3", "GPU"),
    ("compute_capability", "9.0", "compute capability"),
    ("tensorrt_version", "10.8.0", "TensorRT version"),
    ("checkpoint", "sha256:def", "checkpoint"),
    ("llm_weights", "beef", "LLM weights"),
    ("shapes", {"prefix_embs": [1, 968, 2048]}, "shapes"),
])
def test_each_mismatch_named(key, value, words):
    reasons = check_engine_meta(meta(), running(**{key: value}))
    assert len(reasons) == 1
    assert words in reasons[0] and repr(value) in reasons[0]


def test_partial_or_foreign_engine_refused():
    assert "not all" in check_engine_meta(meta(layers_compiled="17/18"), running())[0]
    assert "format" in check_engine_meta(meta(format="something-else"), running())[0]


def test_missing_or_broken_sidecar(tmp_path):
    engine = tmp_path / "prefill.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(EngineMismatch, match="metadata .* is missing"):
        read_meta(engine)
    meta_path(engine).write_text("{not json")
    with pytest.raises(EngineMismatch, match="not valid JSON"):
        read_meta(engine)
    meta_path(engine).write_text(json.dumps(meta()))
    assert read_meta(engine)["layers_compiled"] == "18/18"


def test_shapes_of_pi0():
    shapes = expected_shapes(build_model(preset="tiny"))
    assert shapes["k_cache"] == shapes["v_cache"] and len(shapes["k_cache"]) == 5


def test_fallback_is_visible_and_strict_raises(tmp_path):
    model = build_model(preset="tiny")
    choice = load_tensorrt_prefill(model, str(tmp_path / "missing.engine"), None)
    assert choice.fn is None and choice.impl == "torch" and "needs a CUDA device" in choice.note
    with pytest.raises(EngineMismatch):
        load_tensorrt_prefill(model, None, None, strict=True)


def test_engine_runtime_needs_tensorrt():
    pytest.importorskip("tensorrt", reason="tensorrt is not installed here: engine build/run is tested on Thor/H100")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from pi_policy.runtime.prefill.tensorrt import import_tensorrt

    assert hasattr(import_tensorrt(), "Builder")
