"""Many bags: find them, evaluate each into its own report, here or in worker processes or Ray tasks.

One bag is one job, evaluated by `evaluate_job` wherever it runs, so a bag scores the same alone, among others,
in a worker process or in a Ray task. A worker keeps the policies it built for its next bag (one model per
backend per worker) and reseeds their noise before each bag, so results do not depend on which worker ran a
bag or what it ran before.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pi_policy.bag.metrics import Pool, tick_errors
from pi_policy.bag.preflight import BagMismatch, preflight
from pi_policy.bag.reader import BagError, inspect_bag
from pi_policy.bag.replay import Evaluation, ReplaySetup, evaluate, resolve_topic
from pi_policy.bag.summary import scored_verdict
from pi_policy.observation import Policy

BAG_FILES = (".mcap", ".db3")
WORST = 10  # worst ticks kept per bag, and across bags


def is_bag(path: Path) -> bool:
    """A rosbag2 folder (with metadata.yaml) or a single .mcap / .db3 file."""
    return (path / "metadata.yaml").is_file() if path.is_dir() else path.suffix in BAG_FILES


def find_bags(paths: list[str | Path]) -> list[Path]:
    """The bags named, and every bag inside a folder that is not itself a bag (searched recursively)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise BagError(f"bag {path} does not exist")
        if is_bag(path):
            found.append(path)
            continue
        if not path.is_dir():
            raise BagError(f"{path} is not a rosbag2 bag (a folder with metadata.yaml, or a .mcap / .db3 file)")
        inside = []
        for root, dirs, files in os.walk(path):
            here = Path(root)
            if is_bag(here):
                inside.append(here)
                dirs.clear()  # a bag's own storage files are not bags of their own
                continue
            dirs.sort()
            inside += [here / f for f in sorted(files) if Path(f).suffix in BAG_FILES]
        if not inside:
            raise BagError(f"{path} holds no rosbag2 bag (a folder with metadata.yaml, or a .mcap / .db3 file)")
        found += sorted(inside)
    if len(set(found)) != len(found):
        raise BagError(f"a bag is named twice: {[str(p) for p in found if found.count(p) > 1][0]}")
    return found


def report_names(bags: list[Path]) -> list[str]:
    """A distinct folder name per bag: its own name, made unique with its parent's where two share one."""
    names = [b.stem if b.is_file() else b.name for b in bags]
    names = [f"{b.parent.name}_{n}" if names.count(n) > 1 else n for b, n in zip(bags, names, strict=True)]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@dataclass
class BagJob:
    """Everything a worker needs to evaluate one bag and write its report (picklable)."""

    bag: str
    name: str
    out: str
    setup: ReplaySetup
    backends: list[str]
    first_k: int = 10
    min_scored: float = 0.5
    meta: dict = field(default_factory=dict)
    write_bag: str | None = None
    write_bag_storage: str = "mcap"


@dataclass
class BagResult:
    """What comes back from a job: the bag's metrics and what pooling across bags needs, or why it failed."""

    name: str
    bag: str
    out: str
    metrics: dict | None = None
    pools: dict[str, Pool] = field(default_factory=dict)
    worst: list[dict] = field(default_factory=list)
    verdict: str | None = None  # scored_verdict: too few ticks scored
    error: str | None = None  # the bag could not be evaluated
    written: dict[str, int] = field(default_factory=dict)  # --write-bag: topic -> messages


class PolicyCache:
    """The policies one worker built, one per backend, kept for its next bag."""

    def __init__(self, device: str | None = None, progress: bool = True):
        self.device, self.progress = device, progress
        self.policies: dict[str, Policy] = {}

    def get(self, setup: ReplaySetup, backend: str) -> Policy:
        from pi_policy import runtime

        kwargs = setup.params.runner_kwargs() | {"backend": backend, "progress": self.progress}
        if self.device:
            kwargs["device"] = self.device
        key = repr(sorted(kwargs.items()))
        if key not in self.policies:
            self.policies[key] = runtime.build_runner(**kwargs)
        policy = self.policies[key]
        # The denoising noise comes from the policy's generator: restart it so that every bag sees the same
        # noise sequence, whether the policy is fresh or has run other bags (or its warm-up) before.
        generator = getattr(policy, "generator", None)
        if generator is not None:
            generator.manual_seed(setup.params.seed)
        return policy


def worst_ticks(ev: Evaluation, n: int = WORST) -> list[dict]:
    """The baseline's n scored ticks with the largest error."""
    tr, t0 = ev.first.trace, ev.info.start_ns / 1e9
    if not len(tr.times):
        return []
    mae, _ = tick_errors(tr)
    order = np.argsort(-np.nan_to_num(mae, nan=-np.inf), kind="stable")[:n]
    return [{"tick": int(tr.ticks[i]), "time_s": round(float(ev.first.tick_times[tr.ticks[i]] - t0), 3),
             "mae": float(mae[i]), "backend": tr.backend} for i in order if np.isfinite(mae[i])]


def evaluate_job(job: BagJob, policies: PolicyCache, progress: bool = False) -> BagResult:
    """Evaluate one bag, write its report (and output bag), and return its metrics; failures become an error."""
    from pi_policy.bag.report import write_report
    from pi_policy.bag.writer import write_output_bag

    result = BagResult(job.name, job.bag, job.out)
    try:
        ev = evaluate(job.bag, job.setup, lambda backend: policies.get(job.setup, backend), job.backends,
                      progress=progress, keep_outputs=bool(job.write_bag))
        result.metrics = write_report(ev, job.out, job.first_k, job.meta | {"bag_name": job.name})
        if job.write_bag:
            p, ns = job.setup.params, job.setup.namespace
            result.written = write_output_bag(ev, job.write_bag, resolve_topic(p.action_topic, ns),
                                              resolve_topic(p.latency_topic, ns), job.write_bag_storage)
    except Exception as exc:  # noqa: BLE001 - one bad bag must not end a batch: it is reported with the others
        text = str(exc) if isinstance(exc, (BagError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        result.error = " ".join(text.split())
        return result
    result.pools = {r.backend: Pool.from_trace(r.trace) for r in ev.replays}
    result.worst = worst_ticks(ev)
    result.verdict = scored_verdict(result.metrics, job.min_scored)
    return result


def check_bags(jobs: list[BagJob]) -> dict[str, list[str]]:
    """The pre-flight check of every bag before any model is built: raises one BagError naming each bag that does
    not fit; returns each bag's notes."""
    notes, problems = {}, []
    for job in jobs:
        try:
            notes[job.name] = preflight(inspect_bag(job.bag), job.setup)
        except BagMismatch as exc:
            problems.append(str(exc))
        except BagError as exc:  # unreadable or empty
            if len(jobs) == 1:
                raise
            problems.append(" ".join(str(exc).split()))
    if problems:
        head = f"{len(problems)} of {len(jobs)} bags cannot be evaluated:\n" if len(jobs) > 1 else ""
        raise BagMismatch(head + "\n".join(problems))
    return notes


# -- worker processes ---------------------------------------------------------------------------------------------

_POLICIES: PolicyCache | None = None  # the worker process's policies


def _init_worker(counter, devices: list[str], log_queue, threads: int) -> None:
    global _POLICIES
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]  # the parent prints each warning once
    root.setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(threads)
    _POLICIES = PolicyCache(devices[index % len(devices)] if devices else None, progress=False)


def _run_in_worker(job: BagJob) -> BagResult:
    assert _POLICIES is not None, "worker not initialized"
    return evaluate_job(job, _POLICIES)


def worker_devices(device: str, workers: int) -> list[str]:
    """Round-robin GPUs for `--device cuda` (no index) with several workers; [] keeps the configured device."""
    if device != "cuda" or workers < 2:
        return []
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i % n}" for i in range(workers)] if n > 1 else []


def run_local(jobs: list[BagJob], workers: int = 1, progress: bool = True) -> Iterator[BagResult]:
    """Evaluate the jobs in this process (workers=1) or in `workers` spawned processes; yields as bags finish."""
    if workers <= 1:
        policies = PolicyCache(progress=progress)
        for job in tqdm(jobs, desc="bags", unit="bag", disable=not progress or len(jobs) < 2):
            yield evaluate_job(job, policies, progress=progress and len(jobs) == 1)
        return
    ctx = mp.get_context("spawn")  # a fork would copy this process's torch and CUDA state
    workers = min(workers, len(jobs))
    counter, log_queue = ctx.Value("i", 0), ctx.Queue()
    listener = logging.handlers.QueueListener(log_queue, *logging.getLogger().handlers, respect_handler_level=True)
    listener.start()
    threads = max(1, (os.cpu_count() or 1) // workers)
    devices = worker_devices(jobs[0].setup.params.device, workers)
    try:
        with ctx.Pool(workers, _init_worker, (counter, devices, log_queue, threads)) as pool:
            yield from tqdm(pool.imap_unordered(_run_in_worker, jobs), total=len(jobs), desc="bags", unit="bag",
                            disable=not progress)
            pool.close()  # let the workers exit on their own: a terminated one leaves its semaphores behind
            pool.join()
    finally:
        listener.stop()


# -- Ray ----------------------------------------------------------------------------------------------------------

def _run_in_ray(job: BagJob) -> BagResult:
    global _POLICIES
    if _POLICIES is None:  # Ray reuses its worker processes: the policies stay for the next bag
        # A task that asked for a GPU sees only that one, as cuda:0.
        _POLICIES = PolicyCache("cuda" if job.setup.params.device.startswith("cuda") else None, progress=False)
    return evaluate_job(job, _POLICIES)


def run_ray(jobs: list[BagJob], address: str | None = None, workers: int | None = None,
            progress: bool = True) -> Iterator[BagResult]:
    """The same jobs as Ray tasks: a local Ray instance (`workers` CPUs) or the cluster at `address`.

    A task asks for one GPU when the device is CUDA; Ray then shows it only that GPU. The bags' paths must be
    readable where the tasks run (shared storage on a cluster), and pi_policy installed there.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        local = {"num_cpus": workers} if address is None and workers else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 **local)
    gpu = 1 if jobs and jobs[0].setup.params.device.startswith("cuda") else 0
    task = ray.remote(_run_in_ray).options(num_gpus=gpu, max_retries=0)
    try:
        pending = [task.remote(job) for job in jobs]
        with tqdm(total=len(jobs), desc="bags (ray)", unit="bag", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update()
                yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()
