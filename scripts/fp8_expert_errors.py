"""Which action-expert weights carry the FP8 error: a float32 simulation of e4m3 weight quantization, on CPU.

The expert's four matrices per layer (qkv, wo, gate_up, down) are quantized exactly as the fused expert packs
them (float8_e4m3fn, one scale per output channel) and dequantized back into a float32 copy of the model; the
10-step denoise then runs in float32 against the unquantized float32 denoise on the same prefix cache and
noise. Quantizing one group at a time (one matrix kind in every layer, one layer's four matrices, one matrix)
and keeping one group in bf16 while the rest is FP8 shows where the error comes from.

pi0.5's random init leaves its adaptive-norm gates near 0, so its layers barely touch the residual; with
`--open-gates` (the default for pi0.5) every gate bias is 1 and every scale bias 0.1, as in the GPU check.
The prefix cache comes from the real vision tower and LLM prefill (bf16, random images, a 20-token prompt);
the expert runs in float32 with its own random weights (the LLM's width does not enter the denoise).

`--keep SET` (repeatable, the runner's denoise_keep_bf16 syntax, e.g. `gate_up,down:0-5`) measures FP8 with
those cells kept bf16. `--prefix-cache FILE` keeps the prefix cache between runs (it takes minutes on a CPU).

Usage: python scripts/fp8_expert_errors.py OUT.json [--preset pi05] [--cells] [--keep SET ...] [--only-keep]
       [--prefix-cache FILE] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi_policy.model import PiModel, get_config, init_random  # noqa: E402
from pi_policy.model.layers import RMSNorm  # noqa: E402
from pi_policy.runtime.expert.fused import MATRICES  # noqa: E402
from pi_policy.runtime.factory import build_model  # noqa: E402
from pi_policy.runtime.options import kept_cells  # noqa: E402
from pi_policy.runtime.prefill.fp8_linear import quantize_weight  # noqa: E402
from pi_policy.tools.flags import parse_keep_bf16  # noqa: E402

MODULES = {"qkv": "wqkv", "wo": "wo", "gate_up": "mlp.gate_up", "down": "mlp.down"}


def prefix_cache(preset: str, seed: int) -> tuple:
    """The LLM's KV cache over random images and a 20-token prompt (the full model in bf16, then freed)."""
    model = build_model(preset=preset, device="cpu", seed=seed, dtype=torch.bfloat16)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = (torch.rand(1, cfg.num_cameras, 3, s, s, generator=gen) * 2 - 1).bfloat16()
    masks = torch.ones(1, cfg.num_cameras, dtype=torch.bool)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_token_len), generator=gen)
    tmask = torch.arange(cfg.max_token_len)[None] < 20
    with torch.no_grad():
        embs, pad = model.embed_prefix(model.embed_images(images), masks, tokens, tmask)
        cache = model.prefill(embs, pad)
    state = torch.randn(1, cfg.action_dim, generator=gen) * 0.5
    noise = torch.randn(1, cfg.horizon, cfg.action_dim, generator=gen)
    return tuple(c.float() for c in cache), pad, state, noise


def expert_model(preset: str, steps: int, seed: int, open_gates: bool) -> PiModel:
    """A float32 model with the preset's action expert (its vision tower and LLM shrunk: the denoise reads only
    the cache they leave)."""
    full = get_config(preset, num_steps=steps)
    small = dataclasses.replace(full, vision=get_config("tiny").vision,
                                llm=dataclasses.replace(full.llm, width=64, mlp_dim=128), vocab_size=512)
    model = init_random(PiModel(small), seed).eval()
    if open_gates and small.pi05:
        w = small.expert.width
        with torch.no_grad():
            for m in model.expert.modules():
                if isinstance(m, RMSNorm) and m.dense is not None:
                    m.dense.bias[2 * w:] = 1.0
                    m.dense.bias[:w] = 0.1
    return model


def fp8_round_trip(w: torch.Tensor, group: int = 0) -> torch.Tensor:
    """w quantized to e4m3 with one scale per output channel (or per `group` inputs of a channel), dequantized."""
    if group and w.shape[1] % group == 0 and w.shape[1] > group:
        g = w.view(w.shape[0], -1, group)
        return fp8_round_trip(g.reshape(-1, group)).view_as(w)
    w8, scale = quantize_weight(w.float(), per_channel=True)
    return w8.float() * scale


class Quantizer:
    """Swaps chosen expert matrices for their FP8 round trip (or bf16 rounding) and back."""

    def __init__(self, model: PiModel):
        self.model = model
        self.original = {(i, k): getattr_path(blk, MODULES[k]).weight.detach().clone()
                         for i, blk in enumerate(model.expert.layers) for k in MATRICES}

    def apply(self, cells, fmt: str = "fp8", group: int = 0) -> None:
        with torch.no_grad():
            for (i, k), w in self.original.items():
                target = getattr_path(self.model.expert.layers[i], MODULES[k]).weight
                if (i, k) not in cells:
                    target.copy_(w)
                elif fmt == "fp8":
                    target.copy_(fp8_round_trip(w, group))
                else:
                    target.copy_(w.bfloat16().float())


def getattr_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def error(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    return {"relative_error": float((a - b).norm() / b.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "max_diff": float((a - b).abs().max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="pi05")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--closed-gates", action="store_true", help="pi0.5: keep the random init's gates (near 0)")
    p.add_argument("--cells", action="store_true", help="also every single matrix of every layer (72 runs)")
    p.add_argument("--group", type=int, default=128, help="inputs per scale for the finer-scale variant")
    p.add_argument("--keep", action="append", default=[], metavar="SET", help="cells kept bf16, e.g. gate_up,down:0-5")
    p.add_argument("--only-keep", action="store_true", help="only the --keep sets (and all_fp8)")
    p.add_argument("--prefix-cache", type=Path, default=None, help="save the prefix cache here, or load it")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.prefix_cache is not None and args.prefix_cache.exists():
        cache, pad, state, noise = torch.load(args.prefix_cache)
    else:
        cache, pad, state, noise = prefix_cache(args.preset, args.seed)
        if args.prefix_cache is not None:
            torch.save((cache, pad, state, noise), args.prefix_cache)
    model = expert_model(args.preset, args.steps, args.seed, not args.closed_gates)
    cfg = model.cfg
    layers = range(cfg.expert.depth)
    every = {(i, k) for i in layers for k in MATRICES}
    q = Quantizer(model)
    result: dict = {"preset": args.preset, "steps": args.steps, "gates_open": cfg.pi05 and not args.closed_gates,
                    "prefix_s": round(time.perf_counter() - t0, 1), "weights": "e4m3, one scale per output channel",
                    "reference": "float32 denoise, unquantized expert"}

    def run(cells, fmt: str = "fp8", group: int = 0) -> dict:
        q.apply(cells, fmt, group)
        with torch.no_grad():
            return error(model.denoise(cache, pad, state, noise), truth)

    with torch.no_grad():
        truth = model.denoise(cache, pad, state, noise)
    jobs = {"all_fp8": (every,)}
    jobs |= {f"keep {k}": (every - kept_cells(parse_keep_bf16(k), cfg.expert.depth),) for k in args.keep}
    if not args.only_keep:
        jobs |= {"all_bf16_rounded": (every, "bf16"),
                 f"all_fp8_group{args.group}": (every, "fp8", args.group)}
        jobs |= {f"only_{k}": ({c for c in every if c[1] == k},) for k in MATRICES}
        jobs |= {f"keep_{k}": ({c for c in every if c[1] != k},) for k in MATRICES}
        jobs |= {f"only_layer{i}": ({c for c in every if c[0] == i},) for i in layers}
        jobs |= {f"keep_layer{i}": ({c for c in every if c[0] != i},) for i in layers}
    if args.cells and not args.only_keep:
        jobs |= {f"only_layer{i}_{k}": ({(i, k)},) for i in layers for k in MATRICES}
    for name, job in tqdm(jobs.items(), desc="denoise runs", disable=not sys.stderr.isatty()):
        result[name] = run(*job)
        args.out.write_text(json.dumps(result, indent=1))
    result["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=1))
    rows = sorted((k for k in result if isinstance(result[k], dict)), key=lambda k: -result[k]["relative_error"])
    for k in rows:
        print(f"{k:28s} {100 * result[k]['relative_error']:7.3f}%  cos {result[k]['cosine']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
