"""`pi-policy bench`: the fixed workload of BENCHMARKING.md, timed per stage, as a table and a JSON file."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .latency import action_accuracy, action_stats, comparison_table, stage_table, summarize
from .observation import Observation
from .runtime import DEFAULT_CAMERAS, build_model, build_runner
from .runtime.backends import BACKENDS
from .runtime.expert import DENOISE
from .runtime.fp8 import add_fp8_arguments, fp8_options

PROMPT = "pick up the red block and put it in the bin"


def synthetic_observation(camera_names: list[str], size: int = 224, state_dim: int = 14, seed: int = 0,
                          prompt: str = PROMPT) -> Observation:
    """The benchmark observation: smooth random RGB images at `size`, a random state; same for every backend."""
    rng = np.random.default_rng(seed)
    images = {}
    for name in camera_names:
        low = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.float32)
        img = np.kron(low, np.ones((8, 8, 1), np.float32))[:size, :size]
        images[name] = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return Observation(images, rng.uniform(-1, 1, state_dim).astype(np.float32), prompt, 0.0)


def machine_info(device: torch.device) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device)}
    try:
        info["tensorrt"] = importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        info["tensorrt"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    return info


def run_bench(preset: str = "pi0", backends: tuple[str, ...] = ("bf16",), cameras: int = 3, iters: int = 200,
              device: str = "cuda", checkpoint: str | None = None, seed: int = 0, progress: bool = True,
              engine: str | None = None, compile_stages: tuple[str, ...] | None = None,
              fp8_options: dict | None = None, denoise: tuple[str, ...] = ()) -> dict:
    """Each backend (x each denoise, when several are given) on the same observation and noise; the first
    configuration is the baseline of the comparison and accuracy blocks."""
    model = build_model(preset, checkpoint, device, seed)
    cfg = model.cfg
    if not 0 <= cameras <= cfg.num_cameras:
        raise ValueError(f"--cameras must be 0..{cfg.num_cameras} for preset {preset}")
    names = DEFAULT_CAMERAS[: cfg.num_cameras]
    obs = synthetic_observation(names[:cameras], cfg.vision.image_size, seed=seed)
    noise = np.random.default_rng(seed + 1).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    result = {"workload": {"preset": preset, "cameras": cameras, "prompt_tokens": cfg.max_token_len,
                           "denoise_steps": cfg.num_steps, "horizon": cfg.horizon, "action_dim": cfg.action_dim,
                           "batch": 1, "iters": iters, "weights": checkpoint or f"random seed {seed}"},
              "machine": machine_info(model.time_freqs.device), "backends": {}}
    configs = [(b, d) for b in backends for d in (denoise or (None,))]
    for backend, den in configs:
        name = f"{backend}/{den}" if len(denoise) > 1 else backend
        runner = build_runner(model=model, backend=backend, camera_names=names, seed=seed, progress=progress,
                              engine_path=engine, checkpoint=checkpoint, compile_stages=compile_stages,
                              fp8_options=fp8_options, denoise=den)
        actions = runner.infer(obs, noise=noise).actions
        records = [runner.infer(obs).latency for _ in tqdm(range(iters), desc=f"bench {name}", disable=not progress,
                                                           leave=False)]
        entry = summarize(records) | {"startup_ms": dict(runner.startup_ms), "note": runner.backend_note,
                                      "actions": actions.tolist()}
        result["backends"][name] = entry
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    first, *rest = result["backends"]
    for name in rest:
        result["backends"][name]["accuracy_vs_" + first] = action_accuracy(
            np.array(result["backends"][name]["actions"]), np.array(result["backends"][first]["actions"]))
    return result


def format_result(result: dict) -> str:
    w, m = result["workload"], result["machine"]
    lines = [f"pi-policy bench: {w['preset']}, {w['cameras']} cameras, {w['denoise_steps']} steps, "
             f"{w['iters']} iters on {m.get('gpu', m['device'])} (torch {m['torch']})"]
    names = list(result["backends"])
    for name in names:
        e = result["backends"][name]
        lines += ["", stage_table(e, f"backend {name}" + (f"  [{e['note']}]" if e["note"] else "")),
                  f"start-up (warm-up + graph capture): {e['startup_ms'].get('warmup_and_capture', 0):.0f} ms",
                  action_stats(np.array(e["actions"]))]
    for name in names[1:]:
        base, cand = result["backends"][names[0]], result["backends"][name]
        acc = cand["accuracy_vs_" + names[0]]
        lines += ["", comparison_table(base, cand, names[0], name),
                  f"{name} vs {names[0]}: max diff {acc['max_diff']:.4f}, mean diff {acc['mean_diff']:.4f}, "
                  f"relative error {100 * acc['relative_error']:.2f}%, cosine {acc['cosine']:.6f}"]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time each stage on the fixed benchmark workload")
    p.add_argument("--preset", default="pi0")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="repeat to compare (the first is the baseline); default bf16")
    p.add_argument("--denoise", action="append", choices=DENOISE,
                   help="denoise: bf16 (PyTorch, the default), triton or fp8 (fused Triton expert); repeat to "
                        "compare (the first is the baseline)")
    p.add_argument("--cameras", type=int, default=3)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint")
    p.add_argument("--engine", help="TensorRT engine for --backend tensorrt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--compile", default=None,
                   help="comma-separated stages to torch.compile; default prefill,denoise on CUDA; 'none' for none")
    add_fp8_arguments(p)
    p.set_defaults(func=run)


def parse_stages(text: str | None) -> tuple[str, ...] | None:
    from .observation import STAGES

    if text is None:
        return None
    if text == "none":
        return ()
    stages = tuple(s for s in text.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad} for --compile; choose from {STAGES}")
    return stages


def run(args: argparse.Namespace) -> int:
    result = run_bench(args.preset, tuple(args.backend or ["bf16"]), args.cameras, args.iters, args.device,
                       args.checkpoint, args.seed, True, args.engine, parse_stages(args.compile),
                       fp8_options(args), tuple(args.denoise or ()))
    print(format_result(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0
