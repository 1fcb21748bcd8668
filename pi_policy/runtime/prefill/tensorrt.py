"""TensorRT prefill: build a strongly typed engine from the FP8 ONNX graph, check its metadata, run it in place.

The only module that imports tensorrt, and only inside functions. An engine is bound to the GPU,
TensorRT version and weights it was built from; its JSON sidecar records them and
`check_engine_meta` (plain Python, testable anywhere) refuses any mismatch with a reason.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pi_policy.model.checkpoint import file_fingerprint, weights_fingerprint
from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.choice import TORCH, Implementation

log = logging.getLogger(__name__)

META_FORMAT = "pi_policy.trt_prefill.v1"
TORCH_TO_TRT = {torch.bfloat16: "BF16", torch.float16: "HALF", torch.float32: "FLOAT", torch.bool: "BOOL"}


class EngineMismatch(RuntimeError):
    """An engine built for another GPU, TensorRT version, checkpoint or shape."""


def meta_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def weights_tag(checkpoint: str | None, seed: int | None = None) -> str:
    """What the engine's weights came from: the checkpoint's sha256, or the random-init seed."""
    if checkpoint:
        return "sha256:" + file_fingerprint(checkpoint)
    return f"random-seed-{seed}" if seed is not None else "random-seed-unknown"


def expected_shapes(model: PiModel, batch: int = 1) -> dict[str, list[int]]:
    cfg = model.cfg
    g = cfg.llm
    kv = [g.depth, batch, g.num_kv_heads, cfg.prefix_len, g.head_dim]
    return {"prefix_embs": [batch, cfg.prefix_len, g.width], "prefix_pad": [batch, cfg.prefix_len],
            "k_cache": kv, "v_cache": kv}


def gpu_identity(device: torch.device | None = None) -> dict[str, str]:
    device = device or torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu_name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def engine_meta(model: PiModel, *, gpu: dict[str, str], tensorrt_version: str, checkpoint_tag: str,
                onnx_info: dict, layers_compiled: int, build_s: float) -> dict:
    """The sidecar written next to an engine."""
    return {"format": META_FORMAT, **gpu, "tensorrt_version": tensorrt_version, "checkpoint": checkpoint_tag,
            "llm_weights": weights_fingerprint(model.llm), "preset": model.cfg.name,
            "dtype": str(model.dtype).removeprefix("torch."), "shapes": expected_shapes(model),
            "layers_compiled": f"{layers_compiled}/{model.cfg.llm.depth}",
            "quantization": onnx_info.get("metadata", {}).get("quantization", ""),
            "onnx_sha256": onnx_info.get("sha256", ""), "build_s": round(build_s, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_engine_meta(meta: dict, expected: dict) -> list[str]:
    """Every reason the engine described by `meta` cannot serve `expected` (empty: it fits).

    `expected` holds what is running now: gpu_name, compute_capability, tensorrt_version, checkpoint,
    llm_weights (optional), preset, dtype, shapes. Keys absent from `expected` are not checked.
    """
    if meta.get("format") != META_FORMAT:
        return [f"metadata format is {meta.get('format')!r}, expected {META_FORMAT!r} (rebuild the engine)"]
    labels = {"gpu_name": "GPU", "compute_capability": "compute capability", "tensorrt_version": "TensorRT version",
              "checkpoint": "checkpoint", "llm_weights": "LLM weights fingerprint", "preset": "preset",
              "dtype": "dtype", "shapes": "shapes"}
    reasons = []
    for key, label in labels.items():
        if key in expected and meta.get(key) != expected[key]:
            reasons.append(f"{label}: engine built for {meta.get(key)!r}, running {expected[key]!r}")
    done, _, total = str(meta.get("layers_compiled", "")).partition("/")
    if not done or done != total:
        reasons.append(f"engine compiled {meta.get('layers_compiled')!r} layers, not all of them")
    return reasons


def read_meta(engine_path: str | Path) -> dict:
    p = meta_path(engine_path)
    if not p.is_file():
        raise EngineMismatch(f"engine metadata {p} is missing: an engine without it cannot be checked (rebuild it "
                             "with pi-policy build-engine)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatch(f"engine metadata {p} is not valid JSON: {e}") from None


def import_tensorrt():
    """The tensorrt module, or ImportError with the reason."""
    import tensorrt as trt

    return trt


def build_engine(onnx_path: str | Path, engine_path: str | Path, meta: dict, workspace_gib: float = 8.0) -> Path:
    """Parse the ONNX graph into a strongly typed network, build, and save engine + JSON metadata."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on (and ignored) in 11.x
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hasattr(trt, "IProgressMonitor"):  # TensorRT >= 10: show the build's phases (it takes minutes)
        config.progress_monitor = build_progress(trt)
    log.warning("building the TensorRT engine from %s (several minutes)", onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    meta_path(engine_path).write_text(json.dumps(meta, indent=2))
    return engine_path


def build_progress(trt):
    """A TensorRT progress monitor printing each build phase with its step count."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            indent = "  " if parent_phase else ""
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {indent}{phase_name} ({num_steps} steps)", flush=True)

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return Progress()


class TensorRTPrefill:
    """Runs a deserialized engine on the runner's own buffers: fn(prefix_embs, prefix_pad, kv), K/V written in place."""

    def __init__(self, engine_path: str | Path, shapes: dict[str, list[int]]):
        trt = import_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(shapes):
            raise EngineMismatch(f"engine tensors {sorted(names)}, expected {sorted(shapes)}")
        for name in names:
            got = list(self.engine.get_tensor_shape(name))
            if got != list(shapes[name]):
                raise EngineMismatch(f"engine tensor {name} has shape {got}, expected {shapes[name]}")
        self._checked = False

    def _check_buffers(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            want = self.engine.get_tensor_dtype(name)
            have = getattr(self.trt.DataType, TORCH_TO_TRT.get(t.dtype, ""), None)
            if have != want or list(t.shape) != list(self.engine.get_tensor_shape(name)) or not t.is_contiguous():
                raise EngineMismatch(f"buffer {name} is {t.dtype} {list(t.shape)}; the engine wants {want} "
                                     f"{list(self.engine.get_tensor_shape(name))}, contiguous")
        self._checked = True

    def __call__(self, prefix_embs: torch.Tensor, prefix_pad: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]):
        tensors = {"prefix_embs": prefix_embs, "prefix_pad": prefix_pad, "k_cache": kv[0], "v_cache": kv[1]}
        if not self._checked:
            self._check_buffers(tensors)
        for name, t in tensors.items():
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return kv


def running_identity(model: PiModel, checkpoint: str | None, tensorrt_version: str) -> dict:
    """What an engine must match to serve `model` here. Without a checkpoint, the LLM weights are hashed."""
    device = next(model.parameters()).device
    ident = {**gpu_identity(device), "tensorrt_version": tensorrt_version, "preset": model.cfg.name,
             "dtype": str(model.dtype).removeprefix("torch."), "shapes": expected_shapes(model)}
    if checkpoint:
        ident["checkpoint"] = weights_tag(checkpoint)
    else:
        ident["llm_weights"] = weights_fingerprint(model.llm)
    return ident


def load_tensorrt_prefill(model: PiModel, engine_path: str | None, checkpoint: str | None,
                          strict: bool = False) -> Implementation:
    """The TensorRT prefill, or the PyTorch one with the reason (strict: raise EngineMismatch instead)."""

    def fallback(reason: str) -> Implementation:
        if strict:
            raise EngineMismatch(reason)
        return Implementation(None, TORCH, reason)

    device = next(model.parameters()).device
    if device.type != "cuda":
        return fallback(f"tensorrt needs a CUDA device, the model is on {device}")
    if not engine_path:
        return fallback("tensorrt backend needs an engine (--engine PATH, made by pi-policy build-engine)")
    if not Path(engine_path).is_file():
        return fallback(f"engine {engine_path} not found")
    try:
        trt = import_tensorrt()
    except ImportError as e:
        return fallback(f"tensorrt not importable ({e})")
    try:
        meta = read_meta(engine_path)
    except EngineMismatch as e:
        return fallback(str(e))
    reasons = check_engine_meta(meta, running_identity(model, checkpoint, trt.__version__))
    if reasons:
        return fallback(f"engine {engine_path} refused: " + "; ".join(reasons))
    try:
        fn = TensorRTPrefill(engine_path, meta["shapes"])
    except EngineMismatch as e:
        return fallback(str(e))
    log.info("tensorrt prefill: %s (%s layers, built with TensorRT %s)", engine_path, meta["layers_compiled"],
             meta["tensorrt_version"])
    return Implementation(fn, "tensorrt")
