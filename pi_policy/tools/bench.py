"""`pi-policy bench`: the fixed benchmark workload (docs/performance.md), timed per stage, as a table and JSON."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import platform
from pathlib import Path

import numpy as np
import torch

from pi_policy.progress import progress_bar
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.options import RTC_MODES, RTCSettings
from pi_policy.runtime.roofline import format_roofline, measure_peaks, roofline
from pi_policy.runtime.spec import RunnerSpec
from pi_policy.runtime.stats import (
    action_accuracy,
    action_stats,
    comparison_table,
    stage_table,
    summarize,
    threads_text,
)
from pi_policy.tools.errors import UsageError
from pi_policy.tools.flags import (
    add_compile_argument,
    add_fp8_arguments,
    add_model_arguments,
    default_device,
    spec_from_args,
)
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


def run_bench(spec: RunnerSpec, backends: tuple[str, ...] = ("bf16",), denoise: tuple[str, ...] = (),
              rtc_modes: tuple[str, ...] = (), iters: int = 200, roofline_peaks: dict | None = None,
              vision: tuple[str, ...] = ()) -> dict:
    """The benchmark workload (docs/performance.md) on `spec`'s model: each backend (x each denoise, x each vision,
    when several are given) on the same observation and noise; the first configuration is the baseline of the
    comparison and accuracy blocks. With roofline_peaks ({"bf16_tflops", "bandwidth_gbs"} or {"measure": True} on a
    GPU) each configuration also gets the roofline of its stages.

    With rtc_modes, each real-time chunking mode is timed continuing a previous chunk: the runner's own first
    chunk with RTC_EXECUTED steps executed, and a delay of RTC_DELAY steps, so that every RTC operation runs.

    With a spec batch size above 1 (the largest of spec.batch_sizes), every stage runs on that many robots'
    observations at once (infer_batch); the first robot's is the single observation above, and its batched chunk
    is compared with the unbatched one ("batch_vs_single").
    """
    batch = max(spec.batch_sizes)
    if batch > 1 and rtc_modes:
        raise UsageError("real-time chunking runs at batch 1: drop --batch")
    if rtc_modes and len(denoise) > 1:
        raise UsageError("compare real-time chunking modes with one --denoise")
    spec = spec.replace(require_assets=False)  # timing only: no robot
    model = build_model(spec)  # one set of weights for every configuration; buffers and graphs for its views
    cfg = model.cfg
    obs = synthetic_observation(list(spec.cameras.served), cfg.vision.image_size, seed=spec.seed)
    noise = np.random.default_rng(spec.seed + 1).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    result = {"workload": {"preset": spec.preset, "cameras": spec.num_cameras, "prompt_tokens": cfg.max_token_len,
                           "denoise_steps": cfg.num_steps, "horizon": cfg.horizon, "action_dim": cfg.action_dim,
                           "batch": batch, "iters": iters, "weights": spec.checkpoint or f"random seed {spec.seed}"},
              "machine": machine_info(next(model.parameters()).device) | {"cpu_threads": torch.get_num_threads()},
              "backends": {}}
    if rtc_modes:
        defaults = {k: v for k, v in vars(RTCSettings()).items() if k != "mode"}
        result["workload"]["rtc"] = {"executed_steps": RTC_EXECUTED, "delay": RTC_DELAY} | defaults
    configs = [(b, d, m, v) for v in (vision or (spec.vision,)) for b in backends for d in (denoise or (spec.denoise,))
               for m in (rtc_modes or (None,))]
    choices = []
    for backend, den, mode, vis in configs:
        name = ((f"{backend}/{den}" if len(denoise) > 1 else backend) + ("" if mode is None else f"+rtc-{mode}")
                + (f"+vision-{vis}" if len(vision) > 1 or vis != "bf16" else ""))
        runner = build_runner(spec, model=model, backend=backend, denoise=den, vision=vis,
                              rtc=RTCSettings(mode) if mode else spec.rtc)
        actions = runner.infer(obs, noise=noise).actions
        fleet = {}
        if batch > 1:  # robot 0 sees the single observation; the others their own
            robots = [obs] + [synthetic_observation(list(spec.cameras.served), cfg.vision.image_size,
                                                    seed=spec.seed + 1 + i) for i in range(1, batch)]
            single = actions
            actions = runner.infer_batch(robots, [noise] * batch)[0].actions
            fleet = {"batch_vs_single": action_accuracy(actions, single)}
        cont = {}
        if mode not in (None, "off"):
            cont = {"prev_chunk": actions[RTC_EXECUTED:], "delay": RTC_DELAY}
            actions = runner.infer(obs, noise=noise, **cont).actions
        records = [(runner.infer_batch(robots)[0] if batch > 1 else runner.infer(obs, **cont)).latency
                   for _ in progress_bar(range(iters), enabled=spec.progress, desc=f"bench {name}", leave=False)]
        entry = summarize(records) | fleet | {"startup_ms": dict(runner.startup_ms), "note": runner.backend_note,
                                      "stages": {s: dataclasses.asdict(c) for s, c in runner.choices.items()},
                                      "actions": actions.tolist()}
        result["backends"][name] = entry
        choices.append(runner.choices)
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if roofline_peaks is not None:
        device = next(model.parameters()).device
        peaks = measure_peaks(device) if roofline_peaks.get("measure") else dict(roofline_peaks)
        peaks.setdefault("fp8_tflops", 2 * peaks["bf16_tflops"])  # FP8 tensor cores: twice bf16 on Hopper and Thor
        result["roofline_peaks"] = peaks
        for ran, entry in zip(choices, result["backends"].values(), strict=True):
            measured = {s: entry[s]["p50"] for s in ("vision", "embed_prefix", "prefill", "denoise")}
            entry["roofline"] = roofline(cfg, measured, peaks, prefill_fp8=ran["prefill"].impl in ("fp8", "tensorrt"),
                                         denoise_fp8=ran["denoise"].impl.endswith("fp8w"))
    first, *rest = result["backends"]
    for name in rest:
        result["backends"][name]["accuracy_vs_" + first] = action_accuracy(
            np.array(result["backends"][name]["actions"]), np.array(result["backends"][first]["actions"]))
    if rtc_modes:
        result["rtc"] = rtc_costs(result, backends, rtc_modes)
    return result


def ran_as(name: str, stages: dict[str, dict]) -> str:
    """A backend named by what its stages ran: its own name where the model is bf16 (a GPU); where it is not (a CPU
    runs float32), that dtype: 'float32' for bf16 and eager, 'fp8/float32' for fp8."""
    dtype = stages["vision"]["dtype"]
    if dtype == "bf16":
        return name
    return dtype if name.split("/")[0].split("+")[0] in ("bf16", "eager") else f"{name}/{dtype}"


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
    robots = f"batch of {w['batch']} robots, " if w.get("batch", 1) > 1 else ""
    lines = [f"pi-policy bench: {w['preset']}, {w['cameras']} cameras, {w['denoise_steps']} steps, {robots}"
             f"{w['iters']} iters on {m.get('gpu', m['device'])}"
             + (f", {threads_text(m['cpu_threads'])}" if "cpu_threads" in m else "") + f" (torch {m['torch']})"]
    names = list(result["backends"])
    label = {name: ran_as(name, result["backends"][name]["stages"]) for name in names}
    for name in names:
        e = result["backends"][name]
        title = f"backend {name}" if label[name] == name else \
            f"backend {name}, run as {label[name]}: on {m['device']} the model runs in float32 (bf16 needs a GPU)"
        lines += ["", stage_table(e, title + (f"  [{e['note']}]" if e["note"] else ""), w.get("batch", 1)),
                  f"start-up (warm-up + graph capture): {e['startup_ms'].get('warmup_and_capture', 0):.0f} ms",
                  action_stats(np.array(e["actions"]))]
        if "batch_vs_single" in e:
            acc = e["batch_vs_single"]
            lines.append(f"robot 0 batched vs alone (same observation and noise): max diff {acc['max_diff']:.2e}, "
                         f"relative error {acc['relative_error']:.1e}, cosine {acc['cosine']:.6f}")
    for name in names[1:]:
        base, cand = result["backends"][names[0]], result["backends"][name]
        acc = cand["accuracy_vs_" + names[0]]
        lines += ["", comparison_table(base, cand, label[names[0]], label[name]),
                  f"{label[name]} vs {label[names[0]]}: max diff {acc['max_diff']:.4f}, "
                  f"mean diff {acc['mean_diff']:.4f}, relative error {100 * acc['relative_error']:.2f}%, "
                  f"cosine {acc['cosine']:.6f}"]
    for name in names:
        if "roofline" in result["backends"][name]:
            lines += ["", f"backend {name}: " + format_roofline(result["backends"][name]["roofline"],
                                                                 result["roofline_peaks"])]
    for backend, costs in result.get("rtc", {}).items():
        w = result["workload"]["rtc"]
        cells = [f"{m} {c['denoise_p50_ms']:.2f} ms" + (f" ({c['vs_off']:.2f}x off)" if c["vs_off"] and m != "off"
                                                          else "") for m, c in costs.items()]
        lines += ["", f"real-time chunking, {backend}, denoise p50 (continuing a chunk with {w['executed_steps']} "
                      f"steps executed, delay {w['delay']}): " + "; ".join(cells)]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time each stage on the fixed benchmark workload",
                       description="Time each stage (p50/p99 over --iters inferences) of one or more configurations "
                                   "on the same observation and noise; the first configuration is the baseline of "
                                   "the comparison and accuracy blocks.")
    add_model_arguments(p, {"preset": None, "device": default_device()}, repeat=("--backend", "--denoise", "--vision"),
                        skip=("--batch-sizes",))
    # preset None: pi0 on a GPU, tiny on a CPU (building pi0 on a CPU takes minutes), decided in run()
    next(a for a in p._actions if a.dest == "preset").help += " (default: pi0 on a GPU, tiny on a CPU)"
    p.add_argument("--batch", type=int, default=1,
                   help="robots per inference: every stage on N observations at once, with the time per robot "
                        "beside the total (default 1)")
    p.add_argument("--rtc", action="append", choices=RTC_MODES,
                   help="real-time chunking mode; repeat to compare (e.g. --rtc off --rtc inpaint --rtc guided)")
    p.add_argument("--iters", type=int, default=200, help="timed inferences per backend (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the results here")
    add_compile_argument(p)
    p.add_argument("--roofline", action="store_true",
                   help="per stage: FLOPs and bytes, the floor on this GPU (peaks measured here, or --peak-*), the "
                        "achieved fraction, and a projection for Jetson Thor")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak for --roofline instead of measuring it")
    p.add_argument("--peak-gbs", type=float, help="memory bandwidth (GB/s) for --roofline instead of measuring it")
    add_fp8_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    spec = spec_from_args(args, batch_sizes=(args.batch,))
    if args.preset is None:  # the full-size model where it runs in milliseconds, the tiny one elsewhere
        spec = spec.replace(preset="pi0" if spec.device.startswith("cuda") else "tiny")
    print(f"pi-policy bench: building {spec.preset} on {spec.device} ({spec.checkpoint or 'random weights'}), then "
          f"{args.iters} timed inferences per configuration"
          + ("; a full-size model on a CPU takes minutes to build and seconds per inference"
             if not spec.preset.startswith("tiny") and not spec.device.startswith("cuda") else ""), flush=True)
    result = run_bench(spec, tuple(args.backend or [spec.backend]), tuple(args.denoise or ()),
                       tuple(dict.fromkeys(args.rtc or ())), args.iters, roofline_peaks(args),
                       tuple(dict.fromkeys(args.vision or ())))
    print(format_result(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def roofline_peaks(args: argparse.Namespace) -> dict | None:
    if not args.roofline:
        return None
    if args.peak_tflops and args.peak_gbs:
        return {"name": "given peaks", "source": "--peak-tflops/--peak-gbs", "bf16_tflops": args.peak_tflops,
                "bandwidth_gbs": args.peak_gbs}
    if not args.device.startswith("cuda"):
        raise UsageError("--roofline measures the GPU's peaks; on a CPU give --peak-tflops and --peak-gbs")
    return {"measure": True}
