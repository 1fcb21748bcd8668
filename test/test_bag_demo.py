"""make-demo-bag: both storage formats, the topics and types it promises, and its CLI errors."""

import numpy as np
import pytest

from pi_policy.bag.demo_bag import (
    ACTION_TOPIC,
    DEMO_CAMERAS,
    DEMO_JOINTS,
    EXTRA_JOINT,
    JOINT_STATES_TOPIC,
    PROMPT_TOPIC,
    DemoSpec,
    write_demo_bag,
)
from pi_policy.bag.reader import BagError, inspect_bag, read_messages
from pi_policy.node.inputs import compressed_image_to_rgb, image_to_rgb, joint_state_to_vector
from pi_policy.tools.cli import main


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_demo_bag_topics_and_rates(tmp_path, storage, capsys):
    out = tmp_path / "bag"
    assert main(["make-demo-bag", str(out), "--storage", storage, "--duration", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = inspect_bag(out)
    assert info.storage == storage
    assert 1.9 < info.duration_s < 2.1
    assert info.topics[JOINT_STATES_TOPIC] == "sensor_msgs/msg/JointState"
    assert info.topics[ACTION_TOPIC] == "trajectory_msgs/msg/JointTrajectory"
    assert info.topics[PROMPT_TOPIC] == "std_msgs/msg/String"
    for topic in DEMO_CAMERAS.values():
        kind = "CompressedImage" if topic.endswith("/compressed") else "Image"
        assert info.topics[topic] == f"sensor_msgs/msg/{kind}"
        assert info.counts[topic] == 24  # 12 Hz for 2 s
    assert info.counts[JOINT_STATES_TOPIC] == 200
    assert info.counts[ACTION_TOPIC] == 100
    assert sum(f.stat().st_size for f in out.iterdir()) < 5e6


def test_demo_messages_decode_with_the_node_conversions(tmp_path):
    bag = write_demo_bag(tmp_path / "bag", spec=DemoSpec(duration_s=0.5))
    seen = set()
    for bm in read_messages(bag, [*DEMO_CAMERAS.values(), JOINT_STATES_TOPIC]):
        assert bm.msg is not None, bm.error
        if bm.topic == JOINT_STATES_TOPIC:
            names = list(bm.msg.name)
            assert names[:-1] != DEMO_JOINTS and sorted(names[:-1]) == sorted(DEMO_JOINTS)
            assert names[-1] == EXTRA_JOINT
            assert joint_state_to_vector(bm.msg, DEMO_JOINTS).shape == (len(DEMO_JOINTS),)
        else:
            convert = compressed_image_to_rgb if bm.topic.endswith("/compressed") else image_to_rgb
            rgb = convert(bm.msg)
            assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8 and rgb.std() > 10
        seen.add(bm.topic)
    assert len(seen) == 4


def test_demo_bag_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "bag").mkdir()
    assert main(["make-demo-bag", str(tmp_path / "bag")]) == 2  # the command line names an existing folder
    err = capsys.readouterr().err
    assert err.startswith("pi-policy make-demo-bag: error:") and "exists" in err and err.count("\n") == 1


def test_inspect_rejects_missing_path(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        inspect_bag(tmp_path / "nope")
