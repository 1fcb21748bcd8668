"""Profile one inference per stage (eager) and print the top CUDA kernels: where the time goes."""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.runtime import build_runner
from pi_policy.tools.synthetic import synthetic_observation

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="pi0")
parser.add_argument("--rows", type=int, default=12)
parser.add_argument("--compile", default="", help="comma-separated stages to torch.compile")
args = parser.parse_args()

runner = build_runner(preset=args.preset, device="cuda", backend="eager", progress=False,
                      compile_stages=tuple(s for s in args.compile.split(",") if s))
obs = synthetic_observation(DEFAULT_CAMERAS, 224)
runner.infer(obs)
for name, fn in runner.stages.items():
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 1e3
    launches = sum(e.count for e in events if e.device_time_total > 0)
    print(f"\n== {name}: {total:.2f} ms of kernels, {launches} kernel launches")
    print(events.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))
