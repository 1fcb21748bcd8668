"""Many bags as jobs: find the bags, name their reports, check them all, and evaluate one job into its report.

One bag is one job, evaluated by `evaluate_job` wherever it runs (here, in a worker process, in a Ray task: see
bag.parallel), so a bag scores the same alone or among others. A worker keeps the policies it built for its next
bag (one model per pass) and restarts their noise before each bag, so results do not depend on which worker
ran a bag or what it ran before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pi_policy.bag.metrics import Pool, tick_errors
from pi_policy.bag.passes import ReplayPass
from pi_policy.bag.preflight import BagMismatch, preflight
from pi_policy.bag.reader import BagError, inspect_bag
from pi_policy.bag.replay import Evaluation, evaluate
from pi_policy.bag.setup import ReplaySetup, resolve_topic
from pi_policy.bag.summary import scored_verdict
from pi_policy.observation import Policy
from pi_policy.runtime.spec import RunnerSpec

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
    setup: ReplaySetup  # the baseline's: topics, pre-flight check, --write-bag
    passes: list[ReplayPass]
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
    """The policies one worker built, one per pass's runner settings, kept for its next bag."""

    def __init__(self, device: str | None = None, progress: bool = True):
        self.device, self.progress = device, progress
        self.policies: dict[RunnerSpec, Policy] = {}

    def get(self, setup: ReplaySetup) -> Policy:
        from pi_policy import runtime

        spec = setup.params.runner_spec().replace(progress=self.progress)
        if self.device:
            spec = spec.replace(device=self.device)
        if spec not in self.policies:
            self.policies[spec] = runtime.build_runner(spec)
        policy = self.policies[spec]
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
        setups = {p.name: p.setup for p in job.passes}
        ev = evaluate(job.bag, job.setup, lambda name: policies.get(setups[name]), job.passes, progress=progress,
                      keep_outputs=bool(job.write_bag))
        result.metrics = write_report(ev, job.out, job.first_k, job.meta | {"bag_name": job.name})
        if job.write_bag:
            p, ns = job.setup.params, job.setup.namespace
            result.written = write_output_bag(ev, job.write_bag, resolve_topic(p.action_topic, ns),
                                              resolve_topic(p.latency_topic, ns), job.write_bag_storage)
    except Exception as exc:  # noqa: BLE001 - one bad bag must not end a batch: it is reported with the others
        text = str(exc) if isinstance(exc, (BagError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        result.error = " ".join(text.split())
        return result
    result.pools = {r.name: Pool.from_trace(r.trace) for r in ev.replays}
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
