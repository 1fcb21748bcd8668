"""`pi-policy calibrate` and `pi-policy build-engine`: FP8 activation scales and the TensorRT prefill engine."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from pi_policy.tools.flags import add_model_arguments, default_device, spec_from_args

log = logging.getLogger(__name__)
_NOT_A_PREFILL = ("--backend", "--denoise", "--engine", "--vision")  # these commands make their FP8 copies themselves


def add_parser(subparsers) -> None:
    """Register calibrate and build-engine on an argparse subparsers object."""
    c = subparsers.add_parser("calibrate", help="FP8 static activation scales (vision tower and prefill) from sample "
                                                "observations",
                              description="Static FP8 activation scales for the linears of the vision tower and the "
                                          "prefill, from the images and prefixes a bf16 runner computes for sample "
                                          "observations; written as JSON for --fp8-calibration (vision and prefill) "
                                          "and build-engine --calibration (prefill).")
    add_model_arguments(c, {"device": default_device()}, skip=_NOT_A_PREFILL)
    c.add_argument("--samples", type=int, default=8, help="number of sample observations (default 8)")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.set_defaults(func=run_calibrate)

    b = subparsers.add_parser("build-engine", help="export the FP8 prefill to ONNX and build a TensorRT engine",
                              description="Export the FP8 prefill (Q/DQ) to ONNX, check it, and where TensorRT is "
                                          "installed build a strongly typed engine with its metadata.")
    add_model_arguments(b, {"device": default_device()}, skip=_NOT_A_PREFILL)
    b.add_argument("--out", required=True, help="output folder: prefill.onnx, prefill.engine, prefill.engine.json")
    b.add_argument("--calibration", default=None, help="calibration JSON (default: calibrate on --samples now)")
    b.add_argument("--samples", type=int, default=4, help="sample observations to calibrate on (default 4)")
    b.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    b.add_argument("--opset", type=int, default=19, help="ONNX opset of the export (default: %(default)s)")
    b.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace")
    b.add_argument("--onnx-only", action="store_true", help="stop after writing and checking the ONNX graph")
    b.set_defaults(func=run_build_engine)



def _samples(model, spec, n: int):
    """Calibration inputs: the images and prefix a BF16 runner over `model` computes for n synthetic observations."""
    from pi_policy.runtime import build_runner
    from pi_policy.runtime.calibrate import capture_samples
    from pi_policy.tools.synthetic import sample_observations

    if n < 1:
        raise ValueError("need at least one calibration sample")
    runner = build_runner(spec, model=model, backend="bf16", warmup=False)
    cfg = model.cfg
    obs = sample_observations(runner.camera_names, cfg.vision.image_size, runner.normalizer.action_dim, n,
                              spec.seed + 100)
    noise = np.zeros((cfg.horizon, cfg.action_dim), np.float32)
    return capture_samples(runner, obs, noise)


def run_calibrate(args: argparse.Namespace) -> int:
    from pi_policy.runtime import build_model
    from pi_policy.runtime.calibrate import calibrate_fp8
    from pi_policy.runtime.prefill.calibration import save_calibration
    from pi_policy.runtime.prefill.tensorrt import weights_tag

    spec = spec_from_args(args)
    model = build_model(spec)
    cal = calibrate_fp8(model, _samples(model, spec, args.samples), progress=spec.progress)
    path = save_calibration(args.out, cal.amax, {"preset": args.preset, "samples": args.samples,
                                                 "checkpoint": weights_tag(args.checkpoint, args.seed)})
    print(f"wrote {path}: {cal.describe()}, from {args.samples} observations")
    return 0


def run_build_engine(args: argparse.Namespace) -> int:
    from pi_policy.runtime import build_model
    from pi_policy.runtime.prefill.fp8 import build_fp8_prefill
    from pi_policy.runtime.prefill.onnx_export import export_prefill_onnx
    from pi_policy.runtime.prefill.tensorrt import build_engine, engine_meta, gpu_identity, import_tensorrt, weights_tag

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_from_args(args)
    model = build_model(spec)
    calibration = args.calibration or [(s.prefix_embs, s.prefix_pad) for s in _samples(model, spec, args.samples)]
    choice = build_fp8_prefill(model, calibration=calibration, per_channel=args.per_channel, progress=spec.progress)
    t0 = time.perf_counter()
    info = export_prefill_onnx(choice.fn, out / "prefill.onnx", opset=args.opset)
    layers = layers_in_graph(out / "prefill.onnx")
    print(f"wrote {info['path']} ({info['nodes']} nodes, {info['quantize_linear']} QuantizeLinear, "
          f"{info['dequantize_linear']} DequantizeLinear, {len(layers)}/{model.cfg.llm.depth} layers, "
          f"{info['dtype']}, {time.perf_counter() - t0:.1f} s); onnx.checker passed")
    if args.onnx_only:
        return 0
    try:
        trt = import_tensorrt()
    except ImportError as e:
        return _no_engine(f"tensorrt is not importable ({e})", out)
    if next(model.parameters()).device.type != "cuda":
        return _no_engine("TensorRT needs --device cuda", out)
    t0 = time.perf_counter()
    meta = engine_meta(model, gpu=gpu_identity(), tensorrt_version=trt.__version__,
                       checkpoint_tag=weights_tag(args.checkpoint, args.seed), onnx_info=info,
                       layers_compiled=len(layers), build_s=0.0)
    engine = out / "prefill.engine"
    build_engine(out / "prefill.onnx", engine, meta, args.workspace_gib)
    meta["build_s"] = round(time.perf_counter() - t0, 1)
    (out / "prefill.engine.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {engine} + {engine.name}.json: {meta['gpu_name']} sm_{meta['compute_capability']}, TensorRT "
          f"{meta['tensorrt_version']}, layers {meta['layers_compiled']}, {meta['build_s']} s")
    return 0


def _no_engine(why: str, out: Path) -> int:
    print(f"pi-policy build-engine: error: no engine built: {why}; the ONNX graph is in {out / 'prefill.onnx'} "
          "(--onnx-only stops there on purpose)", file=sys.stderr)
    return 1


def layers_in_graph(path: str | Path) -> set[int]:
    """Indices of the Gemma layers whose (FP8) weights are in the exported graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {int(m.group(1)) for t in proto.graph.initializer if (m := re.match(r"layers\.(\d+)\.", t.name))}
