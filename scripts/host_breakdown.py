"""Where the host's time goes in PolicyRunner.infer: input preparation, stage launches, waiting, output."""

import argparse
import time

import numpy as np
import torch

from pi_policy.cameras import DEFAULT_CAMERAS, CameraSet
from pi_policy.runtime import build_runner
from pi_policy.tools.synthetic import synthetic_observation

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="pi0")
parser.add_argument("--iters", type=int, default=50)
parser.add_argument("--compile", default=None, help="'none' to skip torch.compile")
parser.add_argument("--cameras", type=int, default=3, help="camera views the runner is built for")
args = parser.parse_args()

cams = list(DEFAULT_CAMERAS[: args.cameras])
runner = build_runner(preset=args.preset, device="cuda", progress=False, cameras=CameraSet.of(cams),
                      compile_stages=() if args.compile == "none" else None)
obs = synthetic_observation(cams, 224, seed=0)
parts = {"prep": [], "launch": [], "wait": [], "post": [], "host_total": [], "gpu_total": []}
for i in range(args.iters + 5):
    t0 = time.perf_counter()
    runner.load_inputs(obs, None)
    t1 = time.perf_counter()
    runner.timer.start()
    for name, fn in runner.stages.items():
        runner.timer.run(name, runner.graphs[name].replay if name in runner.graphs else fn)
    t2 = time.perf_counter()
    stages = runner.timer.read()
    t3 = time.perf_counter()
    runner.buf.host_actions.copy_(runner.buf.actions)
    runner.normalizer.unnormalize_actions(runner.buf.host_actions[0].numpy())
    t4 = time.perf_counter()
    if i >= 5:
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=False):
            parts[k].append(v * 1e3)
        parts["gpu_total"].append(sum(stages.values()))
print(f"{args.preset}, {args.cameras} views, {torch.cuda.get_device_name()}: ms p50 / p99")
for k, v in parts.items():
    print(f"  {k:<10} {np.percentile(v, 50):8.3f} {np.percentile(v, 99):8.3f}")
