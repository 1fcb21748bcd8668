"""`pi-policy serve`: one runner behind openpi's websocket protocol, for openpi clients and robots without ROS."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time

from pi_policy.tools.flags import CONFIG_FLAGS, add_config_overrides, param_overrides

API_KEY_ENV = "PI_POLICY_API_KEY"
SERVE_FLAGS = ("max_batch", "max_wait_ms", "max_queue_ms", "replicas")  # --max-batch ...: the serve section's keys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the policy to openpi clients over websockets",
                              description="Serve the policy with openpi's websocket protocol: "
                                          "WebsocketClientPolicy(host, port).infer(obs) works unchanged.")
    p.add_argument("--config", required=True,
                   help="node parameter file with a 'serve:' section, e.g. config/serve_libero.yaml")
    p.add_argument("--host", help="interface to listen on (default: the config's, else 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port, 0 = any free one (default: the config's, else 8000)")
    add_config_overrides(p, CONFIG_FLAGS)
    p.add_argument("--max-batch", type=int, help="override the serve section's max_batch (requests run together)")
    p.add_argument("--max-wait-ms", type=float, help="override the serve section's max_wait_ms")
    p.add_argument("--max-queue-ms", type=float, help="override the serve section's max_queue_ms")
    p.add_argument("--replicas", type=int, help="override the serve section's replicas (--ray)")
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: one runner replica per GPU of the Ray cluster (RAY_ADDRESS, or the one "
                        "`ray start` runs here, else a new local one); pip install -e \".[serve-ray]\"")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help="environment variable holding the API key; when it is set, clients must send "
                        "'Authorization: Api-Key <key>' (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pi_policy.serve.config import load_serve_config
    from pi_policy.serve.server import PolicyServer, build_serve_runner

    cfg = load_serve_config(args.config, param_overrides(args), {k: getattr(args, k) for k in SERVE_FLAGS
                                                                 if getattr(args, k) is not None})
    cfg.host = args.host if args.host is not None else cfg.host
    cfg.port = args.port if args.port is not None else cfg.port
    try:  # before the model loads, which can take minutes
        if cfg.port:
            socket.create_server((cfg.host, cfg.port)).close()
    except OSError as e:
        raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    api_key = os.environ.get(args.api_key_env) or None
    if args.ray:
        return run_ray(cfg, api_key, args.api_key_env)
    server = PolicyServer(lambda: build_serve_runner(cfg), cfg, api_key)
    r = server.runner

    def ready(port: int) -> None:
        cams = ", ".join(f"{k} -> {v}" for k, v in cfg.images.items())
        print(f"serving {server.metadata['preset']} on {cfg.params.device} at ws://{cfg.host}:{port} "
              f"(health: http://{cfg.host}:{port}/healthz; API key "
              f"{'required, from $' + args.api_key_env if api_key else 'not required'})\n"
              f"  cameras: {cams}\n  state: {' + '.join(cfg.state)} ({len(cfg.params.joint_names)} values); "
              f"prompt: '{cfg.prompt}'; actions: {r.horizon} x {r.action_dim}\n"
              f"  batches of up to {server.max_batch} requests (max_wait_ms {cfg.max_wait_ms:g}, "
              f"max_queue_ms {cfg.max_queue_ms:g})", flush=True)

    try:  # Ctrl-C, `docker stop`, systemd: clients are told the server is going away (1001)
        asyncio.run(server.run(ready, stop_signals=(signal.SIGINT, signal.SIGTERM)))
        print("stopped", flush=True)
    finally:
        server.pool.shutdown(wait=False, cancel_futures=True)
    return 0


def run_ray(cfg, api_key: str | None, api_key_env: str) -> int:
    """The same protocol on Ray Serve: start (or join) Ray, deploy the application, serve until SIGTERM or Ctrl-C."""
    import logging

    import ray
    from ray import serve

    from pi_policy.serve.ray_app import build_app, replica_count

    if not cfg.port:
        raise ValueError("--ray needs a fixed --port (Ray Serve's proxy does not pick a free one)")
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `docker stop`, systemd: stop as Ctrl-C does
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg, api_key), name="pi_policy", route_prefix="/")
        replicas = replica_count(cfg)
        print(f"serving {cfg.params.preset} on Ray Serve at ws://{cfg.host}:{cfg.port} ({replicas} replica"
              f"{'s' if replicas != 1 else ''} on {cfg.params.device}, batches of up to {cfg.max_batch}; health: "
              f"http://{cfg.host}:{cfg.port}/healthz; API key "
              f"{'required, from $' + api_key_env if api_key else 'not required'})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
