"""The websocket policy server: openpi's protocol on an asyncio event loop, inference on one worker thread.

Protocol, as openpi's WebsocketPolicyServer speaks it: on connect the server sends the metadata (msgpack);
then each binary message is an observation and each reply holds `actions` (horizon x action_dim, robot units),
`policy_timing` (this runner's per-stage milliseconds) and `server_timing`. A bad request or a failed inference
is answered with the error text as a text frame and the connection closed with 1011; other clients go on.
`GET /healthz` answers 200 (without the API key); with an API key set, every other request must carry
`Authorization: Api-Key <key>`, the header openpi_client sends.

Scheduling: the runner is synchronous and not thread-safe, so every call to it happens on one worker thread
(a one-thread executor), which also builds it. Its work queue is FIFO, and each connection has at most one
request in it, because a connection's next message is read only after its reply is sent (openpi's client is
strictly request-reply). FIFO over one slot per connection is round-robin: with N clients, a request waits
for at most N - 1 others. A client that disconnects while its request waits has it cancelled, so it never
reaches the GPU; one that disconnects during its inference costs that inference only.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve

from pi_policy.observation import Observation, Policy, PolicyOutput
from pi_policy.serve.config import ServeConfig
from pi_policy.serve.keymap import to_observation
from pi_policy.serve.protocol import pack, unpack

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # four full-HD cameras fit several times over


class PolicyServer:
    """Serves one runner to any number of openpi clients. `make_runner` is called on the worker thread."""

    def __init__(self, make_runner: Callable[[], Policy], cfg: ServeConfig, api_key: str | None = None):
        self.cfg, self.api_key = cfg, api_key or None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pi-policy-infer")
        self.runner: Policy = self.pool.submit(make_runner).result()
        self.metadata = self._metadata()
        self._metadata_frame = pack(self.metadata)
        self.inferences = 0  # runner calls made, for tests and the load test
        self.pending = 0  # requests handed to the worker and not answered yet
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def _metadata(self) -> dict:
        r, p = self.runner, self.cfg.params
        meta = {"server": "pi_policy", "preset": p.preset,
                "horizon": r.horizon, "action_dim": r.action_dim, "camera_names": list(r.camera_names),
                "images": dict(self.cfg.images), "state": list(self.cfg.state), "prompt_key": self.cfg.prompt,
                "joint_names": list(p.joint_names), "backends": dict(r.backends)}
        return meta | self.cfg.metadata

    # -- the handshake hook: health check and API key -------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            sent = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, f"Api-Key {self.api_key}".encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        return None

    # -- one connection ------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        log.info("client %s connected", ws.remote_address)
        closed = asyncio.ensure_future(ws.wait_closed())
        prev_total_ms = None
        try:
            await ws.send(self._metadata_frame)
            async for message in ws:
                t0 = time.perf_counter()
                try:
                    reply = await self._answer(message, closed, t0, prev_total_ms)
                except Exception as e:  # noqa: BLE001 - a bad request or failed inference ends this client only
                    await self._fail(ws, e)
                    return
                if reply is None:  # the client left while waiting
                    return
                await ws.send(reply)
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except websockets.ConnectionClosed:
            pass
        finally:
            closed.cancel()
            log.info("client %s disconnected", ws.remote_address)

    async def _answer(self, message: bytes | str, closed: asyncio.Future, t0: float,
                      prev_total_ms: float | None) -> bytes | None:
        if isinstance(message, str):
            raise ValueError("expected a binary msgpack observation, got a text frame")
        obs, noise = to_observation(unpack(message), self.cfg)
        decode_ms = (time.perf_counter() - t0) * 1e3
        self.pending += 1
        job = asyncio.get_running_loop().run_in_executor(self.pool, self._infer, obs, noise, time.perf_counter())
        try:
            await asyncio.wait((job, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.pending -= 1
        if not job.done():
            job.cancel()  # still queued: skipped by the worker; already running: finishes, answer dropped
            return None
        out, queue_ms, infer_ms = job.result()
        lat = out.latency
        policy_timing = {"infer_ms": lat.host_ms, "prep_ms": lat.prep_ms, "total_ms": lat.total_ms,
                         **{f"{stage}_ms": ms for stage, ms in lat.stages_ms.items()}}
        server_timing = {"infer_ms": infer_ms, "queue_ms": queue_ms, "decode_ms": decode_ms}
        if prev_total_ms is not None:
            server_timing["prev_total_ms"] = prev_total_ms
        actions = np.ascontiguousarray(out.actions, dtype=np.float32)
        return pack({"actions": actions, "policy_timing": policy_timing, "server_timing": server_timing})

    def _infer(self, obs: Observation, noise: np.ndarray | None, queued_at: float) -> tuple[PolicyOutput, float, float]:
        t0 = time.perf_counter()
        self.inferences += 1
        out = self.runner.infer(obs, noise)
        return out, (t0 - queued_at) * 1e3, (time.perf_counter() - t0) * 1e3

    async def _fail(self, ws: ServerConnection, e: Exception) -> None:
        if isinstance(e, ValueError):
            text = f"bad request: {e}"
            log.warning("client %s: %s", ws.remote_address, text)
        else:
            text = f"inference failed: {type(e).__name__}: {e}"
            log.error("client %s: %s", ws.remote_address, text, exc_info=e)
        try:
            await ws.send(text)
            await ws.close(websockets.CloseCode.INTERNAL_ERROR, text[:120])  # a close reason holds 123 bytes
        except websockets.ConnectionClosed:
            pass

    # -- running -------------------------------------------------------------------------------
    async def run(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve until stop() (or cancellation); on_ready(port) once listening."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._handle, self.cfg.host, self.cfg.port, process_request=self._process_request,
                         compression=None, max_size=MAX_MESSAGE_BYTES) as server:
            self.port = server.sockets[0].getsockname()[1]
            if on_ready is not None:
                on_ready(self.port)
            await self._stop.wait()

    def start(self) -> int:
        """Serve from a background thread (tests, scripts); returns the port."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            try:
                asyncio.run(self.run(lambda port: ready.set()))
            except BaseException as e:  # noqa: BLE001 - reported to the caller of start()
                failed.append(e)
                ready.set()

        self._thread = threading.Thread(target=main, name="pi-policy-serve", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
