"""`pi-policy serve` for a fleet: requests from many openpi clients batched into one runner call, each connection's
order kept, a bound on waiting, and clients that send garbage or huge frames kept out of the others' way."""

import contextlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from test_serve import ROOT, TINY, GatedRunner, libero_request, make_runner, noise, serving, wait_for
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from pi_policy.node.params import ParamError
from pi_policy.serve.config import load_serve_config
from pi_policy.serve.protocol import unpack

WebsocketClientPolicy = pytest.importorskip(
    "openpi_client.websocket_client_policy",
    reason='openpi\'s client is not installed (pip install -e ".[openpi]"; kept out of [test]: it pins numpy < 2)',
).WebsocketClientPolicy

ROUNDING = 1e-6  # a row batched with others vs alone: the last bit of float32 (test_batch.py says why)


def config(**serve):
    cfg = load_serve_config(ROOT / "config" / "serve_libero.yaml", TINY)
    cfg.host, cfg.port = "127.0.0.1", 0
    cfg.max_clients = 64  # openpi's client has no close(): the tests' clients stay connected until the module ends
    for key, value in serve.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def runner():
    return make_runner(config())  # batch sizes 1, 2, 4, 8


def case(c: int, i: int):
    """Client c's i-th request: its own image, state and noise, so that a crossed or reordered answer cannot match."""
    request, obs = libero_request(np.random.default_rng(1000 * c + i))
    return request | {"noise": noise(1000 * c + i)}, obs, noise(1000 * c + i)


def in_threads(n: int, fn):
    results, errors = {}, []

    def run(c: int) -> None:
        try:
            results[c] = fn(c)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def join(threads):
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)


def test_eight_clients_at_once_are_batched_each_answered_in_order_and_none_crossed(runner):
    gated = GatedRunner(runner)
    clients, requests = 8, 2
    expected = {(c, i): runner.infer(case(c, i)[1], case(c, i)[2]).actions for c in range(clients)
                for i in range(requests)}
    with serving(config(max_batch=8), lambda: gated) as server:
        assert server.max_batch == 8
        holder = in_threads(1, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(case(99, 0)[0]))
        wait_for(lambda: gated.calls == 1)  # held on the worker
        policies = [WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(clients)]
        assert policies[0].get_server_metadata()["max_batch"] == 8
        threads, results, errors = in_threads(
            clients, lambda c: [policies[c].infer(case(c, i)[0]) for i in range(requests)])
        wait_for(lambda: server.pending == clients + 1)  # every client's first request waits behind it
        gated.gate.set()
        join(threads + holder[0])
    assert not errors and len(results) == clients
    sizes = []
    for c, replies in results.items():
        for i, reply in enumerate(replies):  # the i-th answer is the i-th request's
            np.testing.assert_allclose(reply["actions"], expected[c, i], rtol=0, atol=ROUNDING)
            sizes.append(reply["server_timing"]["batch_size"])
            assert reply["server_timing"]["queue_ms"] >= 0
    assert gated.sizes[:2] == [1, 8]  # the eight that queued behind the first ran as one batch
    assert max(sizes) == 8 and sum(gated.sizes) == clients * requests + 1 == server.inferences
    assert sum(n * k for n, k in server.batches.items()) == clients * requests + 1


def test_requests_within_max_wait_ms_of_the_first_run_together(runner):
    with serving(config(max_batch=2, max_wait_ms=60_000.0), lambda: runner) as server:
        # with a minute's window, the first request waits for a second one to fill the batch of 2
        threads, results, errors = in_threads(
            2, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(case(c, 0)[0]))
        join(threads)
    assert not errors
    for c, reply in results.items():
        assert reply["server_timing"]["batch_size"] == 2
        np.testing.assert_allclose(reply["actions"], runner.infer(case(c, 0)[1], case(c, 0)[2]).actions, rtol=0,
                                   atol=ROUNDING)
    assert dict(server.batches) == {2: 1}


def test_a_request_that_cannot_start_within_max_queue_ms_is_told_so_and_its_connection_goes_on(runner):
    gated = GatedRunner(runner)
    with serving(config(max_queue_ms=200.0), lambda: gated) as server:
        threads, results, errors = in_threads(
            1, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(case(0, 0)[0]))
        wait_for(lambda: gated.calls == 1)  # the runner is held: nothing else can start
        waiting = WebsocketClientPolicy("127.0.0.1", server.port)
        with pytest.raises(RuntimeError, match="server busy: not started within max_queue_ms 200 ms"):
            waiting.infer(case(1, 0)[0])
        assert server.busy == 1 and server.pending == 1
        gated.gate.set()
        join(threads)
        reply = waiting.infer(case(1, 1)[0])  # the same connection, once the server has room
    assert not errors and reply["actions"].shape == (50, 7)
    assert gated.sizes == [1, 1]  # the request that was turned away never reached the runner


def test_a_bad_row_is_answered_alone_and_the_rest_of_its_batch_runs(runner):
    gated = GatedRunner(runner)
    bad = case(2, 0)[0] | {"observation/state": np.array([0.1, np.nan, 0, 0, 0, 0, 0, 0])}
    with serving(config(), lambda: gated) as server:
        first = in_threads(1, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(case(0, 0)[0]))
        wait_for(lambda: gated.calls == 1)
        threads, results, errors = in_threads(3, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(
            bad if c == 2 else case(c + 1, 0)[0]))
        wait_for(lambda: server.pending == 4)
        gated.gate.set()
        join(first[0] + threads)
    assert len(errors) == 1 and "bad request" in str(errors[0]) and "NaN/inf at indices [1]" in str(errors[0])
    for c in (0, 1):
        assert results[c]["server_timing"]["batch_size"] == 2
        np.testing.assert_allclose(results[c]["actions"], runner.infer(case(c + 1, 0)[1], case(c + 1, 0)[2]).actions,
                                   rtol=0, atol=ROUNDING)


def test_garbage_and_huge_frames_do_not_hold_up_the_other_clients(runner):
    gated = GatedRunner(runner)
    huge = case(3, 0)[0] | {"observation/image": np.zeros((4000, 4000, 3), np.uint8)}  # a 48 MB frame, valid
    with serving(config(), lambda: gated) as server:
        decode, stuck, release = server._decode, threading.Event(), threading.Event()

        def slow_decode(message):  # the huge frame's decoding is held until the others have been served
            if len(message) > 10 << 20:
                stuck.set()
                assert release.wait(timeout=60)
            return decode(message)

        server._decode = slow_decode
        held = in_threads(1, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(huge))
        assert stuck.wait(timeout=60)
        with contextlib.ExitStack() as stack:
            garbage = stack.enter_context(connect(f"ws://127.0.0.1:{server.port}", compression=None))
            too_big = stack.enter_context(connect(f"ws://127.0.0.1:{server.port}", compression=None,
                                                  max_size=None))
            for ws in (garbage, too_big):
                assert unpack(ws.recv())["server"] == "pi_policy"
            garbage.send(b"\xc1" * 1000)
            with contextlib.suppress(ConnectionClosedError):  # the server may hang up before it is all sent
                too_big.send(b"\0" * (65 << 20))  # over the server's frame limit
            gated.gate.set()
            threads, results, errors = in_threads(
                3, lambda c: WebsocketClientPolicy("127.0.0.1", server.port).infer(case(c, 0)[0]))
            join(threads)  # answered while the huge frame is still being decoded
            assert not errors and sorted(results) == [0, 1, 2]
            assert "not a msgpack message" in garbage.recv()
            with pytest.raises(ConnectionClosedError) as closed:
                too_big.recv()
            assert closed.value.rcvd.code == 1009  # message too big
        release.set()
        join(held[0])
    assert held[1][0]["actions"].shape == (50, 7) and not held[2]


def test_batching_settings_are_checked(tmp_path):
    base = (ROOT / "config" / "serve_libero.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    for line, message in [("  max_batch: 0", r"'max_batch' must be >= 1, got 0"),
                          ("  max_wait_ms: -5", r"'max_wait_ms' must be >= 0, got -5"),
                          ("  max_queue_ms: 0", r"'max_queue_ms' must be > 0"),
                          ("  max_batch: four", r"'max_batch' must be a int, got 'four'"),
                          ("  max_bach: 4", r"unknown key 'max_bach' \(did you mean 'max_batch'\?\)")]:
        bad.write_text(base + line + "\n")
        with pytest.raises(ParamError, match=message):
            load_serve_config(bad, TINY)
    bad.write_text(base + "  max_batch: 6\n  max_wait_ms: 5\n")
    cfg = load_serve_config(bad, TINY)
    assert cfg.batch_sizes == (1, 2, 4, 6) and cfg.max_wait_ms == 5.0 and isinstance(cfg.max_wait_ms, float)
    assert load_serve_config(ROOT / "config" / "serve_libero.yaml", TINY).batch_sizes == (1, 2, 4, 8)


def test_a_runner_built_for_batch_one_serves_one_request_at_a_time():
    single = make_runner(config(max_batch=1))
    with serving(config(max_batch=8), lambda: single) as server:
        assert server.max_batch == 1
        reply = WebsocketClientPolicy("127.0.0.1", server.port).infer(case(0, 0)[0])
    assert reply["server_timing"]["batch_size"] == 1


def test_the_fleet_load_test_drives_robots_at_their_own_rates_and_reports_each(tmp_path):
    out = tmp_path / "fleet.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, str(ROOT / "scripts" / "fleet_load.py"), "--robots", "3", "--rates", "4,8", "--duration",
           "2", "--max-batch", "4", "--size", "64", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| robot | rate Hz | deadline ms | answered | p50 ms | p99 ms | misses | skipped |" in done.stdout
    figures = json.loads(out.read_text())
    assert [r["rate_hz"] for r in figures["per_robot"]] == [4.0, 8.0, 4.0]
    assert [r["deadline_ms"] for r in figures["per_robot"]] == [250.0, 125.0, 250.0]
    assert all(r["answered"] > 0 and r["round_trip_ms"]["p99"] >= r["round_trip_ms"]["p50"] > 0
               for r in figures["per_robot"])
    assert sum(figures["batch_sizes"].values()) == figures["answered"] == sum(r["answered"]
                                                                            for r in figures["per_robot"])
    assert all(1 <= int(size) <= 4 for size in figures["batch_sizes"])
    assert not figures["errors"]
    assert figures["server"]["device"] == "cpu" and figures["server"]["preset"] == "tiny"


def test_the_fleet_load_test_starts_its_server_on_the_device_asked_for():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda would start")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, str(ROOT / "scripts" / "fleet_load.py"), "--robots", "1", "--duration", "1",
           "--device", "cuda"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "device cuda asked for, but torch sees no CUDA GPU" in done.stderr, done.stderr
