"""Run eval-bag's jobs side by side: in spawned worker processes on this machine, or as Ray tasks on a cluster."""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
from collections.abc import Iterator

from pi_policy.bag.batch import BagJob, BagResult, PolicyCache, evaluate_job
from pi_policy.progress import progress_bar
from pi_policy.runtime.threads import resolve_threads

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
    _POLICIES = PolicyCache(devices[index % len(devices)] if devices else None, progress=False, threads=threads)


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
        for job in progress_bar(jobs, enabled=progress and len(jobs) > 1, desc="bags", unit="bag"):
            yield evaluate_job(job, policies, progress=progress and len(jobs) == 1)
        return
    ctx = mp.get_context("spawn")  # a fork would copy this process's torch and CUDA state
    workers = min(workers, len(jobs))
    counter, log_queue = ctx.Value("i", 0), ctx.Queue()
    listener = logging.handlers.QueueListener(log_queue, *logging.getLogger().handlers, respect_handler_level=True)
    listener.start()
    threads = max(1, resolve_threads(0) // workers)  # the automatic count, shared; --threads sets each worker's
    devices = worker_devices(jobs[0].setup.params.device, workers)
    try:
        with ctx.Pool(workers, _init_worker, (counter, devices, log_queue, threads)) as pool:
            yield from progress_bar(pool.imap_unordered(_run_in_worker, jobs), enabled=progress, total=len(jobs),
                                    desc="bags", unit="bag")
            pool.close()  # let the workers exit on their own: a terminated one leaves its semaphores behind
            pool.join()
    finally:
        listener.stop()


# -- Ray ----------------------------------------------------------------------------------------------------------

class _Collect(logging.Handler):
    """Keeps a Ray task's warnings for the driver, which prints them as worker processes' are printed."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _run_in_ray(job: BagJob) -> BagResult:
    global _POLICIES
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    try:
        if _POLICIES is None:  # Ray reuses its worker processes: the policies stay for the next bag
            # A task that asked for a GPU sees only that one, as cuda:0.
            _POLICIES = PolicyCache("cuda" if job.setup.params.device.startswith("cuda") else None, progress=False)
        result = evaluate_job(job, _POLICIES)
    finally:
        logging.getLogger().removeHandler(collect)
    result.logs = collect.records
    return result


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
    logged = set()
    try:
        pending = [task.remote(job) for job in jobs]
        with progress_bar(total=len(jobs), enabled=progress, desc="bags (ray)", unit="bag") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update()
                result = ray.get(done[0])
                for name, level, message in result.logs:  # each worker's model warnings, once
                    if (name, message) not in logged:
                        logged.add((name, message))
                        logging.getLogger(name).log(level, message)
                yield result
    finally:
        if started:
            ray.shutdown()
