"""Choosing the denoise backend: runner, bench, verify and the node parameter; the fused path and its fallbacks
are visible in the stage backend names. The fused kernels run under Triton's CPU interpreter here."""

import json

import numpy as np
import pytest
import torch
from interpreted_kernels import few_programs  # noqa: F401 - first: sets up Triton's interpreter

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.model import PiModel, get_config, init_random
from pi_policy.node.params import PARAMS, ParamError, params_from_dict
from pi_policy.runtime import build_runner
from pi_policy.runtime.expert import kernels
from pi_policy.tools.cli import main
from pi_policy.tools.synthetic import synthetic_observation


def two_step_model() -> PiModel:
    return init_random(PiModel(get_config("tiny", num_steps=2)), 0).eval()


def infer(runner):
    obs = synthetic_observation(DEFAULT_CAMERAS[:2], 56, seed=1)  # one camera missing: a hole in the prefix keys
    return runner.infer(obs, noise=np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32))


def test_the_runner_runs_the_fused_expert_and_says_so():
    model = two_step_model()
    fused = build_runner(model=model, denoise="triton", progress=False, warmup=False)
    fused.warmup(iters=1, progress=False)
    out = infer(fused)
    assert out.latency.backends["denoise"] == "triton-eager" and fused.backend_note == ""
    ref = infer(build_runner(model=model, denoise="bf16", progress=False))
    assert ref.latency.backends["denoise"] == "float32-eager"
    err = np.linalg.norm(out.actions - ref.actions) / np.linalg.norm(ref.actions)
    assert err < 5e-3


def test_the_fused_expert_runs_three_robots_in_one_batch_as_it_runs_each_alone():
    model = two_step_model()
    fused = build_runner(model=model, denoise="triton", progress=False, warmup=False, batch_sizes=(4,))  # + padding
    fused.warmup(iters=1, progress=False)
    obs = [synthetic_observation(DEFAULT_CAMERAS[: 1 + i], 56, seed=10 + i) for i in range(3)]  # 1, 2, 3 cameras
    noises = [np.random.default_rng(i).standard_normal((50, 32)).astype(np.float32) for i in range(3)]
    batched = fused.infer_batch(obs, noises)
    reference = build_runner(model=model, denoise="bf16", progress=False)
    for o, n, out in zip(obs, noises, batched, strict=True):
        assert out.latency.backends["denoise"] == "triton-eager"
        np.testing.assert_allclose(out.actions, fused.infer(o, n).actions, rtol=0, atol=1e-5)
        ref = reference.infer(o, n).actions
        assert np.linalg.norm(out.actions - ref) / np.linalg.norm(ref) < 5e-3


def test_a_fused_expert_that_fails_at_warm_up_falls_back_visibly(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(kernels, "attention", broken)
    runner = build_runner(model=two_step_model(), denoise="fp8", progress=False, warmup=False)
    assert runner.backends["denoise"] == "fp8w-eager"
    runner.warmup(iters=1, progress=False)
    assert runner.backends["denoise"] == "float32-eager"
    assert "denoise fp8 unavailable (failed on its first run" in runner.backend_note
    assert "no kernel image" in runner.backend_note
    assert np.isfinite(infer(runner).actions).all()


def test_without_a_gpu_the_fused_expert_is_refused_with_a_note(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    runner = build_runner(preset="tiny", denoise="triton", progress=False, warmup=False)
    assert runner.backends["denoise"] == "float32-eager"
    assert "denoise triton unavailable (needs a CUDA GPU" in runner.backend_note
    with pytest.raises(ValueError, match="denoise_backend 'int4' is not one of"):
        build_runner(preset="tiny", denoise="int4", progress=False, warmup=False)


def test_bench_compares_denoise_backends_with_an_accuracy_block(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")  # 10 interpreted steps per inference would take minutes
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--denoise", "bf16", "--denoise", "fp8",
                 "--iters", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "denoise fp8 unavailable" in text and "cosine 1.000000" in text
    result = json.loads(out.read_text())
    assert list(result["backends"]) == ["bf16/bf16", "bf16/fp8"]
    acc = result["backends"]["bf16/fp8"]["accuracy_vs_bf16/bf16"]
    assert acc["relative_error"] == 0.0 and acc["cosine"] == pytest.approx(1.0)


def test_verify_needs_a_candidate_and_refuses_one_that_did_not_run(monkeypatch, capsys):
    assert main(["verify", "--backend", "bf16", "--device", "cpu", "--no-progress"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["verify", "--backend", "bf16", "--denoise", "triton", "--device", "cpu", "--no-progress"]) == 2
    assert "candidate denoise 'triton' did not run" in capsys.readouterr().err


def test_denoise_backend_is_a_node_parameter():
    param = next(p for p in PARAMS if p.name == "denoise_backend")
    assert param.default == "auto" and "triton" in param.description and "fp8" in param.description
    base = {"joint_names": ["j1"], "preset": "tiny"}
    assert params_from_dict(base | {"denoise_backend": "fp8"}).runner_spec().denoise == "fp8"
    with pytest.raises(ParamError, match="denoise_backend 'int4' is not one of auto, bf16, triton, fp8"):
        params_from_dict(base | {"denoise_backend": "int4"})


def test_auto_is_triton_on_a_gpu_and_bf16_elsewhere_or_under_rtc():
    from pi_policy.runtime.choice import plan_stages
    from pi_policy.runtime.options import RTCSettings
    from pi_policy.runtime.spec import RunnerSpec, SpecError

    def denoise(on_gpu, **spec):
        return plan_stages(RunnerSpec(**spec), on_gpu, "bf16")["denoise"]

    assert denoise(True).impl == "triton" and denoise(True).label == "triton-graph"
    assert denoise(False).impl == "torch" and denoise(False).label == "bf16-eager"
    rtc = denoise(True, rtc=RTCSettings("inpaint"))
    assert rtc.impl == "torch" and rtc.label == "bf16-graph-compiled+rtc-inpaint" and not rtc.note
    explicit = denoise(True, denoise="fp8", rtc=RTCSettings("guided"))  # asked for, so the user is told why not
    assert explicit.impl == "torch" and "real-time chunking (guided) runs on the PyTorch" in explicit.note
    assert denoise(False, denoise="fp8").impl == "fp8w"  # an explicit choice stays (and falls back visibly)
    with pytest.raises(SpecError, match="denoise_backend 'int4' is not one of"):
        RunnerSpec(denoise="int4").validate()
    runner = build_runner(model=two_step_model(), progress=False, warmup=False)  # CPU, default: no fallback note
    assert runner.backend_note == "" and runner.backends["denoise"].startswith("float32")


def test_fused_expert_on_cpu_keeps_the_model_untouched():
    model = two_step_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_runner(model=model, denoise="fp8", progress=False, warmup=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
