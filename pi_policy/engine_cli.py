"""Subcommands `verify`, `calibrate` and `build-engine`: argument parsing and thin shells over the library."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .runtime.expert import DENOISE
from .runtime.fp8 import add_fp8_arguments, fp8_options

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset: tiny, pi0, pi05 (default tiny)")
    p.add_argument("--checkpoint", default=None, help="safetensors checkpoint (file or folder); default: random")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--norm-stats", default=None, help="norm_stats.json of the checkpoint")
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers) -> None:
    """Register verify, calibrate and build-engine on an argparse subparsers object."""
    v = subparsers.add_parser("verify", help="compare a prefill backend (fp8, tensorrt) or a fused denoise (triton, "
                                             "fp8) with the BF16 baseline")
    _common(v)
    v.add_argument("--backend", required=True, choices=("bf16", "fp8", "tensorrt"),
                   help="the candidate's prefill (bf16: unchanged, to verify a --denoise alone)")
    v.add_argument("--denoise", default="bf16", choices=DENOISE,
                   help="the candidate's denoise: bf16 (PyTorch, as the baseline), triton or fp8 (fused expert)")
    v.add_argument("--engine", default=None, help="TensorRT engine (for --backend tensorrt)")
    v.add_argument("--max-rel-error", type=float, default=0.03, help="fail above this action relative error")
    v.add_argument("--scales", default="dynamic", choices=("dynamic", "static"), help="FP8 activation scales")
    v.add_argument("--calibration-samples", type=int, default=4, help="observations for static scales")
    v.add_argument("--check-baseline", action="store_true",
                   help="rerun BF16 after the candidate and require bit-identical actions and KV")
    v.add_argument("--json", default=None, help="write the report here")
    add_fp8_arguments(v)
    v.set_defaults(func=run_verify)

    c = subparsers.add_parser("calibrate", help="FP8 static activation scales from sample observations")
    _common(c)
    c.add_argument("--samples", type=int, default=8, help="number of sample observations (default 8)")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.set_defaults(func=run_calibrate)

    b = subparsers.add_parser("build-engine", help="export the FP8 prefill to ONNX and build a TensorRT engine")
    _common(b)
    b.add_argument("--out", required=True, help="output folder: prefill.onnx, prefill.engine, prefill.engine.json")
    b.add_argument("--calibration", default=None, help="calibration JSON (default: calibrate on --samples now)")
    b.add_argument("--samples", type=int, default=4, help="sample observations to calibrate on (default 4)")
    b.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    b.add_argument("--opset", type=int, default=19)
    b.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace")
    b.add_argument("--onnx-only", action="store_true", help="stop after writing and checking the ONNX graph")
    b.set_defaults(func=run_build_engine)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def run_verify(args: argparse.Namespace) -> int:
    from .verify import VerifyError, format_report, verify, write_report

    try:
        report = verify(args.backend, args.preset, args.checkpoint, args.device, args.seed, args.engine,
                        args.max_rel_error, args.scales, args.calibration_samples, args.check_baseline,
                        progress=not args.no_progress, norm_stats=args.norm_stats, tokenizer=args.tokenizer,
                        fp8_options=fp8_options(args), denoise=args.denoise)
    except VerifyError as e:
        print(f"verify: ERROR: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        print(f"wrote {write_report(report, args.json)}")
    return 0 if report["passed"] else 1


def _samples(model, args, n: int):
    """Calibration inputs: the prefix a BF16 runner over `model` computes for n synthetic observations."""
    from .runtime import build_runner
    from .verify import calibration_samples, sample_observations

    if n < 1:
        raise ValueError("need at least one calibration sample")
    runner = build_runner(args.preset, args.checkpoint, norm_stats=args.norm_stats, tokenizer=args.tokenizer,
                          device=args.device, backend="bf16", seed=args.seed, model=model, warmup=False,
                          progress=not args.no_progress)
    cfg = model.cfg
    obs = sample_observations(runner.camera_names, cfg.vision.image_size, runner.normalizer.action_dim, n,
                              args.seed + 100)
    noise = np.zeros((cfg.horizon, cfg.action_dim), np.float32)
    return calibration_samples(runner, obs, noise)


def run_calibrate(args: argparse.Namespace) -> int:
    from .runtime import build_model
    from .runtime.fp8 import build_fp8_prefill, save_calibration
    from .runtime.tensorrt_backend import weights_tag

    model = build_model(args.preset, args.checkpoint, args.device, args.seed)
    choice = build_fp8_prefill(model, calibration=_samples(model, args, args.samples), progress=not args.no_progress)
    amax = {name: float(lin.act_scale) * 448.0 for name, lin in choice.fn.linears().items()
            if lin.act_scale is not None}
    path = save_calibration(args.out, amax, {"preset": args.preset, "samples": args.samples,
                                             "checkpoint": weights_tag(args.checkpoint, args.seed)})
    print(f"wrote {path}: static activation scales for {len(amax)} FP8 linears from {args.samples} observations")
    return 0


def run_build_engine(args: argparse.Namespace) -> int:
    import time

    from .runtime import build_model
    from .runtime.fp8 import build_fp8_prefill
    from .runtime.onnx_export import export_prefill_onnx
    from .runtime.tensorrt_backend import build_engine, engine_meta, gpu_identity, import_tensorrt, weights_tag

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.preset, args.checkpoint, args.device, args.seed)
    calibration = args.calibration or _samples(model, args, args.samples)
    choice = build_fp8_prefill(model, calibration=calibration, per_channel=args.per_channel,
                               progress=not args.no_progress)
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
        print(f"engine build skipped: tensorrt not importable ({e}); the ONNX graph is written")
        return 0
    if next(model.parameters()).device.type != "cuda":
        print("engine build skipped: TensorRT needs --device cuda; the ONNX graph is written")
        return 0
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


def layers_in_graph(path: str | Path) -> set[int]:
    """Indices of the Gemma layers whose (FP8) weights are in the exported graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {int(m.group(1)) for t in proto.graph.initializer if (m := re.match(r"layers\.(\d+)\.", t.name))}
