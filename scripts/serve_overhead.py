"""What the server adds to one client's inference: round trip over loopback vs the runner's in-process infer.

The runner is built on the server's worker thread; first N direct `infer` calls on that thread (the time a
program calling the runner itself would see), then the same runner is served on 127.0.0.1 and a separate
client process (openpi's own client, as on a robot; one process would share the GIL with the server) makes
N round trips. Each reply carries the server's infer time of that very request, so overhead = round trip -
server infer is measured per request. Three 224x224 cameras and a 14-value state, as in `pi-policy bench`.
Random weights unless --checkpoint.

    python scripts/serve_overhead.py --preset pi0 --device cuda --iters 200
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.node.params import NodeParams
from pi_policy.runtime import build_runner
from pi_policy.serve.config import ServeConfig
from pi_policy.serve.server import PolicyServer
from pi_policy.tools.synthetic import synthetic_observation

KEYS = {f"observation/{name}": name for name in DEFAULT_CAMERAS}


def observation():
    obs = synthetic_observation(DEFAULT_CAMERAS, 224, 14, seed=0)
    request = {key: obs.images[name] for key, name in KEYS.items()}
    return obs, request | {"observation/state": obs.state, "prompt": obs.prompt}


def stats(values) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(np.mean(values))}


def client(port: int, warmup: int, iters: int) -> None:
    """The client process: round trips, printed as one JSON line of (round trip, server infer) pairs."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy, request = WebsocketClientPolicy("127.0.0.1", port), observation()[1]
    pairs = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        reply = policy.infer(request)
        if i >= warmup:
            pairs.append(((time.perf_counter() - t0) * 1e3, reply["server_timing"]["infer_ms"]))
    print(json.dumps(pairs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="bf16")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10, help="calls before timing, each way")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a busy CPU")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--client-of", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the client process
    args = p.parse_args()
    if args.client_of:
        return client(args.client_of, args.warmup, args.iters)
    if args.threads:
        torch.set_num_threads(args.threads)  # before the worker thread first runs torch, which then keeps it

    # Built directly rather than from a file: a benchmark of random weights, which validation refuses for pi0.
    params = NodeParams(preset=args.preset, checkpoint=args.checkpoint, device=args.device, backend=args.backend,
                        joint_names=[f"j{i}" for i in range(14)], action_dim=14, prompt="")
    cfg = ServeConfig(params, dict(KEYS), ["observation/state"], host="127.0.0.1", port=0)
    server = PolicyServer(lambda: build_runner(params.runner_spec()), cfg)
    obs = observation()[0]

    def direct(n: int) -> list[float]:  # on the worker thread, where the server calls the runner
        times = []
        for _ in tqdm(range(n), desc="in-process infer", leave=False):
            t0 = time.perf_counter()
            server.runner.infer(obs)
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    server.pool.submit(direct, args.warmup).result()
    infer_ms = server.pool.submit(direct, args.iters).result()
    server.start()
    print(f"{args.warmup + args.iters} round trips from a client process ...", flush=True)
    cmd = [sys.executable, __file__, "--client-of", str(server.port), "--warmup", str(args.warmup),
           "--iters", str(args.iters)]
    pairs = np.array(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    server.stop()
    rtt, served = pairs[:, 0], pairs[:, 1]

    figures = {"preset": args.preset, "device": str(server.runner.device), "backend": args.backend,
               "iters": args.iters, "backends": server.metadata["backends"],
               "in_process_infer_ms": stats(infer_ms), "round_trip_ms": stats(rtt),
               "server_infer_ms": stats(served), "overhead_ms": stats(rtt - served)}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name()
    print(f"{args.preset} on {figures.get('gpu', figures['device'])}, {args.iters} calls each way")
    for key, label in (("in_process_infer_ms", "in-process infer"), ("round_trip_ms", "client round trip"),
                       ("server_infer_ms", "server's infer (same requests)"),
                       ("overhead_ms", "overhead = round trip - server's infer")):
        print(f"  {label:40s} p50 {figures[key]['p50']:8.3f} ms   p99 {figures[key]['p99']:8.3f} ms")
    gap = figures["round_trip_ms"]["p50"] - figures["in_process_infer_ms"]["p50"]
    print(f"  round trip p50 - in-process p50: {gap:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
