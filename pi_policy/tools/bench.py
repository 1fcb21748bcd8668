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

from pi_policy.observation import DEFAULT_CAMERAS
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.options import BACKEND_CHOICES, RTC_MODES, RTCSettings, parse_stages
from pi_policy.runtime.stats import action_accuracy, action_stats, comparison_table, stage_table, summarize
from pi_policy.tools.flags import add_fp8_arguments, fp8_options
from pi_policy.tools.synthetic import synthetic_observation


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
              fp8_options: dict | None = None, rtc_modes: tuple[str, ...] = ()) -> dict:
    """Each backend (and, with rtc_modes, each real-time chunking mode on it) timed on the same observation.

    An RTC mode is timed continuing a previous chunk: the runner's own first chunk with RTC_EXECUTED steps
    executed, and a delay of RTC_DELAY steps, so that every RTC operation runs.
    """
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
    if rtc_modes:
        defaults = {k: v for k, v in vars(RTCSettings()).items() if k != "mode"}
        result["workload"]["rtc"] = {"executed_steps": RTC_EXECUTED, "delay": RTC_DELAY} | defaults
    runs = [(b, m) for b in backends for m in (rtc_modes or (None,))]
    for backend, mode in runs:
        name = backend if mode is None else f"{backend}+rtc-{mode}"
        runner = build_runner(model=model, backend=backend, camera_names=names, seed=seed, progress=progress,
                              engine_path=engine, checkpoint=checkpoint, compile_stages=compile_stages,
                              fp8_options=fp8_options, rtc=RTCSettings(mode) if mode else None)
        actions = runner.infer(obs, noise=noise).actions
        cont = {}
        if mode not in (None, "off"):
            cont = {"prev_chunk": actions[RTC_EXECUTED:], "delay": RTC_DELAY}
            actions = runner.infer(obs, noise=noise, **cont).actions
        records = [runner.infer(obs, **cont).latency
                   for _ in tqdm(range(iters), desc=f"bench {name}", disable=not progress, leave=False)]
        entry = summarize(records) | {"startup_ms": dict(runner.startup_ms), "note": runner.backend_note,
                                      "actions": actions.tolist()}
        result["backends"][name] = entry
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    names = list(result["backends"])
    for name in names[1:]:
        result["backends"][name]["accuracy_vs_" + names[0]] = action_accuracy(
            np.array(result["backends"][name]["actions"]), np.array(result["backends"][names[0]]["actions"]))
    if rtc_modes:
        result["rtc"] = rtc_costs(result, backends, rtc_modes)
    return result


RTC_EXECUTED, RTC_DELAY = 5, 4  # the previous chunk bench continues: 5 steps executed, the next 4 frozen


def rtc_costs(result: dict, backends: tuple[str, ...], modes: tuple[str, ...]) -> dict:
    """Denoise p50 of each RTC mode per backend, and its ratio to `off` when off was timed."""
    out = {}
    for backend in backends:
        ms = {m: result["backends"][f"{backend}+rtc-{m}"]["denoise"]["p50"] for m in modes}
        out[backend] = {m: {"denoise_p50_ms": v, "vs_off": v / ms["off"] if "off" in ms and ms["off"] else None}
                        for m, v in ms.items()}
    return out


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
                  f"relative error {100 * acc['relative_error']:.2f}%"]
    for backend, costs in result.get("rtc", {}).items():
        w = result["workload"]["rtc"]
        cells = [f"{m} {c['denoise_p50_ms']:.2f} ms" + (f" ({c['vs_off']:.2f}x off)" if c["vs_off"] and m != "off"
                                                          else "") for m, c in costs.items()]
        lines += ["", f"real-time chunking, {backend}, denoise p50 (continuing a chunk with {w['executed_steps']} "
                      f"steps executed, delay {w['delay']}): " + "; ".join(cells)]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time each stage on the fixed benchmark workload")
    p.add_argument("--preset", default="pi0")
    p.add_argument("--backend", action="append", choices=BACKEND_CHOICES,
                   help="repeat to compare (the first is the baseline); default bf16")
    p.add_argument("--rtc", action="append", choices=RTC_MODES,
                   help="real-time chunking mode; repeat to compare (e.g. --rtc off --rtc inpaint --rtc guided)")
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


def run(args: argparse.Namespace) -> int:
    result = run_bench(args.preset, tuple(args.backend or ["bf16"]), args.cameras, args.iters, args.device,
                       args.checkpoint, args.seed, True, args.engine, parse_stages(args.compile),
                       fp8_options(args), tuple(dict.fromkeys(args.rtc or ())))
    print(format_result(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0
