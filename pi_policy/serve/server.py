"""The websocket policy server: openpi's protocol on an asyncio event loop, inference on one worker thread.

Protocol, as openpi's WebsocketPolicyServer speaks it: on connect the server sends the metadata (msgpack);
then each binary message is an observation and each reply holds `actions` (horizon x action_dim, robot units),
`policy_timing` (this runner's per-stage milliseconds) and `server_timing`. A bad request or a failed inference
is answered with the error text as a text frame and the connection closed with 1011; other clients go on. A
request that waited max_queue_ms without starting is answered "server busy" as a text frame, and its connection
stays open. `GET /healthz` answers 200 (without the API key); with an API key set, every other request must carry
`Authorization: Api-Key <key>`, the header openpi_client sends.

Limits, so that no client can make the server hold unbounded memory: a request frame may be at most
`max_message_bytes(cfg)` (a full-HD float32 image per configured camera, plus 1 MB; larger ones are closed with
1009); a connection's frames are read one ahead of the one being answered (a client that pipelines waits in
TCP instead of in the server's memory); at most `max_clients` connections are served at once, more get HTTP 503.
SIGINT and SIGTERM (with `run(stop_signals=...)`) close every connection with 1001 (going away).

Scheduling: the runner is synchronous and not thread-safe, so every call to it happens on one worker thread
(a one-thread executor), which also builds it. Requests are decoded off the event loop, then wait in one FIFO
queue. A scheduler on the event loop takes the oldest waiting request and, for up to max_wait_ms after it
arrived, lets others join it, up to max_batch; the batch then runs as one runner call (`infer_batch`; a batch of
one runs `infer`), and while it runs the next one gathers. Each connection has at most one request in the queue,
because its next message is read only after its reply is sent (openpi's client is strictly request-reply), so a
connection's answers keep its order and, with N clients, a request waits for at most N - 1 others. A client that
disconnects while its request waits has it removed, so it never reaches the GPU; one that disconnects during its
inference costs its row of that batch only.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import http
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.protocol import State

from pi_policy.observation import Observation, Policy, PolicyOutput
from pi_policy.serve.config import ServeConfig
from pi_policy.serve.keymap import to_observation
from pi_policy.serve.protocol import close_reason, pack, unpack

log = logging.getLogger(__name__)

IMAGE_BYTES = 1920 * 1080 * 3 * 4  # the largest image a request may carry per camera: full HD, even as float32
OTHER_BYTES = 1 << 20  # state, prompt, noise and msgpack's framing
READ_AHEAD = 1  # frames a connection may have waiting behind the one being answered


def max_message_bytes(cfg: ServeConfig) -> int:
    """The largest request frame accepted: sized from the configured cameras."""
    return len(cfg.images) * IMAGE_BYTES + OTHER_BYTES


def build_serve_runner(cfg: ServeConfig, device: str | None = None) -> Policy:
    """The runner a server (or a Ray Serve replica, on its GPU) builds from its config: batch sizes up to max_batch."""
    from pi_policy.runtime import build_runner

    spec = cfg.runner_spec().replace(progress=sys.stderr.isatty())
    return build_runner(spec.replace(device=device) if device else spec)


def server_metadata(runner: Policy, cfg: ServeConfig) -> dict:
    """What a client receives on connect."""
    p = cfg.params
    meta = {"server": "pi_policy", "preset": p.preset,
            "horizon": runner.horizon, "action_dim": runner.action_dim, "camera_names": list(runner.camera_names),
            "images": dict(cfg.images), "state": list(cfg.state), "prompt_key": cfg.prompt,
            "joint_names": list(p.joint_names), "backends": dict(runner.backends)}
    return meta | cfg.metadata


def decode_request(message: bytes | str, cfg: ServeConfig) -> tuple[Observation, np.ndarray | None]:
    """One websocket message -> the observation and optional noise; ValueError with a one-line reason."""
    if isinstance(message, str):
        raise ValueError("expected a binary msgpack observation, got a text frame")
    return to_observation(unpack(message), cfg)


def run_batch(runner: Policy, requests: list[tuple[Observation, np.ndarray | None]]) -> list[PolicyOutput | Exception]:
    """One runner call for the requests (`infer` for one, `infer_batch` for more): an output per request, or the
    ValueError of an invalid one, which is left out of the call (the runner finds it before any stage runs)."""
    answers: list[PolicyOutput | Exception | None] = [None] * len(requests)
    rows = list(range(len(requests)))
    outs: list[PolicyOutput] = []
    while rows:
        try:
            if len(rows) == 1:
                outs = [runner.infer(*requests[rows[0]])]
            else:
                outs = runner.infer_batch([requests[i][0] for i in rows], [requests[i][1] for i in rows])
            break
        except ValueError as e:  # the runner's RowError names the invalid observation of a batch
            if len(rows) > 1 and not hasattr(e, "row"):
                raise
            answers[rows.pop(getattr(e, "row", 0))] = e
    for i, out in zip(rows, outs, strict=True):
        answers[i] = out
    return answers


def reply_frame(out: PolicyOutput, server_timing: dict) -> bytes:
    """The reply openpi's client reads: actions, the runner's policy_timing, the server's server_timing."""
    lat = out.latency
    policy_timing = {"infer_ms": lat.host_ms, "prep_ms": lat.prep_ms, "total_ms": lat.total_ms,
                     **{f"{stage}_ms": ms for stage, ms in lat.stages_ms.items()}}
    actions = np.ascontiguousarray(out.actions, dtype=np.float32)
    return pack({"actions": actions, "policy_timing": policy_timing, "server_timing": server_timing})


class ServerBusy(RuntimeError):
    """A request that could not start within max_queue_ms; its connection stays open."""


@dataclass(eq=False)
class Pending:
    """A decoded request waiting for, or riding in, a batch."""

    obs: Observation
    noise: np.ndarray | None
    arrived: float  # perf_counter when queued
    future: asyncio.Future = field(repr=False)
    started: bool = False  # taken into a batch: no longer removable


@dataclass
class Answer:
    out: PolicyOutput
    queue_ms: float  # arrival -> its batch started on the worker
    infer_ms: float  # the batch's runner call, wall time
    batch_size: int  # requests in that runner call


class PolicyServer:
    """Serves one runner to any number of openpi clients. `make_runner` is called on the worker thread.

    max_batch (at most the runner's largest batch size; 1 for a runner without infer_batch), max_wait_ms and
    max_queue_ms come from the config's `serve:` section."""

    def __init__(self, make_runner: Callable[[], Policy], cfg: ServeConfig, api_key: str | None = None):
        self.cfg, self.api_key = cfg, api_key or None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pi-policy-infer")
        self.decoders = ThreadPoolExecutor(4, thread_name_prefix="pi-policy-decode")
        self.runner: Policy = self.pool.submit(make_runner).result()
        sizes = getattr(self.runner, "batch_sizes", (1,)) if hasattr(self.runner, "infer_batch") else (1,)
        self.max_batch = min(cfg.max_batch, max(sizes))
        if self.max_batch < cfg.max_batch:
            log.warning("max_batch %d: this runner runs at most %d observations at once", cfg.max_batch,
                        self.max_batch)
        self.metadata = server_metadata(self.runner, cfg) | {"max_batch": self.max_batch}
        self._metadata_frame = pack(self.metadata)
        self.inferences = 0  # observations the runner answered, for tests and the load test
        self.batches: collections.Counter[int] = collections.Counter()  # runner calls by batch size
        self.pending = 0  # requests queued or running, not answered yet
        self.busy = 0  # requests answered "server busy"
        self.port: int | None = None
        self._queue: collections.deque[Pending] = collections.deque()
        self._arrival: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._clients: weakref.WeakSet = weakref.WeakSet()  # admitted connections (a failed handshake drops out)

    # -- the handshake hook: health check and API key -------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            sent = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, f"Api-Key {self.api_key}".encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        clients = self.clients
        if clients >= self.cfg.max_clients:
            log.warning("refused a client: %d connected (max_clients)", clients)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server busy: {clients} clients connected (max_clients)\n")
        self._clients.add(connection)  # counted from here, so that handshakes in flight count too
        return None

    @property
    def clients(self) -> int:
        """Connections admitted and not closed (a handshake that failed is closed, even before it is collected)."""
        return sum(1 for c in list(self._clients) if c.state is not State.CLOSED)

    # -- one connection ------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        log.info("client %s connected", ws.remote_address)
        self._clients.add(ws)
        closed = asyncio.ensure_future(ws.wait_closed())
        prev_total_ms = None
        try:
            await ws.send(self._metadata_frame)
            async for message in ws:
                t0 = time.perf_counter()
                try:
                    reply = await self._answer(message, closed, t0, prev_total_ms)
                except ServerBusy as e:  # the request was fine: the client may send its next one
                    log.warning("client %s: %s", ws.remote_address, e)
                    await ws.send(f"server busy: {e}")
                    continue
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
            self._clients.discard(ws)
            log.info("client %s disconnected", ws.remote_address)

    def _decode(self, message: bytes | str) -> tuple[Observation, np.ndarray | None]:
        return decode_request(message, self.cfg)

    async def _answer(self, message: bytes | str, closed: asyncio.Future, t0: float,
                      prev_total_ms: float | None) -> bytes | None:
        loop = asyncio.get_running_loop()
        # off the event loop: a large frame must not hold up the scheduler or the other clients' decoding
        obs, noise = await loop.run_in_executor(self.decoders, self._decode, message)
        decode_ms = (time.perf_counter() - t0) * 1e3
        request = Pending(obs, noise, time.perf_counter(), loop.create_future())
        self._queue.append(request)
        self.pending += 1
        self._arrival.set()
        try:
            await asyncio.wait((request.future, closed), timeout=self.cfg.max_queue_ms / 1e3,
                               return_when=asyncio.FIRST_COMPLETED)
            if not request.started:  # left, or not started in time: never reaches the runner
                self._queue.remove(request)
                if closed.done():
                    return None
                self.busy += 1
                raise ServerBusy(f"not started within max_queue_ms {self.cfg.max_queue_ms:.0f} ms "
                                 f"({len(self._queue)} requests waiting, batches of up to {self.max_batch}); "
                                 "send the next observation when ready")
            if not request.future.done():  # in a batch on the worker
                await asyncio.wait((request.future, closed), return_when=asyncio.FIRST_COMPLETED)
                if not request.future.done():
                    return None  # left during its inference: the answer is dropped
        finally:
            self.pending -= 1
        answer: Answer = request.future.result()
        server_timing = {"infer_ms": answer.infer_ms, "queue_ms": answer.queue_ms, "decode_ms": decode_ms,
                         "batch_size": answer.batch_size}
        if prev_total_ms is not None:
            server_timing["prev_total_ms"] = prev_total_ms
        return reply_frame(answer.out, server_timing)

    # -- batching ------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        """Forever: gather a batch (the oldest waiting request, and those that arrive within max_wait_ms of it,
        up to max_batch), run it on the worker, hand out the answers."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            while 0 < len(self._queue) < self.max_batch:
                left = self._queue[0].arrived + self.cfg.max_wait_ms / 1e3 - time.perf_counter()
                if left <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), left)
                except TimeoutError:
                    break
            if not self._queue:  # they all left while the batch gathered
                continue
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            for request in batch:
                request.started = True
            try:
                answers = await loop.run_in_executor(self.pool, self._run_batch, batch)
            except Exception as e:  # noqa: BLE001 - the inference failed: every request of the batch hears why
                answers = [e] * len(batch)
            for request, answer in zip(batch, answers, strict=True):
                if request.future.done():
                    continue
                if isinstance(answer, BaseException):
                    request.future.set_exception(answer)
                else:
                    request.future.set_result(answer)

    def _run_batch(self, batch: list[Pending]) -> list[Answer | Exception]:
        """On the worker: one runner call for the batch; an invalid observation is answered with its error."""
        t0 = time.perf_counter()
        outs = run_batch(self.runner, [(r.obs, r.noise) for r in batch])
        infer_ms = (time.perf_counter() - t0) * 1e3
        ran = sum(not isinstance(o, Exception) for o in outs)
        if ran:
            self.batches[ran] += 1
            self.inferences += ran
        return [o if isinstance(o, Exception) else Answer(o, (t0 - r.arrived) * 1e3, infer_ms, ran)
                for r, o in zip(batch, outs, strict=True)]

    async def _fail(self, ws: ServerConnection, e: Exception) -> None:
        if isinstance(e, ValueError):
            text = f"bad request: {e}"
            log.warning("client %s: %s", ws.remote_address, text)
        else:
            text = f"inference failed: {type(e).__name__}: {e}"
            log.error("client %s: %s", ws.remote_address, text, exc_info=e)
        try:
            await ws.send(text)
            await ws.close(websockets.CloseCode.INTERNAL_ERROR, close_reason(text))
        except websockets.ConnectionClosed:
            pass

    # -- running -------------------------------------------------------------------------------
    async def run(self, on_ready: Callable[[int], None] | None = None, stop_signals: Iterable[int] = ()) -> None:
        """Serve until stop(), one of `stop_signals` or cancellation; on_ready(port) once listening. Stopping closes
        every connection with 1001 (going away)."""
        self._loop, self._stop, self._arrival = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        for signum in stop_signals:
            self._loop.add_signal_handler(signum, self._stop.set)
        scheduler = asyncio.create_task(self._schedule())
        async with serve(self._handle, self.cfg.host, self.cfg.port, process_request=self._process_request,
                         compression=None, max_size=max_message_bytes(self.cfg), max_queue=READ_AHEAD) as server:
            self.port = server.sockets[0].getsockname()[1]
            if on_ready is not None:
                on_ready(self.port)
            try:
                await self._stop.wait()
            finally:
                scheduler.cancel()

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
        self.decoders.shutdown(wait=False, cancel_futures=True)
