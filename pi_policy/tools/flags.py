"""Command-line flags that several subcommands share, and their translation into library arguments."""

from __future__ import annotations

import argparse

import torch

from pi_policy.model.tokenizer import PROMPT_FORMATS
from pi_policy.runtime.options import BACKEND_CHOICES


def add_model_arguments(p: argparse.ArgumentParser, preset: str = "tiny") -> None:
    """Which model: preset, weights, statistics, tokenizer, seed, device; and --no-progress."""
    p.add_argument("--preset", default=preset, help=f"model preset: pi0, pi05, tiny, tiny05 (default {preset})")
    p.add_argument("--checkpoint", default=None, help="safetensors checkpoint (file or folder); default: random")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available)")
    p.add_argument("--prompt-format", default="auto", choices=("auto", *PROMPT_FORMATS),
                   help="how the checkpoint's trainer wrote prompts (default: detected beside it)")
    p.add_argument("--norm-stats", default=None,
                   help="openpi norm_stats.json or LeRobot checkpoint folder (default: found beside the checkpoint)")
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece model")
    p.add_argument("--cameras", type=int, default=None,
                   help="camera views the runner (or engine) is built for, 1-3 (default: the preset's 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_backend_argument(p: argparse.ArgumentParser, repeat: bool = False, **kwargs) -> None:
    help_text = kwargs.pop("help", "prefill backend; eager = bf16 without CUDA graphs or torch.compile")
    p.add_argument("--backend", action="append" if repeat else "store", choices=BACKEND_CHOICES, help=help_text,
                   **kwargs)


def add_fp8_arguments(parser: argparse.ArgumentParser) -> None:
    """The FP8 options (prefill and vision), shared by `bench` and `verify`."""
    parser.add_argument("--fp8-keep-bf16", default="",
                        help="fp8: comma-separated prefill linears left in bf16 (wqkv,wo,mlp.gate_up,mlp.down)")
    parser.add_argument("--fp8-exact-accum", action="store_true",
                        help="fp8: exact accumulation in the FP8 GEMMs (use_fast_accum=False; slower)")
    parser.add_argument("--fp8-per-channel", action="store_true", help="fp8: per-output-channel weight scales")
    parser.add_argument("--fp8-dynamic", default="row", choices=("row", "tensor"),
                        help="fp8: without static scales, one activation scale per row (token; default) or per tensor")
    parser.add_argument("--fp8-unfused-quant", action="store_true",
                        help="fp8: quantize activations in a pass of their own, not inside the RMSNorm and GeGLU "
                             "kernels that produce them (the fused kernels need a CUDA GPU)")
    parser.add_argument("--fp8-calibration", default=None, metavar="FILE",
                        help="fp8: static activation scales from `pi-policy calibrate` (vision and prefill) instead "
                             "of dynamic ones")


def fp8_options(args: argparse.Namespace) -> dict:
    """build_fp8_prefill's keyword arguments (the vision tower takes the ones that apply to it)."""
    return {"keep_bf16": tuple(x for x in args.fp8_keep_bf16.split(",") if x),
            "fast_accum": not args.fp8_exact_accum, "per_channel": args.fp8_per_channel,
            "dynamic": args.fp8_dynamic, **({"fuse_producers": False} if args.fp8_unfused_quant else {})}
