"""`pi-policy verify`: the report has every field, the baseline is protected, bad requests fail clearly."""

import importlib.util
import json

import pytest

from pi_policy.tools.cli import main
from pi_policy.tools.verify import VerifyError, format_report, verify

FIELDS = {"backend", "baseline_backend", "candidate_backend", "candidate_note", "preset", "checkpoint", "device",
          "gpu", "torch", "seed", "weights_fingerprint_before", "weights_fingerprint_after", "bf16", "candidate",
          "max_diff", "mean_diff", "rel_error", "kv_layers", "max_rel_error", "passed", "baseline_bit_identical"}


@pytest.fixture(scope="module")
def report():
    return verify("fp8", "tiny", check_baseline=True, progress=False)


def test_report_has_every_field(report):
    assert FIELDS <= set(report)
    for block in ("bf16", "candidate"):
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
    for words in ("BF16 range", "fp8 range", "Max diff", "Mean diff", "Relative error", "K max diff", "PASS"):
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
    assert cli("verify", "--backend", "tensorrt", "--no-progress", "--device", "cpu") == 2
    assert "did not run" in capsys.readouterr().err


def test_bad_requests():
    with pytest.raises(VerifyError, match="unknown candidate"):
        verify("int4", progress=False)
    with pytest.raises(VerifyError, match="max-rel-error"):
        verify("fp8", max_rel_error=0, progress=False)


def test_build_engine_writes_onnx_without_tensorrt(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert cli("build-engine", "--out", str(tmp_path), "--no-progress", "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert (tmp_path / "prefill.onnx").is_file()
    assert "onnx.checker passed" in text
    assert "2/2 layers" in text
    if importlib.util.find_spec("tensorrt") is None:
        assert "engine build skipped: tensorrt not importable" in text


def test_calibrate_then_build_from_file(tmp_path):
    cal = tmp_path / "cal.json"
    assert cli("calibrate", "--out", str(cal), "--samples", "2", "--no-progress", "--device", "cpu") == 0
    assert cli("build-engine", "--out", str(tmp_path / "e"), "--calibration", str(cal), "--onnx-only",
               "--no-progress", "--device", "cpu") == 0
