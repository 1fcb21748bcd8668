"""How many raw camera frames arrive whole between two ROS 2 processes, per image size and reliability.

    python scripts/camera_qos_probe.py --size 1280x960 --size 4000x3000 --frames 20 --rate 10

For each size and for best effort (the node's default camera QoS) and reliable (depth 2), a subscriber process
is started, then this process publishes `--frames` rgb8 images at `--rate` Hz and the subscriber prints how many
it received. Needs ROS 2 sourced.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

RELIABILITIES = ("best_effort", "reliable")


def qos(reliability: str):
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    return qos_profile_sensor_data if reliability == "best_effort" else QoSProfile(
        depth=2, reliability=ReliabilityPolicy.RELIABLE)


def subscribe(topic: str, reliability: str, seconds: float) -> None:
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("camera_qos_probe_sub")
    got = []
    node.create_subscription(Image, topic, got.append, qos(reliability))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    print(len(got), flush=True)


def publish(node, topic: str, reliability: str, width: int, height: int, frames: int, rate: float) -> None:
    from sensor_msgs.msg import Image

    pub = node.create_publisher(Image, topic, qos(reliability))
    deadline = time.monotonic() + 30.0
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # discovery settles
    data = bytes(width * height * 3)
    for _ in range(frames):
        pub.publish(Image(height=height, width=width, encoding="rgb8", step=3 * width, data=data))
        time.sleep(1.0 / rate)
    node.destroy_publisher(pub)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", action="append", default=[], metavar="WxH", help="image size (repeatable)")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rate", type=float, default=10.0, help="frames per second")
    ap.add_argument("--subscribe", nargs=3, metavar=("TOPIC", "RELIABILITY", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.subscribe:
        subscribe(args.subscribe[0], args.subscribe[1], float(args.subscribe[2]))
        return 0
    import rclpy

    rclpy.init()
    node = rclpy.create_node("camera_qos_probe_pub")
    listen_s = args.frames / args.rate + 15.0
    for size in args.size or ["1280x960"]:
        width, height = (int(v) for v in size.lower().split("x"))
        for reliability in RELIABILITIES:
            topic = f"camera_qos_probe_{width}x{height}_{reliability}"
            sub = subprocess.Popen([sys.executable, __file__, "--subscribe", topic, reliability, str(listen_s)],
                                   stdout=subprocess.PIPE, text=True)
            publish(node, topic, reliability, width, height, args.frames, args.rate)
            received = sub.communicate()[0].strip()
            print(f"{width}x{height} rgb8, {reliability}: {received} of {args.frames} frames received", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
