"""eval-bag over many bags: found in a folder, scored one by one, in worker processes and as Ray tasks, with the
same per-bag metrics every way, and an aggregate report that pools them."""

import csv
import importlib.util
import json

import numpy as np
import pytest

from pi_policy.bag.aggregate import AGGREGATE_FILES
from pi_policy.bag.batch import find_bags, report_names
from pi_policy.bag.demo_bag import DemoSpec, write_demo_bag
from pi_policy.bag.reader import BagError
from pi_policy.tools.cli import main

# the real tiny model on CPU (config/demo_bag.yaml): what a worker process builds for itself
ARGS = ["--config", "config/demo_bag.yaml", "--max-ticks", "4", "--first-k", "5", "--set", "warmup=false"]
SCORES = ("ticks", "valid_steps", "mae", "mse", "mae_first_k", "mse_first_k", "per_joint", "mae_by_step", "tick_mae",
          "discontinuity")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three recordings in a folder tree, as a robot fleet leaves them: two mcap, one sqlite3 in a subfolder."""
    root = tmp_path_factory.mktemp("fleet")
    write_demo_bag(root / "monday" / "run_a", "mcap", DemoSpec(duration_s=1.5, seed=1))
    write_demo_bag(root / "monday" / "run_b", "sqlite3", DemoSpec(duration_s=1.5, seed=2))
    write_demo_bag(root / "tuesday" / "run_a", "mcap", DemoSpec(duration_s=1.5, seed=3))
    return root


@pytest.fixture(scope="module")
def one_by_one(fleet, tmp_path_factory):
    """Each bag evaluated by its own command: the reference for every other way."""
    out = tmp_path_factory.mktemp("single")
    metrics = {}
    for bag, name in zip(find_bags([fleet]), report_names(find_bags([fleet])), strict=True):
        assert main(["eval-bag", str(bag), *ARGS, "--out", str(out / name)]) == 0
        metrics[name] = json.loads((out / name / "metrics.json").read_text())
    return metrics


def test_bags_are_found_in_folders_and_named_apart(fleet, tmp_path):
    bags = find_bags([fleet])
    assert [b.relative_to(fleet).as_posix() for b in bags] == ["monday/run_a", "monday/run_b", "tuesday/run_a"]
    assert report_names(bags) == ["monday_run_a", "run_b", "tuesday_run_a"]
    mcap = next((fleet / "monday" / "run_a").glob("*.mcap"))
    assert find_bags([mcap, fleet / "monday" / "run_b"]) == [mcap, fleet / "monday" / "run_b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="holds no rosbag2 bag"):
        find_bags([tmp_path / "empty"])
    with pytest.raises(BagError, match="named twice"):
        find_bags([fleet / "tuesday", fleet / "tuesday" / "run_a"])


def check_against_one_by_one(out, one_by_one):
    """Per-bag metrics equal the one-by-one runs'; the aggregate pools them."""
    agg = json.loads((out / "aggregate.json").read_text())
    for name, ref in one_by_one.items():
        got = json.loads((out / name / "metrics.json").read_text())
        assert got["ticks"] == ref["ticks"], name
        for backend, b in ref["backends"].items():
            for key in SCORES:
                assert got["backends"][backend][key] == b[key], (name, key)
    rows = {row["name"]: row for row in agg["bags"]}
    assert set(rows) == set(one_by_one) and {r["status"] for r in rows.values()} == {"ok"}
    assert agg["ticks"]["scored"] == sum(m["ticks"]["evaluated"] for m in one_by_one.values())
    (backend,) = agg["pooled"]
    pooled = agg["pooled"][backend]
    bags = [m["backends"][backend] for m in one_by_one.values()]
    weights = np.array([b["valid_steps"] for b in bags])
    assert pooled["valid_steps"] == weights.sum() and pooled["ticks"] == sum(b["ticks"] for b in bags)
    for key in ("mae", "mse"):
        assert pooled[key] == pytest.approx(np.dot([b[key] for b in bags], weights) / weights.sum(), rel=1e-9)
    worst = max((b["tick_mae"] for b in bags), key=lambda p: p["p99"])
    assert agg["worst_ticks"][0]["mae"] >= worst["p99"]
    assert [w["mae"] for w in agg["worst_ticks"]] == sorted((w["mae"] for w in agg["worst_ticks"]), reverse=True)
    for name in AGGREGATE_FILES:
        assert (out / name).stat().st_size > 0, name
    rows_csv = list(csv.DictReader((out / "bags.csv").open()))
    assert [r["name"] for r in rows_csv] == sorted(one_by_one)
    html = (out / "index.html").read_text()
    assert all(f"href='{name}/index.html'" in html for name in one_by_one)
    return agg


def test_workers_give_the_one_by_one_metrics(fleet, one_by_one, tmp_path, capsys):
    out = tmp_path / "workers"
    assert main(["eval-bag", str(fleet), *ARGS, "--workers", "2", "--out", str(out)]) == 0
    check_against_one_by_one(out, one_by_one)
    printed = capsys.readouterr().out
    assert "3 bags: 3 evaluated, 0 failed" in printed and "worst tick:" in printed


def test_ray_gives_the_one_by_one_metrics(fleet, one_by_one, tmp_path, captured_log):
    if importlib.util.find_spec("ray") is None:
        pytest.skip('Ray is not installed (pip install -e ".[ray]")')
    out = tmp_path / "ray"
    with captured_log("pi_policy.model.normalize") as log:  # caplog misses it once ROS's launch is imported
        assert main(["eval-bag", str(fleet), *ARGS, "--ray", "--workers", "2", "--out", str(out)]) == 0
    check_against_one_by_one(out, one_by_one)
    # the workers' model warnings reach this terminal, once each, as with --workers
    warned = [r.getMessage() for r in log.records]
    assert len(warned) == 1 and "no normalization stats given" in warned[0]


def test_one_bad_bag_fails_the_batch_before_any_model(fleet, tmp_path, capsys, monkeypatch):
    import pi_policy.runtime

    monkeypatch.setattr(pi_policy.runtime, "build_runner", lambda **kw: pytest.fail("a model was built"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metadata.yaml").write_text("this: [is not a bag")
    assert main(["eval-bag", str(fleet), str(tmp_path / "broken"), *ARGS, "--out", str(tmp_path / "r"),
                 "--set", "joint_names=[waist, elbo]"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pi-policy eval-bag: error: 4 of 4 bags cannot be evaluated:")
    assert err.count("joint states: missing joints elbo") == 3 and "cannot read bag" in err


def test_workers_take_the_gpus_round_robin(monkeypatch):
    import torch

    from pi_policy.bag.parallel import worker_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda:1", 3) == [] and worker_devices("cpu", 3) == [] and worker_devices("cuda", 1) == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_devices("cuda", 3) == []  # one GPU: every worker on it, as configured


def test_many_bags_pool_each_rtc_mode(fleet, tmp_path, capsys):
    out = tmp_path / "rtc"
    bags = [str(b) for b in find_bags([fleet])[:2]]
    assert main(["eval-bag", *bags, *ARGS, "--rtc", "off", "--rtc", "inpaint", "--delay", "2", "--out", str(out)]) == 0
    agg = json.loads((out / "aggregate.json").read_text())
    assert list(agg["pooled"]) == ["off", "inpaint"]  # the modes are the passes, pooled across bags
    assert all(m["ticks"] > 0 for m in agg["pooled"].values())
    printed = capsys.readouterr().out
    assert "off MAE" in printed and "inpaint MAE" in printed


def test_the_many_bags_report_lists_each_bags_input_problems(tmp_path, capsys):
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer

    from pi_policy.bag.reader import TYPESTORE

    good = write_demo_bag(tmp_path / "bags" / "good", "mcap", DemoSpec(duration_s=1.5, seed=1))
    src = write_demo_bag(tmp_path / "src", "mcap", DemoSpec(duration_s=1.5, seed=2))
    kind = "sensor_msgs/msg/CompressedImage"
    with Reader(src) as r, Writer(tmp_path / "bags" / "corrupt", version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {c.id: w.add_connection(c.topic, c.msgtype, typestore=TYPESTORE) for c in r.connections}
        broken = 0
        for c, t, raw in r.messages():
            if c.msgtype == kind and broken < 1:
                msg = TYPESTORE.deserialize_cdr(bytes(raw), kind)
                msg.data = np.frombuffer(b"not a jpeg", np.uint8).copy()
                raw, broken = TYPESTORE.serialize_cdr(msg, kind), broken + 1
            w.write(conns[c.id], t, bytes(raw))
    out = tmp_path / "r"
    assert main(["eval-bag", str(good), str(tmp_path / "bags" / "corrupt"), *ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(printed) if line.startswith("corrupt"))
    assert "cannot decode compressed image" in printed[row + 1] and printed[row + 1].startswith("    input: ")
    good_row = next(i for i, line in enumerate(printed) if line.startswith("good"))
    assert not printed[good_row + 1].startswith("    input: ")
    rows = {row["name"]: row for row in json.loads((out / "aggregate.json").read_text())["bags"]}
    assert rows["good"]["inputs"] == [] and any("rejected" in x for x in rows["corrupt"]["inputs"])
    assert "cannot decode compressed image" in (out / "index.html").read_text()
