"""One description of a runner: the spec's checks, the flags and parameters that produce it, the stage records,
the camera set, and `--set` meaning the same in eval-bag and serve."""

import argparse
import sys
from pathlib import Path

import pytest

from pi_policy.cameras import DEFAULT_CAMERAS, CameraSet
from pi_policy.node.params import ParamError, params_from_dict
from pi_policy.runtime.choice import StageChoice, fall_back, plan_stages, uncompiled
from pi_policy.runtime.options import RTCSettings
from pi_policy.runtime.spec import RunnerSpec, SpecError
from pi_policy.tools.flags import add_config_overrides, add_model_arguments, param_overrides, parse_set, spec_from_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_spec_imports_without_torch():
    import subprocess

    code = ("import sys; import pi_policy.runtime.spec, pi_policy.runtime.choice, pi_policy.node.params; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_validate_lists_every_problem_on_its_own_line():
    with pytest.raises(SpecError) as e:
        RunnerSpec(preset="pi7", device="gpu0", backend="int8", denoise="int4", seed=-1,
                   cameras=CameraSet.of(["base_0_rgb", "top"])).validate()
    lines = str(e.value).splitlines()[1:]
    assert any("unknown preset 'pi7'" in x for x in lines) and any("device 'gpu0'" in x for x in lines)
    assert any("backend 'int8'" in x for x in lines) and any("denoise_backend 'int4'" in x for x in lines)
    assert any("seed must be" in x for x in lines) and any("camera_names ['top']" in x for x in lines)
    assert RunnerSpec().validate() == RunnerSpec()
    with pytest.raises(SpecError, match="backend tensorrt needs engine_path"):
        RunnerSpec(backend="tensorrt").validate()


def test_node_parameters_and_flags_describe_the_same_runner():
    params = params_from_dict({"preset": "tiny", "device": "cpu", "joint_names": ["a"], "backend": "fp8",
                               "denoise_backend": "bf16", "seed": 3, "camera_names": ["right_wrist_0_rgb"],
                               "camera_topics": ["r"], "rtc_mode": "inpaint"})
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", "--backend", "fp8", "--denoise", "bf16",
                              "--seed", "3", "--no-progress"])
    from_flags = spec_from_args(args, cameras=CameraSet.of(["right_wrist_0_rgb"]), rtc=RTCSettings("inpaint"))
    assert from_flags.replace(progress=True) == params.runner_spec()
    assert params.runner_spec().cameras.served == ("right_wrist_0_rgb",)


def test_a_spec_is_a_key():  # eval-bag workers keep one policy per spec
    assert {RunnerSpec(backend="fp8"): 1}[RunnerSpec().replace(backend="fp8")] == 1


def test_stage_labels_are_derived_from_fields():
    gpu = plan_stages(RunnerSpec(), on_gpu=True, dtype="bf16")
    assert {s: c.label for s, c in gpu.items()} == {
        "vision": "bf16-graph", "embed_prefix": "bf16-graph", "prefill": "bf16-graph-compiled",
        "denoise": "triton-graph"}
    eager = plan_stages(RunnerSpec(backend="eager", denoise="bf16"), on_gpu=True, dtype="bf16")
    assert all(c.label == "bf16-eager" for c in eager.values())
    trt = plan_stages(RunnerSpec(backend="tensorrt", engine_path="e"), on_gpu=True, dtype="bf16")["prefill"]
    assert (trt.impl, trt.compiled, trt.label) == ("tensorrt", False, "tensorrt-graph")  # never compiled
    cpu = plan_stages(RunnerSpec(backend="fp8"), on_gpu=False, dtype="float32")
    assert cpu["prefill"].label == "fp8-eager" and cpu["denoise"].label == "float32-eager"
    back = fall_back(StageChoice("denoise", impl="fp8w", graph=True), "no FP8 here")
    assert back.label == "bf16-graph" and back.note == "denoise fp8 unavailable (no FP8 here); the PyTorch denoise runs"
    plain = uncompiled(StageChoice("prefill", compiled=True), "no Triton")
    assert plain.label == "bf16-eager" and "torch.compile failed" in plain.note


def test_the_runner_reports_what_ran_as_records():
    from pi_policy.runtime import build_runner

    runner = build_runner(preset="tiny", backend="eager", progress=False, warmup=False)
    assert runner.choices["prefill"].impl == "torch" and runner.choices["prefill"].dtype == "float32"
    assert runner.backends == {s: c.label for s, c in runner.choices.items()} and runner.backend_note == ""
    assert runner.spec.backend == "eager"


def test_camera_set_rules():
    cams = CameraSet.of(["right_wrist_0_rgb", "base_0_rgb"])
    assert cams.served == ("base_0_rgb", "right_wrist_0_rgb")  # the model's order
    assert cams.required == ("right_wrist_0_rgb", "base_0_rgb") and cams.is_required("base_0_rgb")  # empty = all
    one = CameraSet.of(["right_wrist_0_rgb", "base_0_rgb"], required=["base_0_rgb"])
    assert not one.is_required("right_wrist_0_rgb") and one.missing_required(["right_wrist_0_rgb"]) == ["base_0_rgb"]
    assert one.unknown(["base_0_rgb", "left_wrist_0_rgb"]) == ["left_wrist_0_rgb"]
    assert CameraSet().served == DEFAULT_CAMERAS
    problems = CameraSet.of(["a", "a"], required=["b"]).problems()
    assert any("repeated" in p for p in problems) and any("required_cameras ['b']" in p for p in problems)


def test_set_parses_the_same_everywhere():
    assert parse_set(["checkpoint=", "max_observation_age_s=0.3", "required_cameras=[base_0_rgb]", "prompt=''"]) == {
        "checkpoint": "", "max_observation_age_s": 0.3, "required_cameras": ["base_0_rgb"], "prompt": ""}
    for bad in (["checkpoint"], ["=1"], ["x=[1"]):
        with pytest.raises(ValueError, match="--set"):
            parse_set(bad)
    parser = argparse.ArgumentParser()
    add_config_overrides(parser, ("--preset", "--backend"), repeat=("--backend",))
    args = parser.parse_args(["--set", "preset=pi0", "--preset", "tiny", "--backend", "fp8", "--backend", "bf16"])
    assert param_overrides(args, repeat=("--backend",)) == {"preset": "tiny", "backend": "fp8"}  # flags win


def test_empty_set_value_means_the_empty_string_in_eval_bag_and_serve(tmp_path):
    from pi_policy.serve.config import load_serve_config
    from pi_policy.tools.bag import add_parser, load_params

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval-bag", "bag", "--config", str(ROOT / "config" / "thor.yaml"), "--preset", "tiny",
                              "--set", "checkpoint=", "--set", "norm_stats=", "--set", "engine_path=",
                              "--set", "backend=bf16"])
    assert load_params(args).checkpoint == ""
    served = load_serve_config(ROOT / "config" / "serve_libero.yaml", param_overrides(
        argparse.Namespace(overrides=["checkpoint=", "norm_stats=", "preset=tiny"])))
    assert served.params.checkpoint == ""
    with pytest.raises(ParamError, match="checkpoint is empty"):
        load_serve_config(ROOT / "config" / "serve_libero.yaml", parse_set(["checkpoint="]))
