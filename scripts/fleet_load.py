"""Fleet load test of `pi-policy serve`: N simulated robots, each with openpi's client at its own control rate.

Each robot sends an observation at every tick of its clock (its rate, from a random phase) and waits for the
chunk, as a robot's control loop does; a reply later than the deadline (default: the robot's period) is a
deadline miss, and the ticks that pass while it waits are skipped. Reported per robot: requests, round trip
p50/p99, deadline misses, skipped ticks; for the server: the batch sizes it ran, queue p50/p99, throughput and
"server busy" answers. Without --port it starts `pi-policy serve` itself on the loopback interface (random
weights, config/serve_libero.yaml; tiny preset on the CPU by default, `--preset pi0 --device cuda` on a GPU host);
with --port it drives a server already running.

    python scripts/fleet_load.py --robots 8 --rate 10 --duration 30 --max-batch 8
    python scripts/fleet_load.py --preset pi0 --device cuda --robots 8 --rate 10 --json fleet.json
    python scripts/fleet_load.py --robots 8 --rates 5,10,20 --host gpu-host --port 8000 --json fleet.json

Exit status 1 when a request failed (other than "server busy") or no request was answered.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from tqdm import tqdm

from pi_policy.serve.config import load_serve_config

ROOT = Path(__file__).resolve().parents[1]
RANDOM_WEIGHTS = {"checkpoint": "", "norm_stats": "", "tokenizer": ""}


def make_request(cfg, rng: np.random.Generator, size: int) -> dict:
    """A request for the config's key mapping: random camera frames, a state split over its keys, the prompt."""
    request = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in cfg.images}
    n, keys = len(cfg.params.joint_names), len(cfg.state)
    for j, key in enumerate(cfg.state):  # the values split over the keys; only their total is checked
        request[key] = rng.uniform(-1, 1, n // keys + (j == keys - 1) * (n % keys))
    request[cfg.prompt] = "pick up the bowl"
    return request


def server_settings(args: argparse.Namespace) -> dict:
    """What the started server changes in its config: the preset and device asked for, random weights."""
    return RANDOM_WEIGHTS | {"preset": args.preset, "device": args.device}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pi_policy", "serve", "--config", args.config, "--host", "127.0.0.1", "--port", "0",
           "--preset", args.preset, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue-ms", str(args.max_queue_ms),
           *sum((["--set", f"{k}={v}"] for k, v in server_settings(args).items() if k != "preset"), [])]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in server.stdout:  # a GPU server builds, compiles and warms up first, and may say so
        if "ws://127.0.0.1:" in line:
            return server, int(line.split("ws://127.0.0.1:")[1].split()[0])
        print(line, end="", file=sys.stderr)
    server.wait()
    raise SystemExit(f"server did not start (exit {server.returncode}): its error is above")


class Robot:
    """One robot's control loop against the server, with its own clock."""

    def __init__(self, index: int, rate: float, deadline_ms: float, request: dict):
        self.index, self.rate, self.deadline_ms, self.request = index, rate, deadline_ms, request
        self.rtt_ms: list[float] = []
        self.misses = self.skipped = self.busy = 0
        self.batch_sizes: list[int] = []
        self.queue_ms: list[float] = []
        self.errors: list[str] = []

    def run(self, host: str, port: int, start: float, stop: float, phase: float, done) -> None:
        try:
            policy = WebsocketClientPolicy(host, port)
        except Exception as e:  # noqa: BLE001 - reported
            self.errors.append(f"connect: {type(e).__name__}: {e}")
            return
        period = 1.0 / self.rate
        tick = start + phase * period
        while tick < stop:
            time.sleep(max(0.0, tick - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                reply = policy.infer(self.request)
            except RuntimeError as e:
                if "server busy" in str(e):
                    self.busy += 1
                else:
                    self.errors.append(str(e).splitlines()[-1])
                    return
            else:
                rtt = (time.perf_counter() - t0) * 1e3
                self.rtt_ms.append(rtt)
                self.misses += rtt > self.deadline_ms
                self.batch_sizes.append(int(reply["server_timing"]["batch_size"]))
                self.queue_ms.append(float(reply["server_timing"]["queue_ms"]))
                done()
            late = int((time.perf_counter() - tick) // period)  # ticks that passed while waiting
            self.skipped += late
            tick += (late + 1) * period

    def summary(self) -> dict:
        rtt = np.asarray(self.rtt_ms) if self.rtt_ms else np.full(1, np.nan)
        return {"robot": self.index, "rate_hz": self.rate, "deadline_ms": self.deadline_ms,
                "answered": len(self.rtt_ms), "round_trip_ms": {"p50": float(np.percentile(rtt, 50)),
                                                                "p99": float(np.percentile(rtt, 99))},
                "deadline_misses": self.misses, "skipped_ticks": self.skipped, "server_busy": self.busy,
                "errors": self.errors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--robots", type=int, default=8)
    p.add_argument("--rate", type=float, default=10.0, help="control rate of every robot, Hz (default 10)")
    p.add_argument("--rates", help="comma-separated rates in Hz, cycled over the robots (e.g. 5,10,20)")
    p.add_argument("--deadline-ms", type=float, help="a reply later than this is a miss (default: the period)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="a running server; without it one is started here")
    p.add_argument("--config", default=str(ROOT / "config" / "serve_libero.yaml"))
    p.add_argument("--preset", default="tiny", help="the started server's preset (default tiny)")
    p.add_argument("--device", default="cpu", help="the started server's device (default cpu; a GPU: cuda)")
    p.add_argument("--max-batch", type=int, default=8, help="the started server's max_batch")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="the started server's max_wait_ms")
    p.add_argument("--max-queue-ms", type=float, default=10000.0, help="the started server's max_queue_ms")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server (default 1)")
    p.add_argument("--size", type=int, default=224, help="camera image side, pixels (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if args.robots < 1 or args.duration <= 0:
        raise SystemExit("--robots must be >= 1 and --duration > 0")
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    if any(r <= 0 for r in rates):
        raise SystemExit(f"rates must be > 0 Hz, got {rates}")

    cfg = load_serve_config(args.config, server_settings(args))
    rng = np.random.default_rng(args.seed)
    robots = [Robot(i, rates[i % len(rates)], args.deadline_ms or 1e3 / rates[i % len(rates)],
                    make_request(cfg, rng, args.size)) for i in range(args.robots)]
    server, port = (None, args.port) if args.port else start_server(args)
    try:
        WebsocketClientPolicy(args.host, port).infer(robots[0].request)  # warm: not counted
        expected = sum(r.rate for r in robots) * args.duration
        bar = tqdm(total=int(expected), desc="requests", unit="req", disable=not sys.stderr.isatty())
        lock = threading.Lock()

        def done() -> None:
            with lock:
                bar.update()

        start = time.perf_counter() + 0.5
        stop = start + args.duration
        threads = [threading.Thread(target=r.run, args=(args.host, port, start, stop, rng.uniform(), done))
                   for r in robots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        bar.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)

    per_robot = [r.summary() for r in robots]
    sizes = collections.Counter(s for r in robots for s in r.batch_sizes)
    queue = np.asarray([q for r in robots for q in r.queue_ms]) if sizes else np.full(1, np.nan)
    answered = sum(len(r.rtt_ms) for r in robots)
    figures = {
        "robots": args.robots, "rates_hz": [r.rate for r in robots], "duration_s": args.duration,
        "server": f"{args.host}:{port}" if server is None else
        {"preset": args.preset, "device": args.device, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
         "max_queue_ms": args.max_queue_ms, "threads": args.threads},
        "image_size": args.size, "cameras": len(cfg.images), "answered": answered,
        "throughput_rps": answered / wall, "deadline_misses": sum(r.misses for r in robots),
        "skipped_ticks": sum(r.skipped for r in robots), "server_busy": sum(r.busy for r in robots),
        "errors": [e for r in robots for e in r.errors],
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "mean_batch_size": float(sum(k * v for k, v in sizes.items()) / max(1, answered)),
        "server_queue_ms": {"p50": float(np.percentile(queue, 50)), "p99": float(np.percentile(queue, 99))},
        "per_robot": per_robot,
    }
    print(f"{args.robots} robots for {args.duration:g} s: {answered} answered ({figures['throughput_rps']:.1f}/s), "
          f"{figures['deadline_misses']} deadline misses, {figures['skipped_ticks']} skipped ticks, "
          f"{figures['server_busy']} server busy, {len(figures['errors'])} errors")
    print("| robot | rate Hz | deadline ms | answered | p50 ms | p99 ms | misses | skipped |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in per_robot:
        print(f"| {r['robot']} | {r['rate_hz']:g} | {r['deadline_ms']:.0f} | {r['answered']} | "
              f"{r['round_trip_ms']['p50']:.1f} | {r['round_trip_ms']['p99']:.1f} | {r['deadline_misses']} | "
              f"{r['skipped_ticks']} |")
    print(f"server batch sizes (answers per size): {figures['batch_sizes']}, mean {figures['mean_batch_size']:.2f}; "
          f"queue p50 {figures['server_queue_ms']['p50']:.1f} ms, p99 {figures['server_queue_ms']['p99']:.1f} ms")
    for e in figures["errors"][:5]:
        print(e)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if answered and not figures["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
