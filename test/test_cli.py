"""What users type: `pi-policy demo` and `pi-policy bench` end to end on the tiny model."""

import json

import pytest

from pi_policy.observation import STAGES
from pi_policy.tools.cli import main


def test_demo_runs_the_pipeline_and_replays_a_bag(tmp_path, capsys):
    assert main(["demo", "--iters", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for label in ("Vision", "Embed Prefix", "Prefill", "Denoise", "Total", "Hz", "Host e2e"):
        assert f"| {label}" in out
    assert "actions 50 x 32: range [" in out and "finite True" in out
    assert "ticks:" in out and "0 skipped" in out
    report = tmp_path / "demo" / "report"
    for name in ("metrics.json", "ticks.csv", "index.html", "joints.png", "latency.png"):
        assert (report / name).stat().st_size > 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["ticks"]["evaluated"] > 0


def test_bench_writes_the_benchmarking_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "3", "--backend", "eager",
                 "--backend", "fp8", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "relative error" in out
    result = json.loads(path.read_text())
    assert result["machine"]["torch"] and "tensorrt" in result["machine"]
    assert result["workload"]["preset"] == "tiny" and result["workload"]["iters"] == 3
    for name in ("eager", "fp8"):
        entry = result["backends"][name]
        assert set(entry["backends"]) == set(STAGES)
        for stage in (*STAGES, "total", "host_e2e"):
            assert entry[stage]["p50"] > 0 and entry[stage]["p99"] >= entry[stage]["p50"]
    acc = result["backends"]["fp8"]["accuracy_vs_eager"]
    for key in ("baseline_range", "baseline_mean", "candidate_range", "candidate_mean", "max_diff", "mean_diff",
                "relative_error"):
        assert key in acc
    assert 0 < acc["relative_error"] < 0.03  # simulated FP8 on CPU moves the actions, a little


def test_bench_reports_the_denoise_cost_of_each_rtc_mode(tmp_path, capsys):
    path = tmp_path / "rtc.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "2", "--backend", "eager",
                 "--rtc", "off", "--rtc", "inpaint", "--rtc", "guided", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "real-time chunking, eager, denoise p50" in out and "x off" in out
    result = json.loads(path.read_text())
    costs = result["rtc"]["eager"]
    assert set(costs) == {"off", "inpaint", "guided"} and costs["off"]["vs_off"] == 1.0
    assert all(c["denoise_p50_ms"] > 0 and c["vs_off"] > 0 for c in costs.values())
    assert result["workload"]["rtc"]["delay"] == 4
    backends = result["backends"]
    assert backends["eager+rtc-guided"]["backends"]["denoise"].endswith("+rtc-guided")
    # continuing a chunk changes the actions: the RTC modes differ from off, off from nothing
    assert backends["eager+rtc-inpaint"]["accuracy_vs_eager+rtc-off"]["max_diff"] > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "--preset", "pi2", "--device", "cpu"], "unknown preset"),
    (["bench", "--preset", "tiny", "--device", "cpu", "--compile", "warp"], "unknown stage"),
    (["demo", "--device", "cuda:7"], "no CUDA GPU"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    import torch

    if argv[0] == "demo" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_on_cpu_says_it_ran_float32(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "1", "--backend", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "backend bf16, run as float32: on cpu the model runs in float32" in out
    assert "float32-eager" in out and "bf16-" not in out


def test_warnings_print_once_for_two_models():
    # two backends build two models; each warns about the missing norm stats; the terminal shows it once. A fresh
    # interpreter, as a user runs it (under pytest with ROS sourced, launch reroutes every later logger)
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "pi_policy", "bench", "--preset", "tiny", "--device", "cpu", "--iters",
                          "1", "--backend", "eager", "--backend", "bf16"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("no normalization stats given") == 1, run.stderr


def test_every_option_has_help():
    import argparse

    from pi_policy.tools.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(build_parser(), ["pi-policy"])
    assert not missing, missing


def test_bench_compares_bf16_and_fp8_vision(tmp_path, capsys):
    path = tmp_path / "vision.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "2", "--backend", "fp8",
                 "--vision", "bf16", "--vision", "fp8", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fp8+vision-fp8/float32" in out  # named by what ran: FP8 vision, the rest of the model in float32
    backends = json.loads(path.read_text())["backends"]
    assert backends["fp8+vision-bf16"]["backends"]["vision"] == "float32-eager"
    assert backends["fp8+vision-fp8"]["backends"]["vision"] == "fp8-eager"
    assert 0 < backends["fp8+vision-fp8"]["accuracy_vs_fp8+vision-bf16"]["relative_error"] < 0.03
