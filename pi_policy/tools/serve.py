"""`pi-policy serve`: one runner behind openpi's websocket protocol, for openpi clients and robots without ROS."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

from pi_policy.tools.flags import CONFIG_FLAGS, add_config_overrides, param_overrides

API_KEY_ENV = "PI_POLICY_API_KEY"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the policy to openpi clients over websockets",
                              description="Serve the policy with openpi's websocket protocol: "
                                          "WebsocketClientPolicy(host, port).infer(obs) works unchanged.")
    p.add_argument("--config", required=True,
                   help="node parameter file with a 'serve:' section, e.g. config/serve_libero.yaml")
    p.add_argument("--host", help="interface to listen on (default: the config's, else 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port, 0 = any free one (default: the config's, else 8000)")
    add_config_overrides(p, CONFIG_FLAGS)
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help="environment variable holding the API key; when it is set, clients must send "
                        "'Authorization: Api-Key <key>' (default: %(default)s)")
    p.set_defaults(func=run)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from pi_policy.runtime import build_runner
    from pi_policy.serve.config import load_serve_config
    from pi_policy.serve.server import PolicyServer

    cfg = load_serve_config(args.config, param_overrides(args))
    cfg.host = args.host if args.host is not None else cfg.host
    cfg.port = args.port if args.port is not None else cfg.port
    try:  # before the model loads, which can take minutes
        if cfg.port:
            socket.create_server((cfg.host, cfg.port)).close()
    except OSError as e:
        raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    api_key = os.environ.get(args.api_key_env) or None
    server = PolicyServer(lambda: build_runner(cfg.params.runner_spec()), cfg, api_key)
    r = server.runner

    def ready(port: int) -> None:
        cams = ", ".join(f"{k} -> {v}" for k, v in cfg.images.items())
        print(f"serving {server.metadata['preset']} on {cfg.params.device} at ws://{cfg.host}:{port} "
              f"(health: http://{cfg.host}:{port}/healthz; API key "
              f"{'required, from $' + args.api_key_env if api_key else 'not required'})\n"
              f"  cameras: {cams}\n  state: {' + '.join(cfg.state)} ({len(cfg.params.joint_names)} values); "
              f"prompt: '{cfg.prompt}'; actions: {r.horizon} x {r.action_dim}", flush=True)

    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd: stop as Ctrl-C does
    try:
        asyncio.run(server.run(ready))
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.pool.shutdown(wait=False, cancel_futures=True)
    return 0
