"""Load test of `pi-policy serve` on the loopback interface: C concurrent openpi clients x R requests each.

Starts the real command in a subprocess (tiny preset on the CPU by default, config/serve_libero.yaml), then
checks that every request is answered with the actions a direct runner call gives for that client's observation
and noise (exactly when the server runs one request at a time, --max-batch 1; to float32 rounding when it batches
them), so a crossed or stale answer is caught, and reports the round trip p50/p99 and the
server's resident memory over the run. Exit status 1 when a request fails or an answer does not match.

    python scripts/serve_load_test.py --clients 8 --requests 200
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from tqdm import tqdm

from pi_policy.runtime import build_runner
from pi_policy.serve.config import load_serve_config
from pi_policy.serve.keymap import to_observation

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = 4  # distinct observations per client, cycled


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_case(cfg, seed: int, size: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    request = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in cfg.images}
    request |= {key: rng.uniform(-1, 1, 8) for key in cfg.state}
    request[cfg.prompt] = "pick up the bowl"
    noise = rng.standard_normal((50, 32)).astype(np.float32)
    return request, noise


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--config", default=str(ROOT / "config" / "serve_libero.yaml"))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=224, help="camera image side, pixels")
    p.add_argument("--max-batch", type=int, default=8, help="the server's max_batch (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server and here (default: 1)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    overrides = {"preset": args.preset, "checkpoint": "", "norm_stats": "", "tokenizer": "", "device": "cpu"}
    cfg = load_serve_config(args.config, overrides)
    if len(cfg.state) != 1 or len(cfg.params.joint_names) != 8:
        raise SystemExit("this script builds LIBERO-style requests: one 8-value state key")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pi_policy", "serve", "--config", args.config, "--host", "127.0.0.1",
           "--port", "0", "--max-batch", str(args.max_batch),
           *sum((["--set", f"{k}={v}"] for k, v in overrides.items()), [])]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = server.stdout.readline()
        if "ws://127.0.0.1:" not in line:
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])

        # The expected answers, from a runner built as the server builds its own.
        torch.set_num_threads(args.threads)
        runner = build_runner(cfg.params.runner_spec().replace(progress=False))
        cases, expected = {}, {}
        for c in range(args.clients):
            for v in range(VARIANTS):
                request, noise = make_case(cfg, 1000 * c + v, args.size)
                cases[c, v] = request | {"noise": noise}
                expected[c, v] = runner.infer(to_observation(request, cfg)[0], noise).actions

        tolerance = 0.0 if args.max_batch == 1 else 1e-6  # batched rows: float32 rounding (docs/serve.md)
        clients = [WebsocketClientPolicy("127.0.0.1", port) for _ in range(args.clients)]
        for c, client in enumerate(clients):  # warm: one request each, not counted
            client.infer(cases[c, 0])
        rss = [(0, rss_mb(server.pid))]
        rtt = [[] for _ in range(args.clients)]
        queue_ms, infer_ms, mismatches, errors = [], [], [], []
        done = tqdm(total=args.clients * args.requests, desc="requests")
        lock = threading.Lock()

        def run(c: int) -> None:
            try:
                for i in range(args.requests):
                    t0 = time.perf_counter()
                    reply = clients[c].infer(cases[c, i % VARIANTS])
                    rtt[c].append((time.perf_counter() - t0) * 1e3)
                    if not np.allclose(reply["actions"], expected[c, i % VARIANTS], rtol=0, atol=tolerance):
                        mismatches.append((c, i))
                    with lock:
                        queue_ms.append(reply["server_timing"]["queue_ms"])
                        infer_ms.append(reply["server_timing"]["infer_ms"])
                        done.update()
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"client {c}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=run, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            rss.append((done.n, rss_mb(server.pid)))
        wall = time.perf_counter() - t0
        done.close()
        rss.append((done.n, rss_mb(server.pid)))
    finally:
        server.terminate()
        server.wait(timeout=30)

    answered = sum(len(r) for r in rtt)
    all_rtt = np.concatenate([np.asarray(r) for r in rtt]) if answered else np.zeros(1)
    mem = np.array([m for _, m in rss])
    settled = next(m for n, m in rss if n >= answered / 10)  # the allocator grows over the first requests
    figures = {
        "clients": args.clients, "requests_per_client": args.requests, "preset": args.preset,
        "image_size": args.size, "threads": args.threads, "answered": answered,
        "expected": args.clients * args.requests, "mismatched": len(mismatches), "errors": errors,
        "wall_s": wall, "throughput_rps": answered / wall,
        "round_trip_ms": {"p50": float(np.percentile(all_rtt, 50)), "p99": float(np.percentile(all_rtt, 99))},
        "server_infer_ms": {"p50": float(np.percentile(infer_ms, 50)), "p99": float(np.percentile(infer_ms, 99))},
        "server_queue_ms": {"p50": float(np.percentile(queue_ms, 50)), "p99": float(np.percentile(queue_ms, 99))},
        "server_rss_mb": {"after_warmup": float(mem[0]), "at_10pct": float(settled), "end": float(mem[-1]),
                          "min": float(mem.min()),
                          "max": float(mem.max()), "samples": len(mem),
                          "series": [[n, round(mb, 1)] for n, mb in rss]},  # (requests answered, MB)
    }
    print(f"{answered}/{figures['expected']} answered, {len(mismatches)} mismatched, {len(errors)} errors, "
          f"{wall:.1f} s, {figures['throughput_rps']:.1f} requests/s")
    for key in ("round_trip_ms", "server_infer_ms", "server_queue_ms"):
        print(f"{key:16s} p50 {figures[key]['p50']:8.2f}  p99 {figures[key]['p99']:8.2f}")
    m = figures["server_rss_mb"]
    print(f"server RSS MB: after warm-up {m['after_warmup']:.1f}, at 10% of requests {m['at_10pct']:.1f}, "
          f"end {m['end']:.1f}, range [{m['min']:.1f}, {m['max']:.1f}] over {m['samples']} samples")
    for e in errors[:5]:
        print(e)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if answered == figures["expected"] and not mismatches and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
