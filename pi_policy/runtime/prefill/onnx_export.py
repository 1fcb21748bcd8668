"""Export the FP8 prefill (prefix embeddings + pad mask in, K and V of every layer out) to ONNX with FP8 Q/DQ.

The graph is traced from the same PyTorch code every backend runs (PiModel.prefill over the FP8 block
copies), so RoPE, attention and the norms in the engine are the shared ones; only the FP8 linears are
rewritten, as QuantizeLinear -> DequantizeLinear on activations and DequantizeLinear on FP8 weights.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from pi_policy.model.checkpoint import sha256_of_files
from pi_policy.runtime.prefill.fp8 import FP8Prefill

INPUTS = ("prefix_embs", "prefix_pad")
OUTPUTS = ("k_cache", "v_cache")
MIN_OPSET = 19  # first opset with float8 QuantizeLinear / DequantizeLinear
INLINE_LIMIT = 1 << 30  # above this many bytes of weights, keep them in one external-data file


class PrefillGraph(nn.Module):
    """(prefix_embs (B, P, D), prefix_pad (B, P) bool) -> (K, V), each (layers, B, kv_heads, P, head_dim)."""

    def __init__(self, prefill: FP8Prefill):
        super().__init__()
        self.layers = prefill.layers  # registered, so their FP8 buffers become initializers
        self._prefill = prefill.model.prefill  # a bound method: the model itself is not part of this module

    def forward(self, prefix_embs: Tensor, prefix_pad: Tensor) -> tuple[Tensor, Tensor]:
        return self._prefill(prefix_embs, prefix_pad, None, layers=self.layers)


@contextlib.contextmanager
def exporting(prefill: FP8Prefill):
    lins = prefill.linears().values()
    for lin in lins:
        lin.exporting = True
    try:
        yield
    finally:
        for lin in lins:
            lin.exporting = False


def example_inputs(prefill: FP8Prefill, batch: int = 1) -> tuple[Tensor, Tensor]:
    """Shape-and-dtype examples on the model's device: all prefix tokens valid."""
    model = prefill.model
    device = next(model.parameters()).device
    cfg = model.cfg
    embs = torch.randn(batch, cfg.prefix_len, cfg.llm.width, device=device).to(model.dtype)
    return embs, torch.ones(batch, cfg.prefix_len, dtype=torch.bool, device=device)


@torch.no_grad()
def export_prefill_onnx(prefill: FP8Prefill, path: str | Path, *, opset: int = MIN_OPSET,
                        inputs: tuple[Tensor, Tensor] | None = None, check: bool = True) -> dict:
    """Write the ONNX graph to `path` (weights in `path.data` when large); returns a description of it."""
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} has no float8 Q/DQ; use opset >= {MIN_OPSET}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = inputs or example_inputs(prefill)
    graph = PrefillGraph(prefill).eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, exporting(prefill), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        raw = Path(tmp) / "prefill.onnx"
        torch.onnx.export(graph, inputs, str(raw), dynamo=False, opset_version=opset, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), do_constant_folding=True)
        proto = onnx.load(str(raw))  # pulls in external tensors, if the exporter split them out
    model = prefill.model
    cfg = model.cfg
    meta = {"producer": "pi_policy", "preset": cfg.name, "layers": str(len(prefill.layers)),
            "prefix_len": str(cfg.prefix_len), "width": str(cfg.llm.width),
            "quantization": "fp8-e4m3 weights " + ("per-channel" if _per_channel(prefill) else "per-tensor")
            + ", static per-tensor activations"}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    large = sum(t.ByteSize() for t in proto.graph.initializer) > INLINE_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if check:
        onnx.checker.check_model(str(path), full_check=not large)
    ops = [n.op_type for n in proto.graph.node]
    return {"path": str(path), "external_data": str(data) if large else None, "opset": opset,
            "sha256": sha256_of_files([path]), "nodes": len(ops), "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear"), "matmul": ops.count("MatMul"),
            "inputs": {n: list(t.shape) for n, t in zip(INPUTS, inputs, strict=True)},
            "outputs": {n: [len(prefill.layers), inputs[0].shape[0], cfg.llm.num_kv_heads, inputs[0].shape[1],
                            cfg.llm.head_dim] for n in OUTPUTS},
            "dtype": str(inputs[0].dtype).removeprefix("torch."), "metadata": meta}


def _per_channel(prefill: FP8Prefill) -> bool:
    return any(lin.per_channel for lin in prefill.linears().values())


def run_onnxruntime(path: str | Path, prefix_embs: Tensor, prefix_pad: Tensor) -> tuple[Tensor, Tensor]:
    """Run the exported graph on CPU with onnxruntime (float32 graphs; ORT's CPU kernels lack bf16)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"prefix_embs": prefix_embs.detach().cpu().numpy(), "prefix_pad": prefix_pad.detach().cpu().numpy()}
    k, v = sess.run(list(OUTPUTS), feeds)
    return torch.from_numpy(k), torch.from_numpy(v)
