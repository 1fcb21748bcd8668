"""`pi-policy serve --ray`: the openpi protocol on Ray Serve, on a local CPU Ray cluster with two runner replicas."""

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from test_serve import ROOT, TINY, libero_request, make_runner, noise

from pi_policy.serve.config import load_serve_config

ROUNDING = 1e-6  # a row batched with others vs alone: the last bit of float32 (test_batch.py says why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_every_client_and_both_are_used(tmp_path):
    # skipped here, not at import: a module-level skip would stop launch_testing's collection of the other modules
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install -e ".[serve-ray]")')
    config = tmp_path / "serve_ray.yaml"
    config.write_text((ROOT / "config" / "serve_libero.yaml").read_text() + "  replicas: 2\n  max_wait_ms: 20\n")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="local",  # a fresh local cluster, not one running here
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pi_policy", "serve", "--ray", "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port), *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving tiny on Ray Serve at ws://127.0.0.1:{port} (2 replicas on cpu"), \
            line + proc.stderr.read()
        torch.set_num_threads(1)  # as in each replica, for the same float32 rounding
        direct = make_runner(load_serve_config(config, TINY))
        clients, requests = 4, 3
        cases = {(c, i): libero_request(np.random.default_rng(10 * c + i)) for c in range(clients)
                 for i in range(requests)}
        expected = {k: direct.infer(obs, noise(k[0] * 10 + k[1])).actions for k, (_, obs) in cases.items()}
        replies, errors = {}, []

        def run(c: int) -> None:
            try:
                policy = WebsocketClientPolicy("127.0.0.1", port)
                assert policy.get_server_metadata()["server"] == "pi_policy"
                for i in range(requests):
                    replies[c, i] = policy.infer(cases[c, i][0] | {"noise": noise(10 * c + i)})
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and len(replies) == clients * requests
        for key, reply in replies.items():
            np.testing.assert_allclose(reply["actions"], expected[key], rtol=0, atol=ROUNDING)
            assert reply["server_timing"]["batch_size"] >= 1 and reply["policy_timing"]["total_ms"] > 0
        assert len({r["server_timing"]["replica"] for r in replies.values()}) == 2  # both replicas served
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            assert response.status == 200
        no_state = {k: v for k, v in cases[0, 0][0].items() if k != "observation/state"}
        with pytest.raises(RuntimeError, match="bad request: missing state 'observation/state'"):
            WebsocketClientPolicy("127.0.0.1", port).infer(no_state)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
