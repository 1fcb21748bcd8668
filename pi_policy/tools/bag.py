"""`pi-policy make-demo-bag` and `pi-policy eval-bag`: argument parsing and the one-line error boundary."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from pi_policy.bag.demo_bag import ACTION_TOPIC, STORAGES, DemoSpec, write_demo_bag
from pi_policy.bag.reader import BagError
from pi_policy.bag.replay import ACTION_SOURCES, ReplaySetup, evaluate, resolve_topic
from pi_policy.node import params as node_params
from pi_policy.node.params import NodeParams, ParamError, params_from_dict
from pi_policy.runtime.options import RTC_MODES


def add_parser(subparsers) -> None:
    """Register both subcommands; each sets `func` to its run function."""
    p = subparsers.add_parser("make-demo-bag", help="write a small synthetic rosbag2 for demos and tests",
                              description="Write a small synthetic rosbag2: three cameras (raw and jpeg), "
                                          "joint states, a prompt and recorded actions.")
    p.add_argument("out", help="output bag directory (must not exist)")
    p.add_argument("--storage", choices=sorted(STORAGES), default="mcap")
    p.add_argument("--duration", type=float, default=DemoSpec.duration_s, help="seconds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_demo_bag)

    e = subparsers.add_parser("eval-bag", help="replay a rosbag2 through the policy and score it",
                              description="Replay a rosbag2 (mcap or sqlite3) through the node's observation "
                                          "logic and the policy; compare chunks with the recorded actions.")
    e.add_argument("bag", help="rosbag2 directory (or a single .mcap / .db3 file)")
    e.add_argument("--config", required=True,
                   help="the node's ROS 2 parameter file, e.g. config/thor.yaml (config/demo_bag.yaml for the demo)")
    e.add_argument("--backend", action="append", default=None,
                   help="backend to evaluate; repeat to compare (the first is the baseline). Default: the config's")
    e.add_argument("--preset", help="override the config's model preset (e.g. tiny)")
    e.add_argument("--device", help="override the config's device (e.g. cpu)")
    e.add_argument("--checkpoint", help="override the config's checkpoint")
    e.add_argument("--rate", type=float, help="inference ticks per second (default: the config's)")
    e.add_argument("--camera-topic", action="append", default=[], metavar="CAMERA=TOPIC",
                   help="override one camera's topic")
    e.add_argument("--joint-state-topic", help="override the joint state topic")
    e.add_argument("--prompt-topic", help="override the prompt topic")
    e.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", dest="overrides",
                   help="override any node parameter (value in YAML syntax, e.g. max_observation_age_s=0.3)")
    e.add_argument("--action-source", choices=ACTION_SOURCES, default="topic",
                   help="recorded actions: an action topic, or future joint positions (default: %(default)s)")
    e.add_argument("--action-topic", default=ACTION_TOPIC,
                   help="topic of the recorded actions: JointTrajectory, JointState or Float32/64MultiArray "
                        "(default: %(default)s)")
    e.add_argument("--namespace", default="/", help="the node's namespace, for its relative topic names "
                                                     "(default: %(default)s)")
    e.add_argument("--rtc", action="append", choices=RTC_MODES, default=None,
                   help="real-time chunking mode; repeat to compare modes on one backend (default: the config's)")
    e.add_argument("--delay", help="control periods from an observation to its chunk reaching the robot: auto "
                                   "(measured end to end) or N (default: the config's inference_delay_steps)")
    e.add_argument("--realtime", action="store_true",
                   help="inference takes bag time: drop the ticks the node would drop while a slow inference runs "
                        "(implied by --rtc)")
    e.add_argument("--first-k", type=int, default=10, help="steps for the first-k metrics (default: %(default)s)")
    e.add_argument("--max-ticks", type=int, help="stop after this many ticks")
    e.add_argument("--out", default="reports/eval-bag", help="report folder (default: %(default)s)")
    e.add_argument("--write-bag", metavar="OUT", help="also write the published chunks and latency to a new bag")
    e.add_argument("--write-bag-storage", choices=sorted(STORAGES), default="mcap")
    e.set_defaults(func=run_eval_bag)


def run_make_demo_bag(args: argparse.Namespace) -> int:
    try:
        path = write_demo_bag(args.out, args.storage, DemoSpec(duration_s=args.duration, seed=args.seed))
    except (ValueError, OSError) as exc:
        return _fail(exc)
    print(f"wrote {path} ({args.storage}, {args.duration:g} s)")
    return 0


def load_params(args: argparse.Namespace) -> NodeParams:
    """The config file with the command line's overrides applied, type-checked and validated as the node does."""
    values = node_params.read_param_values(args.config)
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ParamError(f"--set {item!r}: expected PARAM=VALUE")
        values[key.strip()] = yaml.safe_load(raw)
    if args.camera_topic:
        names = values.get("camera_names", NodeParams().camera_names)
        topics = dict(zip(names, values.get("camera_topics", NodeParams().camera_topics), strict=False))
        for item in args.camera_topic:
            cam, sep, topic = item.partition("=")
            if not sep or cam not in topics:
                raise ParamError(f"--camera-topic {item!r}: expected CAMERA=TOPIC, CAMERA one of {list(topics)}")
            topics[cam] = topic
        values["camera_topics"] = list(topics.values())
    for flag, name in (("preset", "preset"), ("device", "device"), ("checkpoint", "checkpoint"),
                       ("rate", "inference_rate_hz"), ("joint_state_topic", "joint_state_topic"),
                       ("prompt_topic", "prompt_topic"), ("delay", "inference_delay_steps")):
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    try:
        return params_from_dict(values)
    except ParamError as exc:
        raise ParamError(f"{args.config} with the command line's overrides: {exc}") from None


def run_eval_bag(args: argparse.Namespace) -> int:
    from pi_policy.bag.report import format_summary, write_report
    from pi_policy.bag.writer import write_output_bag

    try:
        params = load_params(args)
        settings = ReplaySetup(params, args.action_source, args.action_topic, args.namespace, args.max_ticks,
                               realtime=args.realtime or bool(args.rtc))
        if args.write_bag and Path(args.write_bag).exists():
            raise FileExistsError(f"--write-bag {args.write_bag} exists already")
        backends = args.backend or [params.backend]
        passes = {b: dataclasses.replace(params, backend=b) for b in backends}
        if args.rtc:  # one pass per mode, on one backend
            if len(backends) > 1:
                raise ValueError("--rtc compares real-time chunking modes on one backend; give one --backend")
            passes = {m: dataclasses.replace(params, backend=backends[0], rtc_mode=m) for m in dict.fromkeys(args.rtc)}
        setups = {name: dataclasses.replace(settings, params=p) for name, p in passes.items()}

        def make_policy(name: str):
            from pi_policy.runtime import build_runner

            return build_runner(**(passes[name].runner_kwargs() | {"progress": True}))

        ev = evaluate(args.bag, settings, make_policy, list(passes), keep_outputs=bool(args.write_bag), setups=setups)
    except (BagError, ValueError, OSError, RuntimeError) as exc:  # ParamError is a ValueError
        return _fail(exc)
    meta = {"command": " ".join(sys.argv), "config": args.config, "backends": backends,
            "rtc_modes": list(passes) if args.rtc else [params.rtc_mode]} | {
        k: v for k, v in params.runner_kwargs().items() if k in ("preset", "checkpoint", "device", "seed")}
    metrics = write_report(ev, args.out, args.first_k, meta)
    print(format_summary(metrics, args.out))
    if args.write_bag:
        counts = write_output_bag(ev, args.write_bag, resolve_topic(params.action_topic, args.namespace),
                                  resolve_topic(params.latency_topic, args.namespace), args.write_bag_storage)
        print(f"wrote {args.write_bag}: " + ", ".join(f"{t} ({n})" for t, n in counts.items()))
    return 0


def _fail(exc: Exception) -> int:
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, also for multi-line messages
    return 1
