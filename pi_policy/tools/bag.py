"""`pi-policy make-demo-bag` and `pi-policy eval-bag`: argument parsing, the checks before any model is built,
and the exit status a CI job can trust."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from pi_policy.bag.batch import BagJob, BagResult, check_bags, find_bags, report_names
from pi_policy.bag.demo_bag import STORAGES, DemoSpec, write_demo_bag
from pi_policy.bag.eval_config import read_eval_config
from pi_policy.bag.parallel import run_local, run_ray
from pi_policy.bag.passes import ReplayPass, plan_passes
from pi_policy.bag.preflight import BagMismatch
from pi_policy.bag.reader import BagError
from pi_policy.bag.setup import ACTION_SOURCES, ReplaySetup
from pi_policy.node import params as node_params
from pi_policy.node.params import NodeParams, ParamError, params_from_dict
from pi_policy.runtime.options import RTC_MODES
from pi_policy.tools.flags import CONFIG_FLAGS, add_config_overrides, param_overrides


def add_parser(subparsers) -> None:
    """Register both subcommands; each sets `func` to its run function."""
    p = subparsers.add_parser("make-demo-bag", help="write a small synthetic rosbag2 for demos and tests",
                              description="Write a small synthetic rosbag2: three cameras (raw and jpeg), "
                                          "joint states, a prompt and recorded actions.")
    p.add_argument("out", help="output bag directory (must not exist)")
    p.add_argument("--storage", choices=sorted(STORAGES), default="mcap", help="storage format (default: %(default)s)")
    p.add_argument("--duration", type=float, default=DemoSpec.duration_s, help="seconds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the recorded motion and delays (default: 0)")
    p.set_defaults(func=run_make_demo_bag)

    e = subparsers.add_parser(
        "eval-bag", help="replay rosbag2 recordings through the policy and score them",
        description="Replay rosbag2 recordings (mcap or sqlite3) through the node's observation logic and the "
                    "policy; compare chunks with the recorded actions. The bags are checked against the config "
                    "before any model is built. Exit status 1 when a bag does not fit the config, cannot be read, "
                    "or scored fewer than --min-scored of its ticks.")
    e.add_argument("bags", nargs="+", metavar="BAG",
                   help="rosbag2 folder, single .mcap / .db3 file, or a folder of bags (each bag inside is "
                        "evaluated); several bags get a report each and an aggregate report")
    add_config_arguments(e)
    add_recorded_action_arguments(e)
    add_rtc_arguments(e)
    add_scoring_arguments(e)
    add_output_arguments(e)
    add_parallel_arguments(e)
    e.set_defaults(func=run_eval_bag)


def add_config_arguments(e: argparse.ArgumentParser) -> None:
    """The node's parameter file and the command line's overrides of it."""
    e.add_argument("--config", required=True,
                   help="the node's ROS 2 parameter file, e.g. config/thor.yaml (config/demo_bag.yaml for the demo)")
    add_config_overrides(e, CONFIG_FLAGS, repeat=("--backend",))
    e.add_argument("--rate", type=float, help="inference ticks per second (default: the config's)")
    e.add_argument("--camera-topic", action="append", default=[], metavar="CAMERA=TOPIC",
                   help="override one camera's topic")
    e.add_argument("--joint-state-topic", help="override the joint state topic")
    e.add_argument("--prompt-topic", help="override the prompt topic")
    e.add_argument("--namespace", default="/", help="the node's namespace, for its relative topic names "
                                                     "(default: %(default)s)")


def add_rtc_arguments(e: argparse.ArgumentParser) -> None:
    """Real-time chunking: the modes to compare, the delay, and replay in bag time."""
    e.add_argument("--rtc", action="append", choices=RTC_MODES, default=None,
                   help="real-time chunking mode; repeat to compare modes on one backend (default: the config's)")
    e.add_argument("--delay", help="control periods from an observation to its chunk reaching the robot: auto "
                                   "(measured end to end) or N (default: the config's inference_delay_steps)")
    e.add_argument("--realtime", action="store_true",
                   help="inference takes bag time: drop the ticks the node would drop while a slow inference runs "
                        "(implied by --rtc)")


def add_recorded_action_arguments(e: argparse.ArgumentParser) -> None:
    """What the chunks are compared with; the config's eval_bag section sets the same, the flags override it."""
    e.add_argument("--recorded-action-source", "--action-source", choices=ACTION_SOURCES, default=None,
                   help="compare with a recorded action topic, or with the future measured joint positions "
                        "(default: the config's eval_bag.recorded_action_source, else topic)")
    e.add_argument("--recorded-action-topic", "--action-topic", default=None, metavar="TOPIC",
                   help="topic of the recorded actions: JointTrajectory, JointState or Float32/64MultiArray "
                        "(default: the config's eval_bag.recorded_action_topic)")


def add_scoring_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--first-k", type=int, default=10, help="steps for the first-k metrics (default: %(default)s)")
    e.add_argument("--max-ticks", type=int, help="stop each bag after this many ticks")
    e.add_argument("--min-scored", type=float, default=0.5, metavar="FRACTION",
                   help="exit 1 when a backend scored fewer than this fraction of a bag's ticks (default: "
                        "%(default)s; 0 to never fail on it)")


def add_output_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--out", default="reports/eval-bag",
                   help="report folder; with several bags, one subfolder per bag plus the aggregate report "
                        "(default: %(default)s)")
    e.add_argument("--write-bag", metavar="OUT",
                   help="also write the published chunks and latency to a new bag (with several bags: OUT/<bag>)")
    e.add_argument("--write-bag-storage", choices=sorted(STORAGES), default="mcap",
                   help="storage format of --write-bag (default: %(default)s)")


def add_parallel_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--workers", type=int, default=1,
                   help="evaluate bags in this many processes, one model each (GPUs round-robin for --device "
                        "cuda); with --ray, the CPUs of the local Ray instance (default: %(default)s)")
    e.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each bag as a Ray task: a local Ray instance, or the cluster at ADDRESS (e.g. auto, "
                        "ray://head:10001); needs pip install -e \".[ray]\"")


def run_make_demo_bag(args: argparse.Namespace) -> int:
    try:
        path = write_demo_bag(args.out, args.storage, DemoSpec(duration_s=args.duration, seed=args.seed))
    except (ValueError, OSError) as exc:
        return _fail(exc)
    print(f"wrote {path} ({args.storage}, {args.duration:g} s)")
    return 0


def load_params(args: argparse.Namespace) -> NodeParams:
    """The config file with the command line's overrides applied, type-checked and validated as the node does."""
    values = node_params.read_param_values(args.config) | param_overrides(args, repeat=("--backend",))
    if args.camera_topic:
        names = values.get("camera_names", NodeParams().camera_names)
        topics = dict(zip(names, values.get("camera_topics", NodeParams().camera_topics), strict=False))
        for item in args.camera_topic:
            cam, sep, topic = item.partition("=")
            if not sep or cam not in topics:
                raise ParamError(f"--camera-topic {item!r}: expected CAMERA=TOPIC, CAMERA one of {list(topics)}")
            topics[cam] = topic
        values["camera_topics"] = list(topics.values())
    for flag, name in (("rate", "inference_rate_hz"), ("joint_state_topic", "joint_state_topic"),
                       ("prompt_topic", "prompt_topic"), ("delay", "inference_delay_steps")):
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    try:
        return params_from_dict(values)
    except ParamError as exc:
        raise ParamError(f"{args.config} with the command line's overrides: {exc}") from None


def load_setup(args: argparse.Namespace, params: NodeParams) -> ReplaySetup:
    """The replay's settings: the recorded-action source from the flags, else the config's eval_bag section."""
    config = read_eval_config(args.config)
    source = args.recorded_action_source or config.recorded_action_source
    topic = args.recorded_action_topic or config.recorded_action_topic or None
    return ReplaySetup(params, source, topic, args.namespace, args.max_ticks,
                       realtime=args.realtime or bool(args.rtc))


def make_jobs(args: argparse.Namespace, setup: ReplaySetup, passes: list[ReplayPass]) -> list[BagJob]:
    """One job per bag: its report folder, and its output bag with --write-bag."""
    if not 0 <= args.min_scored <= 1:
        raise ValueError(f"--min-scored must be a fraction in [0, 1], got {args.min_scored}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.write_bag and Path(args.write_bag).exists():
        raise FileExistsError(f"--write-bag {args.write_bag} exists already")
    bags = find_bags(args.bags)
    single = len(bags) == 1
    meta = {"command": " ".join(sys.argv), "config": args.config, "backends": [p.name for p in passes]} | {
        k: getattr(setup.params, k) or None for k in ("preset", "checkpoint", "device", "seed")}
    if args.rtc:
        meta["rtc_modes"] = [p.name for p in passes]
    jobs = []
    for bag, name in zip(bags, report_names(bags), strict=True):
        out = Path(args.out) if single else Path(args.out) / name
        write = None if not args.write_bag else args.write_bag if single else str(Path(args.write_bag) / name)
        jobs.append(BagJob(str(bag), name, str(out), setup, passes, args.first_k, args.min_scored, meta, write,
                           args.write_bag_storage))
    return jobs


def run_jobs(args: argparse.Namespace, jobs: list[BagJob]) -> list[BagResult]:
    if args.ray is not None:
        return list(run_ray(jobs, None if args.ray == "local" else args.ray, args.workers if args.workers > 1
                            else None))
    if args.write_bag and len(jobs) > 1:
        Path(args.write_bag).mkdir(parents=True)
    return list(run_local(jobs, args.workers))


def run_eval_bag(args: argparse.Namespace) -> int:
    try:
        params = load_params(args)
        setup = load_setup(args, params)
        passes = plan_passes(setup, args.backend or [params.backend], args.rtc)
        jobs = make_jobs(args, setup, passes)
        if args.ray is not None and importlib.util.find_spec("ray") is None:
            raise ModuleNotFoundError("--ray needs Ray", name="ray")
        check_bags(jobs)  # every bag against the config, before any model is built
    except (BagError, ValueError, OSError, RuntimeError) as exc:  # ParamError is a ValueError
        return _fail(exc)
    results = run_jobs(args, jobs)
    return report_one(results[0]) if len(jobs) == 1 else report_many(args, results, [p.name for p in passes])


def report_one(result: BagResult) -> int:
    from pi_policy.bag.report import format_summary

    if result.error:
        return _fail(BagError(result.error))
    print(format_summary(result.metrics, result.out))
    if result.written:
        print("wrote output bag: " + ", ".join(f"{t} ({n})" for t, n in result.written.items()))
    if result.verdict:
        return _fail(BagError(result.verdict))
    return 0


def report_many(args: argparse.Namespace, results: list[BagResult], passes: list[str]) -> int:
    from pi_policy.bag.aggregate import format_aggregate, write_aggregate

    agg = write_aggregate(results, passes, args.first_k, args.out, args.min_scored)
    print(format_aggregate(agg, args.out))
    written = [r for r in results if r.written]
    if written:
        print(f"wrote {len(written)} output bags under {args.write_bag}")
    bad = agg["counts"]["failed"] + agg["counts"]["too_few_scored"]
    if bad:
        return _fail(BagError(f"{bad} of {len(results)} bags failed or scored too few ticks (listed above)"))
    return 0


def _fail(exc: Exception) -> int:
    if isinstance(exc, BagMismatch):  # a list of problems, one per line
        print("error: " + str(exc), file=sys.stderr)
    else:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, also for multi-line messages
    return 1
