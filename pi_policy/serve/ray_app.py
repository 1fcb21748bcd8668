"""`pi-policy serve --ray`: the same openpi websocket protocol on Ray Serve, one runner replica per GPU of a cluster.

Robots connect to one address (Ray Serve's proxy, on every node that runs one); the websocket ingress decodes each
observation and hands it to a `PolicyReplica`, which Ray Serve picks among the replicas on every machine of the
cluster. Each replica batches what it receives with Ray Serve's own request batching (`serve.batch`: the config's
max_batch and max_wait_ms) and runs the batch as one runner call on its GPU. The config's `serve:` section is the
same YAML as for `pi-policy serve`; `replicas` sets how many (0: one per GPU of the cluster, 1 without GPUs).

    ray start --head                                                      # on each machine (workers: --address)
    pi-policy serve --ray --config config/serve_libero.yaml --port 8000
    serve run pi_policy.serve.ray_app:app config=config/serve_libero.yaml # the same, with Ray's own CLI

Differences from the single-process server: a request that waited max_queue_ms is answered "server busy" when its
replica comes to it rather than at the deadline; a refused API key is HTTP 403 (Starlette's) rather than 401.
"""

# Ray Serve and FastAPI are imported inside the functions that build the application (this module imports on a
# machine without them). No `from __future__ import annotations`: FastAPI reads the route's parameter types.
import asyncio
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pi_policy.observation import Observation
from pi_policy.serve.config import ServeConfig, load_serve_config
from pi_policy.serve.protocol import pack
from pi_policy.serve.server import (
    ServerBusy,
    build_serve_runner,
    decode_request,
    reply_frame,
    run_batch,
    server_metadata,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "PI_POLICY_API_KEY"
Item = tuple[Observation, np.ndarray | None, float]  # a request in a replica's batch: observation, noise, arrival


def _replica():
    """The runner replica deployment's class (Ray Serve's batching decorates it)."""
    from ray import serve

    class PolicyReplica:
        """One runner (on the GPU Ray gave this replica), fed in batches by Ray Serve."""

        def __init__(self, cfg: ServeConfig):
            self.cfg = cfg
            device = "cuda" if cfg.params.device.startswith("cuda") else None  # Ray shows the replica its one GPU
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="pi-policy-infer")  # the runner lives on one thread
            self.runner = self.pool.submit(build_serve_runner, cfg, device).result()
            self.max_batch = min(cfg.max_batch, max(self.runner.batch_sizes))
            self.infer_batch.set_max_batch_size(self.max_batch)
            self.infer_batch.set_batch_wait_timeout_s(cfg.max_wait_ms / 1e3)
            self.name = serve.get_replica_context().replica_id.unique_id
            self.metadata = server_metadata(self.runner, cfg) | {"max_batch": self.max_batch}

        def get_metadata(self) -> dict:
            return self.metadata

        async def infer(self, obs: Observation, noise: np.ndarray | None) -> dict | Exception:
            """One request: the actions and timings, or the exception to report (returned, so that Ray does not wrap
            it into its own error text)."""
            return await self.infer_batch((obs, noise, time.perf_counter()))

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # set from the config in __init__
        async def infer_batch(self, items: list[Item]) -> list[dict | Exception]:
            start = time.perf_counter()
            late = [(start - arrived) * 1e3 > self.cfg.max_queue_ms for _, _, arrived in items]
            ready = [(obs, noise) for (obs, noise, _), is_late in zip(items, late, strict=True) if not is_late]
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            done = await loop.run_in_executor(self.pool, run_batch, self.runner, ready) if ready else []
            infer_ms = (time.perf_counter() - t0) * 1e3
            ran = sum(not isinstance(out, Exception) for out in done)
            outs = iter(done)
            answers: list[dict | Exception] = []
            for (_, _, arrived), is_late in zip(items, late, strict=True):
                if is_late:
                    answers.append(ServerBusy(f"not started within max_queue_ms {self.cfg.max_queue_ms:.0f} ms "
                                              f"(replica {self.name}); send the next observation when ready"))
                    continue
                out = next(outs)
                if isinstance(out, Exception):
                    answers.append(out)
                    continue
                answers.append({"out": out, "queue_ms": (start - arrived) * 1e3, "infer_ms": infer_ms,
                                "batch_size": ran, "replica": self.name})
            return answers

    return PolicyReplica


def _ingress(cfg: ServeConfig, api_key: str | None):
    """The websocket ingress deployment (a FastAPI app), speaking openpi's protocol."""
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect
    from fastapi.responses import PlainTextResponse
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    app = FastAPI()

    @serve.ingress(app)
    class PolicyIngress:
        def __init__(self, replica: DeploymentHandle):
            self.replica = replica
            self.metadata_frame: bytes | None = None

        @app.get("/healthz", response_class=PlainTextResponse)
        async def healthz(self) -> str:
            return "OK\n"

        @app.websocket("/")
        async def session(self, ws: WebSocket) -> None:
            if api_key is not None:
                sent = ws.headers.get("authorization", "").encode()
                if not hmac.compare_digest(sent, f"Api-Key {api_key}".encode()):
                    await ws.close(code=1008)  # before accept: the handshake is refused
                    return
            await ws.accept()
            if self.metadata_frame is None:
                self.metadata_frame = pack(await self.replica.get_metadata.remote())
            await ws.send_bytes(self.metadata_frame)
            prev_total_ms = None
            try:
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        return
                    t0 = time.perf_counter()
                    data = message.get("bytes") if message.get("bytes") is not None else message.get("text")
                    try:
                        obs, noise = await asyncio.to_thread(decode_request, data, cfg)
                        decode_ms = (time.perf_counter() - t0) * 1e3
                        answer = await self.replica.infer.remote(obs, noise)
                        if isinstance(answer, Exception):
                            raise answer
                    except ServerBusy as e:
                        await ws.send_text(f"server busy: {e}")
                        continue
                    except Exception as e:  # noqa: BLE001 - one bad request ends its connection only
                        text = f"bad request: {e}" if isinstance(e, ValueError) else \
                            f"inference failed: {type(e).__name__}: {e}"
                        log.warning("client %s: %s", ws.client, text)
                        await ws.send_text(text)
                        await ws.close(code=1011, reason=text[:120])
                        return
                    timing = {k: answer[k] for k in ("infer_ms", "queue_ms", "batch_size", "replica")}
                    timing["decode_ms"] = decode_ms
                    if prev_total_ms is not None:
                        timing["prev_total_ms"] = prev_total_ms
                    await ws.send_bytes(reply_frame(answer["out"], timing))
                    prev_total_ms = (time.perf_counter() - t0) * 1e3
            except WebSocketDisconnect:
                return

    return PolicyIngress


def replica_count(cfg: ServeConfig, gpus: float | None = None) -> int:
    """`replicas`, or 0 = one per GPU of the cluster (`gpus`, else Ray's count) on CUDA, and 1 on a CPU."""
    if cfg.replicas:
        return cfg.replicas
    if not cfg.params.device.startswith("cuda"):
        return 1
    if gpus is None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return max(1, int(gpus))


def build_app(cfg: ServeConfig, api_key: str | None = None, gpus: float | None = None):
    """The Ray Serve application for a serve config: replica_count runner replicas, each with one GPU when the
    device is CUDA (one CPU otherwise), behind one websocket ingress: a ray.serve.Application."""
    from ray import serve

    options: dict[str, Any] = {"num_gpus": 1} if cfg.params.device.startswith("cuda") else {"num_cpus": 1}
    quick = {"graceful_shutdown_timeout_s": 5.0, "graceful_shutdown_wait_loop_s": 0.5}  # a robot's request is ms
    replica = serve.deployment(_replica(), name="PolicyReplica", num_replicas=replica_count(cfg, gpus),
                               ray_actor_options=options, max_ongoing_requests=max(64, 4 * cfg.max_batch), **quick)
    ingress = serve.deployment(_ingress(cfg, api_key), name="PolicyIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000, **quick)
    return ingress.bind(replica.bind(cfg))


def app(args: dict[str, str]):
    """`serve run pi_policy.serve.ray_app:app config=PATH [preset=tiny device=cpu ...]`: the builder Ray's CLI calls.
    Every argument but config overrides the node parameter of that name (YAML syntax)."""
    import yaml

    if "config" not in args:
        raise ValueError("give the serve config: serve run pi_policy.serve.ray_app:app config=config/serve_libero.yaml")
    overrides = {k: ("" if v == "" else yaml.safe_load(v)) for k, v in args.items() if k != "config"}
    cfg = load_serve_config(args["config"], overrides)
    return build_app(cfg, os.environ.get(API_KEY_ENV) or None)
