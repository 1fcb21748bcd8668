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
