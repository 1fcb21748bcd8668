"""PolicyRunner: numpy observation in, numpy action chunk out, through four timed stages on static buffers.

All stage inputs and outputs live in preallocated device buffers, so each stage is one CUDA graph
(captured once at start-up) and a replay is a single launch. On CPU the same stages run eagerly.
With real-time chunking on, the previous chunk and its weights are buffers too, read by the denoise graph.

Several robots: the runner keeps one set of buffers and graphs per batch size it was built for (its buckets,
1 always among them). `infer_batch` stages each observation in its own row of the smallest bucket that holds
them all; the rows left over are padding with every image and prompt token masked, and their answers dropped.
Every stage treats the rows independently, so a row's actions do not depend on the batch around it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from pi_policy.cameras import CameraSet
from pi_policy.model.normalize import Normalizer
from pi_policy.model.pi0 import PiModel
from pi_policy.model.preprocess import pixels_to_model, resize_with_pad_tensor, to_rgb_uint8
from pi_policy.model.rtc import RTCInputs, prefix_weights
from pi_policy.observation import STAGES, LatencyRecord, Observation, PolicyOutput
from pi_policy.runtime.choice import StageChoice, fall_back, notes, uncompiled
from pi_policy.runtime.options import RTCSettings
from pi_policy.runtime.timer import StageTimer

log = logging.getLogger(__name__)

TOKEN_CACHE = 64  # prompts whose tokens are kept
PrefillFn = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], object]


class RowError(ValueError):
    """One observation of a batch is invalid; `row` is its index. No stage ran."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row


def batch_buckets(batch_sizes: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The batch sizes a runner builds buffers and graphs for: those given, and 1, sorted."""
    bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise ValueError(f"batch sizes must be whole numbers >= 1, got {list(batch_sizes)}")
    return tuple(sorted({1, *batch_sizes}))


class StaticBuffers:
    """Every tensor the stages read or write, allocated once."""

    def __init__(self, model: PiModel, device: torch.device, batch: int = 1, rtc: bool = False):
        cfg, dtype = model.cfg, model.dtype
        n, s, g = cfg.num_cameras, cfg.vision.image_size, cfg.llm
        kv_shape = (g.depth, batch, g.num_kv_heads, cfg.prefix_len, g.head_dim)

        def z(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        self.images = z(batch, n, s, s, 3, dt=torch.uint8)  # raw RGB; converted to [-1, 1] inside the vision stage
        self.image_masks = z(batch, n, dt=torch.bool)
        self.tokens = z(batch, cfg.max_token_len, dt=torch.long)
        self.token_masks = z(batch, cfg.max_token_len, dt=torch.bool)
        self.state = z(batch, cfg.action_dim, dt=torch.float32)
        self.noise = z(batch, cfg.horizon, cfg.action_dim, dt=torch.float32)
        self.image_tokens = z(batch, cfg.image_tokens, g.width)
        self.prefix_embs = z(batch, cfg.prefix_len, g.width)
        self.prefix_pad = z(batch, cfg.prefix_len, dt=torch.bool)
        self.kv = (z(*kv_shape), z(*kv_shape))
        self.actions = z(batch, cfg.horizon, cfg.action_dim, dt=torch.float32)
        self.inputs = ("images", "image_masks", "tokens", "token_masks", "state", "noise")
        self.rtc_inputs = ("prev", "prev_weights", "max_weight") if rtc else ()
        if rtc:  # the previous chunk (model action space, aligned to the new chunk's steps) and its weights
            self.prev = z(batch, cfg.horizon, cfg.action_dim, dt=torch.float32)
            self.prev_weights = z(cfg.horizon, cfg.action_dim, dt=torch.float32)
            self.max_weight = z((), dt=torch.float32)
        pin = device.type == "cuda"
        self.host = {k: torch.zeros_like(getattr(self, k), device="cpu").pin_memory() if pin
                     else torch.zeros_like(getattr(self, k), device="cpu") for k in self.inputs + self.rtc_inputs}
        # numpy views of the pinned buffers: the per-call host copies are plain memcpys on the calling thread (a
        # torch CPU copy of an image is split over intra-op threads, whose wake-ups stalled it for ms at p99)
        self.host_np = {k: v.numpy() for k, v in self.host.items()}
        self.host_actions = torch.zeros_like(self.actions, device="cpu")
        if pin:
            self.host_actions = self.host_actions.pin_memory()


class Bucket:
    """One batch size: its buffers, its four stages bound to them, and their CUDA graphs once captured."""

    def __init__(self, runner: PolicyRunner, batch: int, rtc: bool):
        self.batch = batch
        self.buf = StaticBuffers(runner.model, runner.device, batch, rtc)
        self.stages: dict[str, Callable[[], None]] = {
            "vision": lambda: runner._vision(self.buf), "embed_prefix": lambda: runner._embed_prefix(self.buf),
            "prefill": lambda: runner._prefill(self.buf), "denoise": lambda: runner._denoise(self.buf)}
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.to_resize: list[tuple[int, int, torch.Tensor]] = []  # (row, camera, full-size frame on the device)


class PolicyRunner:
    """Runs pi0 / pi0.5 on one robot's observations (`infer`), or on several robots' at once (`infer_batch`).
    Implements pi_policy.observation.Policy.

    cameras: the camera set; the runner serves cameras.served, in that order.
    choices: what runs each stage (pi_policy.runtime.choice, planned and settled by build_runner); vision, prefill
    and denoise: the callables of a non-PyTorch implementation of the stage (None: the model's own code).
    batch_sizes: the batches infer_batch runs without recapture (buffers and CUDA graphs for each; 1 always).
    """

    def __init__(self, model: PiModel, tokenizer, normalizer: Normalizer, cameras: CameraSet,
                 choices: dict[str, StageChoice], *, vision: Callable | None = None, prefill: PrefillFn | None = None,
                 denoise: Callable | None = None, seed: int = 0, rtc: RTCSettings | None = None,
                 batch_sizes: tuple[int, ...] = (1,)):
        cfg = model.cfg
        self.model, self.cfg = model.eval(), cfg
        self.device = next(model.parameters()).device
        self.tokenizer, self.normalizer = tokenizer, normalizer
        self.cameras = cameras
        self.camera_names = list(cameras.served)
        if len(self.camera_names) != cfg.num_cameras:
            raise ValueError(f"the model is built for {cfg.num_cameras} cameras, got {self.camera_names}")
        self.horizon, self.action_dim = cfg.horizon, normalizer.action_dim
        self.rtc = rtc if rtc is not None and rtc.on else None
        self.choices = dict(choices)
        model.requires_grad_(False)  # inference only: guided RTC differentiates with respect to the actions alone
        self.batch_sizes = batch_buckets(batch_sizes)
        if self.rtc is not None and self.batch_sizes != (1,):
            raise ValueError(f"real-time chunking runs one robot at a time; got batch sizes {list(self.batch_sizes)}")
        self.buckets = {n: Bucket(self, n, self.rtc is not None) for n in self.batch_sizes}
        self.buf = self.buckets[1].buf  # batch 1: what infer uses
        self.rtc_inputs = None
        if self.rtc is not None:
            b = self.buf
            self.rtc_inputs = RTCInputs(self.rtc.mode, b.prev, b.prev_weights, b.max_weight)
        self.prefill_fn = prefill or model.prefill
        self.velocity_fn = model.velocity
        # Guided RTC backpropagates through the velocity: it uses the model's own (plain or torch.compile'd, which
        # supports autograd), never a replacement kernel that might not.
        self.guided_velocity_fn = model.velocity
        self.vision_fn = vision or model.embed_images
        self._plain = (self.vision_fn, self.prefill_fn, self.velocity_fn, self.guided_velocity_fn)
        mode = os.environ.get("PI_POLICY_COMPILE_MODE") or None  # e.g. max-autotune-no-cudagraphs
        if self.choices["vision"].compiled:
            self.vision_fn = torch.compile(self.vision_fn, dynamic=False, mode=mode)
        if self.choices["prefill"].compiled:
            self.prefill_fn = torch.compile(self.prefill_fn, dynamic=False, mode=mode)
        if self.choices["denoise"].compiled:  # one step compiled; the 10-step loop is captured in one CUDA graph
            self.velocity_fn = torch.compile(model.velocity, dynamic=False, mode=mode)
            self.guided_velocity_fn = self.velocity_fn
        self.denoise_fn = denoise  # None: the model's loop over velocity_fn
        self.stages = self.buckets[1].stages
        self.graphs = self.buckets[1].graphs
        self.use_graphs = any(c.graph for c in self.choices.values())
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.startup_ms: dict[str, float] = {}
        self._token_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # pi0's prompt tokens, oldest first
        self.timer = StageTimer(self.device)

    @property
    def backends(self) -> dict[str, str]:
        """Each stage's implementation as a label (bf16-graph-compiled, triton-graph, ...): what the latency
        records, the node's diagnostics and the tables show."""
        return {s: c.label for s, c in self.choices.items()}

    @property
    def backend_note(self) -> str:
        """Why a stage runs other than asked (a fallback), or what the user should know about it; empty if none."""
        return notes(self.choices)

    # -- the four stages: static buffers in, static buffers out ---------------------------------
    @torch.no_grad()
    def _vision(self, b: StaticBuffers) -> None:
        b.image_tokens.copy_(self.vision_fn(pixels_to_model(b.images)))

    @torch.no_grad()
    def _embed_prefix(self, b: StaticBuffers) -> None:
        embs, pad = self.model.embed_prefix(b.image_tokens, b.image_masks, b.tokens, b.token_masks)
        b.prefix_embs.copy_(embs)
        b.prefix_pad.copy_(pad)

    @torch.no_grad()
    def _prefill(self, b: StaticBuffers) -> None:
        self.prefill_fn(b.prefix_embs, b.prefix_pad, b.kv)

    @torch.no_grad()
    def _denoise(self, b: StaticBuffers) -> None:
        if self.denoise_fn is not None:  # the fused expert: its own loop (no real-time chunking: runtime.choice)
            b.actions.copy_(self.denoise_fn(b.kv, b.prefix_pad, b.state, b.noise))
            return
        guided = self.rtc is not None and self.rtc.mode == "guided"
        velocity = self.guided_velocity_fn if guided else self.velocity_fn
        b.actions.copy_(self.model.denoise(b.kv, b.prefix_pad, b.state, b.noise, velocity=velocity,
                                           rtc=self.rtc_inputs))

    # -- start-up --------------------------------------------------------------------------------
    def warmup(self, iters: int = 3, progress: bool = True) -> dict[str, float]:
        """Run every stage of every bucket a few times on dummy observations, then capture one CUDA graph per
        stage and bucket (all in one memory pool: each graph reads and writes only static buffers across replays,
        so the buckets' graphs may share their scratch memory in any replay order)."""
        t0 = time.perf_counter()
        state_dim = self.normalizer.state_dim or self.normalizer.action_dim
        dummy = Observation(images={}, state=np.zeros(state_dim, np.float32), prompt="warm up")
        for bucket in self.buckets.values():
            self._stage(bucket, [dummy] * bucket.batch, [None] * bucket.batch)
        buckets = len(self.buckets)
        steps = iters * buckets + (len(STAGES) * buckets if self.use_graphs else 0)
        with tqdm(total=steps, desc="warm-up", disable=not progress, leave=False) as bar:
            stream = torch.cuda.Stream() if self.use_graphs else None
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                for i in range(iters):
                    for bucket in self.buckets.values():
                        for name in STAGES:
                            while True:
                                try:
                                    bucket.stages[name]()
                                    break
                                except Exception as e:  # noqa: BLE001 - a compiler failure must not stop the robot
                                    if i > 0 or not self._fall_back(name, f"{type(e).__name__}: {e}"):
                                        raise
                        bar.update()
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
                torch.cuda.synchronize()
                pool = torch.cuda.graph_pool_handle()
                for bucket in self.buckets.values():
                    for name, fn in bucket.stages.items():
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool):
                            fn()
                        bucket.graphs[name] = g
                        bar.update()
                torch.cuda.synchronize()
        settle_host()
        self.startup_ms["warmup_and_capture"] = (time.perf_counter() - t0) * 1e3
        return self.startup_ms

    def _fall_back(self, stage: str, reason: str) -> bool:
        """A stage failed on its first run: drop the fused denoise or torch.compile, whichever is in play and can
        be the cause. False when neither is left to drop."""
        reason = reason.splitlines()[0][:300]
        if stage == "denoise" and self.denoise_fn is not None:
            self.denoise_fn = None
            self.choices["denoise"] = fall_back(self.choices["denoise"], f"failed on its first run: {reason}")
            log.warning(self.choices["denoise"].note)
            return True
        compiled = [s for s, c in self.choices.items() if c.compiled]
        if not compiled:
            return False
        # torch.compile failed (no Triton on this platform, say): run the same stages uncompiled, visibly
        self.vision_fn, self.prefill_fn, self.velocity_fn, self.guided_velocity_fn = self._plain
        for s in compiled:
            self.choices[s] = uncompiled(self.choices[s], reason)
        log.warning(self.choices[compiled[0]].note.split("; ")[-1])
        return True

    # -- per call --------------------------------------------------------------------------------
    def load_inputs(self, obs: Observation, noise: np.ndarray | None = None) -> None:
        """Validate the observation and stage it in the device buffers (what infer does before the stages)."""
        self._stage(self.buckets[1], [obs], [noise])

    def _stage(self, bucket: Bucket, observations: list[Observation], noises: list[np.ndarray | None]) -> None:
        """Validate each observation and stage it in its row of the bucket's buffers; the rows after them are
        padding (nothing valid to attend to). RowError names the first invalid observation."""
        b, h = bucket.buf, bucket.buf.host_np
        bucket.to_resize = []
        for row, (obs, noise) in enumerate(zip(observations, noises, strict=True)):
            try:
                self._stage_row(bucket, row, obs, noise)
            except ValueError as e:
                raise RowError(row, str(e)) from None
        n = len(observations)
        if n < bucket.batch:  # padding: every image and prompt token masked
            for k in ("images", "image_masks", "tokens", "token_masks", "state"):
                h[k][n:] = 0
        for k in b.inputs:
            if k != "noise":
                getattr(b, k).copy_(b.host[k], non_blocking=True)
        given = [row for row, noise in enumerate(noises) if noise is not None]
        if len(given) < bucket.batch:
            b.noise.normal_(generator=self.generator)
        for row in given:
            b.noise[row].copy_(b.host["noise"][row], non_blocking=True)

    def _stage_row(self, bucket: Bucket, row: int, obs: Observation, noise: np.ndarray | None) -> None:
        cfg, h = self.cfg, bucket.buf.host_np
        unknown = self.cameras.unknown(obs.images)
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; this policy takes {self.camera_names}")
        size = cfg.vision.image_size
        for i, name in enumerate(self.camera_names):
            img = obs.images.get(name)
            h["image_masks"][row, i] = img is not None
            if img is None:
                h["images"][row, i] = 0
                continue
            img = to_rgb_uint8(img, f"camera {name}")
            if img.shape[:2] == (size, size):
                h["images"][row, i] = img
            else:  # full-size frames are resized on the device, as part of the vision stage
                bucket.to_resize.append((row, i, torch.from_numpy(np.ascontiguousarray(img)).to(self.device)))
        state = self.normalizer.normalize_state(np.asarray(obs.state), pad=False)
        h["state"][row] = 0.0
        h["state"][row, : state.size] = state
        tokens, mask = self._tokenize(obs.prompt, state)
        h["tokens"][row] = tokens
        h["token_masks"][row] = mask
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.shape != (cfg.horizon, cfg.action_dim):
                raise ValueError(f"noise must have shape {(cfg.horizon, cfg.action_dim)}, got {noise.shape}")
            h["noise"][row] = noise

    def load_previous_chunk(self, prev_chunk: np.ndarray | None, delay: int = 0) -> None:
        """Stage the unexecuted rest of the chunk being executed, in robot units, row j at this observation's
        stamp + j * control period, and the delay (steps executed before the new chunk arrives)."""
        if self.rtc is None:
            if prev_chunk is not None:
                raise ValueError("a previous chunk was given, but this runner was built with real-time chunking off")
            return
        h, n = self.buf.host_np, 0
        h["prev"][:] = 0.0
        h["prev_weights"][:] = 0.0
        if prev_chunk is not None:
            prev = np.asarray(prev_chunk, np.float32)
            if prev.ndim != 2 or prev.shape[1] != self.action_dim:
                raise ValueError(f"previous chunk must have shape (steps, {self.action_dim}), got {prev.shape}")
            if isinstance(delay, bool) or not isinstance(delay, int | np.integer) or delay < 0:
                raise ValueError(f"delay must be a whole number of control periods >= 0, got {delay!r}")
            n = min(len(prev), self.horizon)
        if n:
            h["prev"][0, :n] = self.normalizer.normalize_actions(prev[:n])
            w = prefix_weights(int(delay), self.rtc.execution_horizon, n, self.rtc.prefix_schedule)
            h["prev_weights"][:n, : self.action_dim] = w[:, None].numpy()  # padded action dims are never pulled
        h["max_weight"][...] = self.rtc.max_guidance_weight
        for k in self.buf.rtc_inputs:
            getattr(self.buf, k).copy_(self.buf.host[k], non_blocking=True)

    def _tokenize(self, prompt: str, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if self.cfg.pi05:  # the state is part of the prompt
            return self.tokenizer.tokenize(prompt, state)
        if prompt not in self._token_cache:  # a fleet's robots may each have their own task
            if len(self._token_cache) >= TOKEN_CACHE:
                self._token_cache.pop(next(iter(self._token_cache)))
            self._token_cache[prompt] = self.tokenizer.tokenize(prompt)
        return self._token_cache[prompt]

    def _resize_images(self, bucket: Bucket) -> None:
        for row, i, img in bucket.to_resize:
            bucket.buf.images[row, i].copy_(resize_with_pad_tensor(img, self.cfg.vision.image_size))
        bucket.to_resize = []

    def run_stages(self, batch: int = 1) -> dict[str, float]:
        """Run the four stages of bucket `batch` on what is in its buffers; returns ms per stage."""
        bucket = self.buckets[batch]
        self.timer.start()
        for name, fn in bucket.stages.items():
            run = bucket.graphs[name].replay if name in bucket.graphs else fn
            if name == "vision" and bucket.to_resize:
                self.timer.run(name, lambda run=run: (self._resize_images(bucket), run()))
            else:
                self.timer.run(name, run)
        return self.timer.read()

    def infer(self, obs: Observation, noise: np.ndarray | None = None, prev_chunk: np.ndarray | None = None,
              delay: int = 0) -> PolicyOutput:
        """One chunk for `obs`. With real-time chunking on, `prev_chunk` (robot units) is the rest of the chunk
        being executed and `delay` the control periods before the new one reaches the robot."""
        t0 = time.perf_counter()
        self.load_inputs(obs, noise)
        self.load_previous_chunk(prev_chunk, delay)
        prep_ms = (time.perf_counter() - t0) * 1e3
        stages_ms = self.run_stages()
        self.buf.host_actions.copy_(self.buf.actions)
        actions = self.normalizer.unnormalize_actions(self.buf.host_actions[0].numpy())
        host_ms = (time.perf_counter() - t0) * 1e3
        return PolicyOutput(actions, LatencyRecord(stages_ms, host_ms, dict(self.backends), prep_ms))

    def bucket_for(self, n: int) -> int:
        """The batch size that runs n observations: the smallest bucket that holds them."""
        for size in self.batch_sizes:
            if size >= n:
                return size
        raise ValueError(f"{n} observations in one batch; this runner holds at most {self.batch_sizes[-1]} "
                         f"(its batch sizes: {list(self.batch_sizes)})")

    def infer_batch(self, observations: list[Observation],
                    noises: list[np.ndarray | None] | None = None) -> list[PolicyOutput]:
        """One chunk per observation, all in one pass of the stages (the smallest bucket that holds them, the rows
        left over masked). Each row's chunk is the one `infer` gives for that observation and noise. The latency
        records carry the batch's stage times; an invalid observation raises RowError with its index."""
        t0 = time.perf_counter()
        n = len(observations)
        if n == 0:
            return []
        noises = list(noises) if noises is not None else [None] * n
        if len(noises) != n:
            raise ValueError(f"{n} observations but {len(noises)} noises")
        bucket = self.buckets[self.bucket_for(n)]
        self._stage(bucket, list(observations), noises)
        prep_ms = (time.perf_counter() - t0) * 1e3
        stages_ms = self.run_stages(bucket.batch)
        b = bucket.buf
        b.host_actions.copy_(b.actions)
        actions = [self.normalizer.unnormalize_actions(b.host_actions[row].numpy()) for row in range(n)]
        host_ms = (time.perf_counter() - t0) * 1e3
        return [PolicyOutput(a, LatencyRecord(dict(stages_ms), host_ms, dict(self.backends), prep_ms))
                for a in actions]


def settle_host() -> None:
    """After start-up, keep the host quiet while serving: stop torch.compile's worker processes (they would
    compete with the robot's threads) and move every object alive now out of the garbage collector's reach, so
    that a collection inside infer walks only what serving allocates (a p99 tail, not the median)."""
    if "torch._inductor.async_compile" in sys.modules:  # only where torch.compile ran
        try:
            sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
        except Exception:  # noqa: BLE001 - a private API: its absence only costs the optimization
            pass
    gc.collect()
    gc.freeze()


atexit.register(gc.unfreeze)  # frozen objects are never finalized: extension modules complain at exit
