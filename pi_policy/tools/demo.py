"""`pi-policy demo`: the whole pipeline on the built-in tiny model, synthetic cameras and joint states."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pi_policy.runtime import build_runner
from pi_policy.runtime.spec import RunnerSpec
from pi_policy.runtime.stats import action_stats, stage_table, summarize
from pi_policy.tools.flags import add_model_arguments, spec_from_args
from pi_policy.tools.synthetic import synthetic_observation


def run_demo(spec: RunnerSpec | None = None, iters: int = 20, out: str | Path | None = "reports/demo") -> dict:
    """Synthetic observations through every stage (latency table, action statistics); then, with `out`,
    a generated rosbag replayed through the node's own logic into an evaluation report."""
    t0 = time.perf_counter()
    spec = spec or RunnerSpec()
    preset, device, seed, progress = spec.preset, spec.device, spec.seed, spec.progress
    runner = build_runner(spec)
    if runner.backend_note:
        print(f"note: {runner.backend_note}")
    cfg = runner.cfg
    print(f"model {cfg.name}: {sum(p.numel() for p in runner.model.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.num_cameras} cameras x {cfg.vision.num_tokens} tokens + {cfg.max_token_len} prompt tokens, "
          f"{cfg.num_steps} denoise steps, horizon {cfg.horizon} on {device}; "
          f"start-up {time.perf_counter() - t0:.1f} s")
    names = runner.camera_names
    records, actions = [], None
    rng = np.random.default_rng(seed)
    for i in tqdm(range(iters), desc="demo", disable=not progress, leave=False):
        # A robot arm drifting through a slow sinusoid, seen by all cameras.
        obs = synthetic_observation(names, 240, 14, seed + i)
        obs.state = (0.5 * np.sin(0.1 * i + np.arange(14)) + 0.01 * rng.standard_normal(14)).astype(np.float32)
        output = runner.infer(obs)
        records.append(output.latency)
        actions = output.actions
    summary = summarize(records[1:] if len(records) > 1 else records)
    print(stage_table(summary, f"per-stage latency over {summary['iters']} inferences"))
    print(action_stats(actions))
    result = {"summary": summary, "actions": actions}
    if out is not None:
        result["bag_metrics"] = replay_demo_bag(runner, Path(out), preset, device, seed, progress)
    return result


def replay_demo_bag(runner, out: Path, preset: str, device: str, seed: int, progress: bool) -> dict:
    from pi_policy.bag.demo_bag import ACTION_TOPIC, DemoSpec, demo_params, write_demo_bag
    from pi_policy.bag.replay import evaluate
    from pi_policy.bag.report import format_summary, write_report
    from pi_policy.bag.setup import ReplaySetup
    from pi_policy.node.params import params_from_dict

    bag = out / "demo_bag"
    if bag.exists():
        shutil.rmtree(bag)
    out.mkdir(parents=True, exist_ok=True)
    write_demo_bag(bag, "mcap", DemoSpec(seed=seed))
    print(f"\nwrote a synthetic rosbag2 (3 cameras, joint states, prompt, recorded actions): {bag}")
    # The replay's topics and timing; the model is `runner`, whatever its preset.
    params = params_from_dict(demo_params("tiny", "cpu"))
    settings = ReplaySetup(params, action_topic=ACTION_TOPIC)
    ev = evaluate(bag, settings, lambda backend: runner, [runner.backends["prefill"]], progress=progress)
    metrics = write_report(ev, out / "report", meta={"command": "pi-policy demo", "preset": preset,
                                                     "device": device, "seed": seed})
    print(format_summary(metrics, out / "report"))
    return metrics


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a tiny built-in model (CPU, seconds)",
                       description="The whole pipeline on a model preset (tiny on a CPU by default): synthetic "
                                   "cameras and joint states through every stage, then a generated rosbag replayed "
                                   "through the node's logic into an evaluation report.")
    add_model_arguments(p, {"preset": "tiny", "device": "cpu"}, skip=("--backend", "--engine"), cameras=False)
    p.add_argument("--iters", type=int, default=20, help="inferences on synthetic inputs (default: %(default)s)")
    p.add_argument("--out", default="reports/demo", help="where the generated bag and its report go")
    p.add_argument("--no-bag", action="store_true", help="skip the rosbag replay")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"pi-policy demo: error: --device {spec.device} but torch sees no CUDA GPU (use --device cpu)",
              file=sys.stderr)
        return 2
    run_demo(spec, args.iters, out=None if args.no_bag else args.out)
    return 0
