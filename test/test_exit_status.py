"""One exit-status rule and one error prefix for every command: 2 when the command line cannot run as written
(nothing is read or built), 1 when what it was given was checked and found wanting, or the run failed."""

import pytest

from pi_policy.bag.demo_bag import DemoSpec, write_demo_bag
from pi_policy.tools.cli import main

CONFIG = "config/demo_bag.yaml"


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return str(write_demo_bag(tmp_path_factory.mktemp("bag") / "b", "mcap", DemoSpec(duration_s=1.0)))


@pytest.fixture
def built(monkeypatch):
    """Every runner or model built: a usage error must come before any."""
    import pi_policy.runtime.factory as factory

    calls = []
    monkeypatch.setattr(factory, "build_model", lambda *a, **k: calls.append("model") or pytest.fail("built"))
    return calls


USAGE = [  # (argv, what the error says)
    (["demo", "--checkpoint", "{tmp}/nope.safetensors"], "--checkpoint {tmp}/nope.safetensors does not exist"),
    (["bench", "--preset", "pi2"], "unknown preset 'pi2'"),
    (["bench", "--preset", "tiny", "--device", "cpu", "--cameras", "9"], "--cameras must be 1..3, got 9"),
    (["bench", "--preset", "tiny", "--device", "cpu", "--roofline"], "--roofline measures the GPU's peaks"),
    (["verify", "--backend", "bf16", "--device", "cpu"], "nothing to compare"),
    (["calibrate", "--device", "cpu", "--out", "{tmp}/c.json", "--samples", "0"], "--samples must be >= 1"),
    (["build-engine", "--device", "cpu", "--out", "{tmp}/e", "--calibration", "{tmp}/c.json"],
     "--calibration {tmp}/c.json does not exist"),
    (["make-demo-bag", "{tmp}"], "exists already"),
    (["eval-bag", "{tmp}/nope", "--config", CONFIG], "bag {tmp}/nope does not exist"),
    (["eval-bag", "{bag}", "--config", "{tmp}/nope.yaml"], "--config {tmp}/nope.yaml does not exist"),
    (["eval-bag", "{bag}", "--config", CONFIG, "--rtc", "off", "--backend", "bf16", "--backend", "eager"],
     "give one --backend"),
    (["eval-bag", "{bag}", "--config", CONFIG, "--latency-from", "{tmp}/bench.json"], "no such file"),
    (["eval-bag", "{bag}", "--config", CONFIG, "--latency-ms", "50", "--realtime"], "not allowed with"),
    (["eval-bag", "{bag}", "--config", CONFIG, "--set", "rate"], "expected PARAM=VALUE"),
    (["serve", "--config", "{tmp}/nope.yaml"], "--config {tmp}/nope.yaml does not exist"),
    (["inspect", "{tmp}/nope"], "checkpoint {tmp}/nope does not exist"),
    (["inspect", "{tmp}", "--preset", "pi7"], "unknown preset 'pi7'"),
    (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
]

FINDING = [
    (["inspect", "{tmp}"], "no *.safetensors weights in"),  # an empty folder: it was read, and lacks weights
    (["eval-bag", "{bag}", "--config", CONFIG, "--joint-state-topic", "/js"], "does not match the configuration"),
    (["eval-bag", "{bag}", "--config", CONFIG, "--set", "max_observation_age_s=-1"],
     "max_observation_age_s must be > 0"),  # a parameter the node would refuse, from the file or --set
    (["serve", "--config", "config/serve_libero.yaml", "--preset", "tiny", "--device", "cpu", "--port", "0",
      "--set", "checkpoint={tmp}/nope.safetensors"], "checkpoint not found"),
]


def run(argv, tmp_path, bag, capsys):
    argv = [a.format(tmp=tmp_path, bag=bag) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, says", USAGE, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(USAGE)])
def test_a_usage_error_exits_2_before_anything_is_built(argv, says, tmp_path, bag, capsys, built):
    code, err = run(argv, tmp_path, bag, capsys)
    assert code == 2, err
    (line,) = [x for x in err.splitlines() if ": error: " in x]  # argparse's usage line may come first
    assert line.startswith(f"pi-policy {argv[0]}: error: ") and says.format(tmp=tmp_path) in err, err
    assert built == []


@pytest.mark.parametrize("argv, says", FINDING, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(FINDING)])
def test_a_finding_or_a_failed_run_exits_1(argv, says, tmp_path, bag, capsys):
    code, err = run(argv, tmp_path, bag, capsys)
    assert code == 1, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors and all(line.startswith(f"pi-policy {argv[0]}: error: ") for line in errors), err
    assert says.format(tmp=tmp_path) in err, err
