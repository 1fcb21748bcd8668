"""`pi-policy serve` against openpi's own client (openpi-client from PyPI) on the loopback interface, tiny model."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from pi_policy.node.params import ParamError
from pi_policy.observation import STAGES, Observation
from pi_policy.runtime import build_runner
from pi_policy.serve.config import load_serve_config
from pi_policy.serve.keymap import RequestError, to_observation
from pi_policy.serve.protocol import pack, unpack
from pi_policy.serve.server import PolicyServer, max_message_bytes
from pi_policy.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"preset": "tiny", "checkpoint": "", "norm_stats": "", "tokenizer": "", "device": "cpu"}
HORIZON, MODEL_DIM = 50, 32


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-equal answers from the server's worker thread and a direct call need one thread count for both.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def config(name: str):
    cfg = load_serve_config(ROOT / "config" / f"serve_{name}.yaml", TINY)
    cfg.host, cfg.port = "127.0.0.1", 0
    cfg.max_clients = 64  # openpi's client has no close(): the tests' clients stay connected until the module ends
    return cfg


def make_runner(cfg):
    return build_runner(cfg.runner_spec().replace(progress=False))


@contextlib.contextmanager
def serving(cfg, runner_factory=None, api_key=None):
    torch.set_num_threads(1)  # the worker thread takes the count current when it first runs torch
    server = PolicyServer(runner_factory or (lambda: make_runner(cfg)), cfg, api_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def rng_image(rng, *shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((HORIZON, MODEL_DIM)).astype(np.float32)


# Requests as openpi's example clients build them, and the observation each one means, written out by hand.
def aloha_request(rng):
    imgs = {k: rng_image(rng, 3, 240, 320) for k in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")}
    state = rng.uniform(-1, 1, 14)
    request = {"state": state, "images": imgs}  # openpi's ALOHA client sends CHW images and no prompt
    obs = Observation({"base_0_rgb": imgs["cam_high"].transpose(1, 2, 0),
                       "left_wrist_0_rgb": imgs["cam_left_wrist"].transpose(1, 2, 0),
                       "right_wrist_0_rgb": imgs["cam_right_wrist"].transpose(1, 2, 0)}, state, "fold the towel")
    return request, obs


def droid_request(rng):
    ext, wrist = rng_image(rng, 224, 224, 3), rng_image(rng, 224, 224, 3)
    joints, gripper = rng.uniform(-1, 1, 7), rng.uniform(0, 1, 1)
    request = {"observation/exterior_image_1_left": ext, "observation/wrist_image_left": wrist,
               "observation/joint_position": joints, "observation/gripper_position": gripper,
               "prompt": "put the marker in the cup"}
    obs = Observation({"base_0_rgb": ext, "left_wrist_0_rgb": wrist}, np.concatenate([joints, gripper]),
                      "put the marker in the cup")
    return request, obs


def libero_request(rng):
    img, wrist = rng_image(rng, 100, 130, 3), rng_image(rng, 100, 130, 3)
    state = rng.uniform(-1, 1, 8)
    request = {"observation/image": img, "observation/wrist_image": wrist, "observation/state": state,
               "prompt": "open the drawer"}
    return request, Observation({"base_0_rgb": img, "left_wrist_0_rgb": wrist}, state, "open the drawer")


LAYOUTS = {"aloha": (aloha_request, 14), "droid": (droid_request, 8), "libero": (libero_request, 7)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_openpi_client_gets_metadata_and_the_direct_runner_actions(name):
    cfg = config(name)
    make_request, action_dim = LAYOUTS[name]
    request, obs = make_request(np.random.default_rng(0))
    direct = make_runner(cfg)
    with serving(cfg) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["server"] == "pi_policy" and meta["preset"] == "tiny"
        assert meta["horizon"] == HORIZON and meta["action_dim"] == action_dim
        assert meta["images"] == cfg.images and meta["state"] == cfg.state
        for i in range(2):
            reply = client.infer(request | {"noise": noise(i)})
            expected = direct.infer(obs, noise(i)).actions
            assert reply["actions"].shape == (HORIZON, action_dim) and reply["actions"].dtype == np.float32
            np.testing.assert_array_equal(reply["actions"], expected)
        for key in ("infer_ms", "prep_ms", "total_ms", *(f"{s}_ms" for s in STAGES)):
            assert reply["policy_timing"][key] > 0
        for key in ("infer_ms", "queue_ms", "decode_ms", "prev_total_ms"):
            assert reply["server_timing"][key] >= 0
        assert reply["server_timing"]["prev_total_ms"] > 0  # the previous request's round trip was measured
    if name == "aloha":
        assert meta["reset_pose"] == [0.0, -1.5, 1.5, 0.0, 0.0, 0.0]  # the config's extra metadata


@pytest.fixture(scope="module")
def libero_server():
    cfg = config("libero")
    with serving(cfg) as server:
        yield server


def good_request(seed=0):
    return libero_request(np.random.default_rng(seed))[0]


def drop(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("change, message", [
    (lambda r: drop(r, "observation/state"), "missing state 'observation/state'; the request has"),
    (lambda r: drop(r, "observation/image"), "missing image 'observation/image' (camera base_0_rgb)"),
    (lambda r: r | {"observation/state": np.zeros(6)}, "has 6 values, but joint_names lists 8"),
    (lambda r: r | {"observation/state": np.zeros((2, 4))}, "must be a vector or a number, got shape (2, 4)"),
    (lambda r: r | {"observation/state": np.array([0.1, np.nan, 0, 0, 0, 0, 0, 0])}, "NaN/inf at indices [1]"),
    (lambda r: r | {"observation/image": np.zeros((224, 224, 5), np.uint8)}, "expected HxW, HxWx1, HxWx3"),
    (lambda r: r | {"observation/image": np.full((8, 8, 3), 2.0)}, "float images must be in [0, 1]"),
    (lambda r: r | {"prompt": 7}, "'prompt' must be a string"),
    (lambda r: r | {"noise": np.zeros((3, 3), np.float32)}, "noise must have shape (50, 32)"),
    (lambda r: r | {"observation/state": np.array(["0.125"] * 8)}, "'observation/state' must be numbers, got an array "
                                                                    "of <U5"),
    (lambda r: r | {"observation/state": ["0.125"] * 8}, "'observation/state' must be numbers, got list"),
    (lambda r: r | {"noise": np.full((50, 32), "0.5")}, "'noise' must be a float array"),
])
def test_a_bad_request_is_a_clear_error_and_the_server_goes_on(libero_server, change, message):
    client = WebsocketClientPolicy("127.0.0.1", libero_server.port)
    with pytest.raises(RuntimeError, match="Error in inference server") as err:
        client.infer(change(good_request()))
    assert message in str(err.value) and "Traceback" not in str(err.value)
    assert WebsocketClientPolicy("127.0.0.1", libero_server.port).infer(good_request())["actions"].shape == (50, 7)


@pytest.mark.parametrize("frame, message", [
    (b"\xc1 not msgpack", "not a msgpack message"),
    ("a text frame", "expected a binary msgpack observation"),
    (pack(["a", "list"]), "a request must be a dict"),
    (pack({"observation/image": {b"__ndarray__": True, b"data": b"\0" * 5, b"dtype": "|u1", b"shape": [2, 2]}}),
     "needs 4 bytes, got 5"),
])
def test_a_malformed_frame_gets_the_error_text_and_close_code_1011(libero_server, frame, message):
    with connect(f"ws://127.0.0.1:{libero_server.port}", compression=None) as ws:
        assert unpack(ws.recv())["server"] == "pi_policy"
        ws.send(frame)
        text = ws.recv()
        assert isinstance(text, str) and message in text
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv()
        assert closed.value.rcvd.code == 1011


def test_a_close_reason_is_cut_to_123_bytes_not_characters(libero_server):
    # the close reason used to be cut to 120 characters: multibyte text overflowed the close frame, the close
    # failed, and the client got 1011 with no reason at all
    keys = {f"камера_{i}": 0 for i in range(12)}  # two bytes a letter; the error lists the request's keys
    with connect(f"ws://127.0.0.1:{libero_server.port}", compression=None) as ws:
        ws.recv()
        ws.send(pack(keys))
        text = ws.recv()
        assert "missing image 'observation/image'" in text and "камера_0" in text
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv()
    reason = closed.value.rcvd.reason
    assert closed.value.rcvd.code == 1011 and reason and text.startswith(reason)
    assert 120 <= len(reason.encode()) <= 123


def test_a_frame_over_the_limit_is_refused_with_1009(libero_server):
    limit = max_message_bytes(libero_server.cfg)  # two cameras: two full-HD float32 images and 1 MB
    assert limit == 2 * 1920 * 1080 * 3 * 4 + (1 << 20)
    with connect(f"ws://127.0.0.1:{libero_server.port}", compression=None, max_size=None) as ws:
        ws.recv()
        with contextlib.suppress(ConnectionClosedError):
            ws.send(b"\0" * (limit + 1))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv()
    assert closed.value.rcvd.code == 1009  # message too big


def test_a_pipelining_client_is_read_one_frame_ahead(libero_server):
    # a connection that sends frames without reading the replies used to have up to 16 of them buffered by the
    # server (one client, 12 x 50 MB: +600 MB); now it waits in TCP once one frame is queued behind the answered one
    gated = GatedRunner(libero_server.runner)
    image = np.zeros((1024, 1024, 3), np.float32)  # 12.6 MB a frame: a few fill the kernel's socket buffers
    frame = pack(good_request() | {"observation/image": image})
    sent, failed = [], []
    with serving(config("libero"), lambda: gated) as server:
        ws = connect(f"ws://127.0.0.1:{server.port}", compression=None)
        ws.recv()

        def pipeline():
            try:
                for i in range(12):
                    ws.send(frame)
                    sent.append(i)
            except Exception as e:  # noqa: BLE001 - the connection closed under a blocked send, at the end
                failed.append(e)

        sender = threading.Thread(target=pipeline, daemon=True)
        sender.start()
        wait_for(lambda: gated.calls == 1)  # the first frame is on the worker, held at the gate
        stalled_since, last = time.monotonic(), -1
        while time.monotonic() - stalled_since < 3.0 and len(sent) < 12:  # until sending stops making progress
            if len(sent) != last:
                stalled_since, last = time.monotonic(), len(sent)
            time.sleep(0.1)
        assert len(sent) <= 5, f"the server read {len(sent)} frames of {len(frame) >> 20} MB ahead"
        ws.close_socket()
        gated.gate.set()
        sender.join(timeout=60)


def test_connections_over_max_clients_get_503(libero_server):
    cfg = config("libero")
    cfg.max_clients = 2
    with serving(cfg, lambda: libero_server.runner) as server:
        url = f"ws://127.0.0.1:{server.port}"
        first, second = connect(url, compression=None), connect(url, compression=None)
        with pytest.raises(InvalidStatus) as refused:
            connect(url, compression=None)
        assert refused.value.response.status_code == 503
        assert b"server busy: 2 clients connected (max_clients)" in refused.value.response.body
        first.close()
        wait_for(lambda: server.clients == 1)
        with connect(url, compression=None) as third:  # a slot is free again
            assert unpack(third.recv())["server"] == "pi_policy"
        second.close()


def test_health_check(libero_server):
    with urllib.request.urlopen(f"http://127.0.0.1:{libero_server.port}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def test_api_key(libero_server):
    cfg = config("libero")
    with serving(cfg, lambda: libero_server.runner, api_key="s3cret") as server:
        assert WebsocketClientPolicy("127.0.0.1", server.port, api_key="s3cret").infer(good_request())["actions"].size
        for key in (None, "wrong"):
            with pytest.raises(InvalidStatus) as refused:
                WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)
            assert refused.value.response.status_code == 401
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert response.status == 200  # health probes need no key


def test_concurrent_clients_each_get_their_own_answers(libero_server):
    clients, requests, variants = 4, 20, 3
    direct = make_runner(config("libero"))
    # Each (client, variant) has its own state and noise, so a crossed or stale answer cannot match.
    cases = {(c, v): (libero_request(np.random.default_rng(100 * c + v)), noise(100 * c + v))
             for c in range(clients) for v in range(variants)}
    expected = {k: direct.infer(obs, n).actions for k, ((_, obs), n) in cases.items()}
    before = libero_server.inferences
    results, errors = {}, []

    def run(c: int) -> None:
        try:
            client = WebsocketClientPolicy("127.0.0.1", libero_server.port)
            for i in range(requests):
                (request, _), n = cases[c, i % variants]
                results[c, i] = client.infer(request | {"noise": n})["actions"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == clients * requests
    for (c, i), actions in results.items():  # batched with others: equal to the last bit of float32 (test_batch.py)
        np.testing.assert_allclose(actions, expected[c, i % variants], rtol=0, atol=1e-6)
    assert libero_server.inferences - before == clients * requests


class GatedRunner:
    """The real runner, held at a gate so that a test can fill the queue behind it; `sizes` lists each call's
    observation count."""

    def __init__(self, runner):
        self.runner, self.gate, self.calls, self.sizes = runner, threading.Event(), 0, []
        for name in ("camera_names", "horizon", "action_dim", "cfg", "backends", "batch_sizes"):
            setattr(self, name, getattr(runner, name))

    def infer(self, obs, noise=None):
        self.calls += 1
        self.sizes.append(1)
        assert self.gate.wait(timeout=60)
        return self.runner.infer(obs, noise)

    def infer_batch(self, observations, noises=None):
        self.calls += 1
        self.sizes.append(len(observations))
        assert self.gate.wait(timeout=60)
        return self.runner.infer_batch(observations, noises)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_leaves_while_queued_costs_no_inference(libero_server):
    gated = GatedRunner(libero_server.runner)
    with serving(config("libero"), lambda: gated) as server:
        first = {}
        holder = threading.Thread(target=lambda: first.update(
            reply=WebsocketClientPolicy("127.0.0.1", server.port).infer(good_request())))
        holder.start()
        wait_for(lambda: gated.calls == 1)  # the first request is on the worker, held at the gate
        with connect(f"ws://127.0.0.1:{server.port}", compression=None) as ws:
            ws.recv()
            ws.send(pack(good_request(1)))
            wait_for(lambda: server.pending == 2)  # queued behind the first
        wait_for(lambda: server.pending == 1)  # the server saw it leave
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert response.status == 200  # the event loop answers while the runner is busy
        gated.gate.set()
        holder.join(timeout=60)
        assert first["reply"]["actions"].shape == (50, 7)
        assert gated.calls == 1 and server.inferences == 1


def test_config_errors_are_one_clear_line(tmp_path, capsys):
    base = (ROOT / "config" / "serve_libero.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(base.replace("  state: [observation/state]", "  sate: [observation/state]"))
    with pytest.raises(ParamError, match=r"unknown key 'sate' \(did you mean 'state'\?\)"):
        load_serve_config(bad, TINY)
    bad.write_text(base.replace("observation/image: base_0_rgb", "observation/image: top_rgb"))
    with pytest.raises(ParamError, match=r"camera_names \['top_rgb'\] are not among the model's cameras"):
        load_serve_config(bad, TINY)
    bad.write_text(base + "  max_clients: 0\n")
    with pytest.raises(ParamError, match=r"'max_clients' must be >= 1, got 0"):
        load_serve_config(bad, TINY)
    bad.write_text(base.split("serve:")[0])
    assert main(["serve", "--config", str(bad), "--preset", "tiny", "--device", "cpu"]) == 2
    assert "no 'serve:' section" in capsys.readouterr().err


def test_optional_cameras_are_masked_and_required_ones_are_not():
    cfg = config("aloha")  # required_cameras: [base_0_rgb]
    request, _ = aloha_request(np.random.default_rng(0))
    obs, noise_ = to_observation({"state": request["state"], "images": {"cam_high": request["images"]["cam_high"]}},
                                 cfg)
    assert set(obs.images) == {"base_0_rgb"} and obs.images["base_0_rgb"].shape == (240, 320, 3)
    assert noise_ is None and obs.prompt == "fold the towel"
    with pytest.raises(RequestError, match="missing image 'images/cam_high'"):
        to_observation({"state": request["state"], "images": {"cam_low": request["images"]["cam_low"]}}, cfg)


def test_the_command_serves_until_sigterm():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pi_policy", "serve", "--config", str(ROOT / "config" / "serve_droid.yaml"),
           "--preset", "tiny", "--device", "cpu", "--checkpoint", "", "--set", "norm_stats=", "--set", "tokenizer=",
           "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny on cpu at ws://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        reply = WebsocketClientPolicy("127.0.0.1", port).infer(droid_request(np.random.default_rng(0))[0])
        assert reply["actions"].shape == (50, 8)
        with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:  # connected when the server is stopped
            ws.recv()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1001  # going away, not 1011 (an error)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
        err = proc.stderr.read()
        assert "Traceback" not in err and "never retrieved" not in err, err
    finally:
        proc.kill()
        proc.wait()
