"""`pi-policy verify`: the report has every field, the baseline is protected, bad requests fail clearly."""

import json

import pytest

from pi_policy.runtime.spec import RunnerSpec
from pi_policy.tools.cli import main
from pi_policy.tools.verify import VerifyError, format_report, verify

FIELDS = {"backend", "baseline_backend", "candidate_backend", "candidate_note", "preset", "checkpoint", "device",
          "gpu", "torch", "seed", "weights_fingerprint_before", "weights_fingerprint_after", "baseline", "candidate",
          "max_diff", "mean_diff", "rel_error", "kv_layers", "max_rel_error", "passed", "baseline_bit_identical"}


@pytest.fixture(scope="module")
def report():
    return verify("fp8", RunnerSpec(progress=False), check_baseline=True)


def test_report_has_every_field(report):
    assert FIELDS <= set(report)
    for block in ("baseline", "candidate"):
        assert set(report[block]) == {"min", "max", "mean"}
    assert len(report["kv_layers"]) == 2
    assert {"layer", "k_max_diff", "v_max_diff"} <= set(report["kv_layers"][0])
    assert report["weights_fingerprint_before"] == report["weights_fingerprint_after"]
    assert report["baseline_bit_identical"] is True
    assert report["candidate_backend"].startswith("fp8")
    assert 0 < report["rel_error"] < 0.03 and report["passed"]
    json.dumps(report)  # serializable as is


def test_printed_block(report):
    text = format_report(report)
    base = "BF16" if report["baseline_backend"].startswith("bf16") else "float32"  # a CPU runs float32
    for words in (f"{base} range", "fp8 range", "Max diff", "Mean diff", "Relative error", "K max diff", "PASS"):
        assert words in text


def cli(*argv):
    return main(list(argv))


def test_cli_exit_status_and_json(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert cli("verify", "--backend", "fp8", "--no-progress", "--json", str(out)) == 0
    assert FIELDS <= set(json.loads(out.read_text()))
    assert cli("verify", "--backend", "fp8", "--no-progress", "--max-rel-error", "1e-9") == 1
    assert "FAIL" in capsys.readouterr().out


def test_fallen_back_candidate_is_an_error(capsys):
    assert cli("verify", "--backend", "tensorrt", "--engine", "prefill.engine", "--no-progress", "--device", "cpu") == 2
    assert "did not run" in capsys.readouterr().err


def test_bad_requests():
    with pytest.raises(VerifyError, match="unknown candidate"):
        verify("int4", RunnerSpec(progress=False))
    with pytest.raises(VerifyError, match="max-rel-error"):
        verify("fp8", RunnerSpec(progress=False), max_rel_error=0)


def test_build_engine_writes_onnx_and_fails_without_an_engine(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    # on a CPU (and without tensorrt) no engine can be built: the ONNX graph is written, the exit status says so
    assert cli("build-engine", "--out", str(tmp_path), "--no-progress", "--device", "cpu") == 1
    captured = capsys.readouterr()
    assert (tmp_path / "prefill.onnx").is_file() and not (tmp_path / "prefill.engine").exists()
    assert "onnx.checker passed" in captured.out
    assert "2/2 layers" in captured.out
    assert "error: no engine built" in captured.err and "--onnx-only" in captured.err
    assert captured.err.count("error:") == 1  # one line (log warnings may share stderr under ROS's launch)
    assert cli("build-engine", "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu", "--onnx-only") == 0


def test_calibrate_and_verify_count_the_same_fp8_linears(tmp_path, capsys):
    # tiny has 2 layers x 4 linears; the last layer computes only K/V, so 5 of the 8 run in the prefill
    assert cli("calibrate", "--out", str(tmp_path / "cal.json"), "--samples", "1", "--no-progress",
               "--device", "cpu") == 0
    assert "scales for 5 of the 5 FP8 linears the prefill runs (of 8 quantized" in capsys.readouterr().out
    note = verify("fp8", RunnerSpec(progress=False))["candidate_note"]
    assert "5 FP8 linears run in the prefill (8/8 quantized" in note


def test_calibrate_then_build_from_file(tmp_path):
    cal = tmp_path / "cal.json"
    assert cli("calibrate", "--out", str(cal), "--samples", "2", "--no-progress", "--device", "cpu") == 0
    assert cli("build-engine", "--out", str(tmp_path / "e"), "--calibration", str(cal), "--onnx-only",
               "--no-progress", "--device", "cpu") == 0


@pytest.fixture(scope="module")
def combinations(tmp_path_factory):
    out = tmp_path_factory.mktemp("combos") / "v.json"
    code = main(["verify", "--combinations", "vision,prefill", "--no-progress", "--json", str(out)])
    return code, json.loads(out.read_text())


def test_every_fp8_combination_against_the_one_baseline(combinations, capsys):
    code, report = combinations
    assert code == 0 and report["passed"]
    labels = [c["label"] for c in report["candidates"]]
    assert labels == ["vision fp8", "prefill fp8", "vision fp8 + prefill fp8"]
    for c in report["candidates"]:
        assert 0 < c["rel_error"] < report["max_rel_error"] and c["passed"]
        assert 0.99 < c["cosine"] < 1
        assert c["max_diff"] > 0 and len(c["kv_layers"]) == 2
        for stage, impl in c["stages"].items():
            assert c["ran"][stage].startswith("fp8" if impl == "fp8" else "float32")
    by = {c["label"]: c for c in report["candidates"]}
    # both stages' errors enter the cache: together they are off by more than either alone
    assert by["vision fp8 + prefill fp8"]["kv_layers"][0]["k_rel_error"] > max(
        by["vision fp8"]["kv_layers"][0]["k_rel_error"], by["prefill fp8"]["kv_layers"][0]["k_rel_error"])
    assert report["weights_fingerprint_before"] == report["weights_fingerprint_after"]
    assert report["random_weights"] and "activation outliers of a trained Gemma" in report["notes"][0]


def test_printed_combinations_say_what_gates(combinations):
    text = format_report(combinations[1])
    assert "| vision fp8 + prefill fp8 |" in text
    assert "the gate: exit 1 above it" in text and "diagnostics" in text
    assert "Verify your own checkpoint (--checkpoint) before it drives a robot" in text
    assert text.rstrip().endswith("PASS")
    assert text.count("FP8 vision simulated") == 1  # each note once


def test_single_candidate_block_names_the_gate_and_the_diagnostics(report):
    text = format_report(report)
    assert "Cosine: " in text and "the gate: exit 1 above it" in text
    assert "diagnostics, not the gate" in text
    assert 0.99 < report["cosine"] <= 1


def test_fp8_vision_alone_and_a_failing_combination(capsys):
    assert cli("verify", "--vision", "fp8", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "vision fp8-eager" in out and "vision fp8 range" in out
    assert cli("verify", "--combinations", "vision", "--no-progress", "--max-rel-error", "1e-9") == 1
    assert "FAIL: vision fp8: relative error" in capsys.readouterr().out


def test_a_stage_that_cannot_run_fails_the_comparison(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no GPU and no interpreter: the fused expert cannot run
    assert cli("verify", "--combinations", "--no-progress", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "candidate denoise 'fp8' did not run" in err and "--combinations vision,prefill" in err


def test_static_scales_from_a_calibration_file(tmp_path, capsys):
    cal = tmp_path / "cal.json"
    assert cli("calibrate", "--out", str(cal), "--samples", "1", "--no-progress", "--device", "cpu") == 0
    assert "9 of the 9 FP8 linears of the vision tower" in capsys.readouterr().out
    out = tmp_path / "v.json"
    assert cli("verify", "--combinations", "vision,prefill", "--fp8-calibration", str(cal), "--no-progress",
               "--json", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["scales"] == f"static ({cal})"
    assert "9/9 with static activation scales" in report["candidates"][0]["note"]
    assert "5/5 with static activation scales" in report["candidates"][1]["note"]


@pytest.mark.parametrize("argv, message", [
    (("--combinations", "vision,int4"), "takes stages from"),
    (("--combinations", "vision", "--vision", "fp8"), "either --combinations or one candidate"),
    (("--vision", "fp8", "--scales", "static", "--fp8-calibration", "x.json"), "not both"),
    (("--vision", "fp8", "--fp8-calibration", "missing.json"), "calibration file not found"),
    ((), "nothing to compare"),
])
def test_bad_verify_requests_are_one_line_errors(argv, message, capsys):
    assert cli("verify", "--no-progress", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("verify: ERROR:")
