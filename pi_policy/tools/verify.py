"""`pi-policy verify`: a candidate prefill backend against an untouched baseline, same inputs and noise.

Order matters (the reference's "5142% error" came from running the baseline after the FP8 engine
was loaded): the baseline runs first on a model instance nothing else touches, its weights are
fingerprinted before and after the candidate runs, and the candidate gets its own model instance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pi_policy.model.checkpoint import weights_fingerprint
from pi_policy.observation import Observation
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.choice import FUSED_DENOISE
from pi_policy.runtime.options import PREFILL_BACKENDS
from pi_policy.runtime.spec import RunnerSpec
from pi_policy.runtime.stats import relative_error
from pi_policy.tools.flags import add_fp8_arguments, add_model_arguments, spec_from_args
from pi_policy.tools.synthetic import sample_observations

CANDIDATES = PREFILL_BACKENDS  # bf16: the prefill unchanged, a fused denoise (--denoise) is the candidate
CANDIDATE_DENOISE = ("bf16", *FUSED_DENOISE)  # bf16: the PyTorch expert, as the baseline


class VerifyError(RuntimeError):
    """The comparison itself is invalid: corrupted baseline, a candidate that silently fell back, bad input."""


@dataclass
class Captured:
    actions: np.ndarray  # (horizon, action_dim) float32, robot units
    k: torch.Tensor  # (layers, B, kv_heads, P, head_dim) float32 on CPU
    v: torch.Tensor
    prefill_backend: str
    prefill_ms: float
    denoise_backend: str


def capture(runner, obs: Observation, noise: np.ndarray) -> Captured:
    with torch.no_grad():
        out = runner.infer(obs, noise=noise)
    k, v = (t.detach().float().cpu().clone() for t in runner.buf.kv)
    return Captured(np.array(out.actions, dtype=np.float32, copy=True), k, v, out.latency.backends["prefill"],
                    out.latency.stages_ms["prefill"], out.latency.backends["denoise"])


def calibration_samples(runner, observations: list[Observation], noise: np.ndarray
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prefix_embs, prefix_pad) the runner computes for each observation: inputs for FP8 static scales."""
    samples = []
    for obs in observations:
        with torch.no_grad():
            runner.infer(obs, noise=noise)
        samples.append((runner.buf.prefix_embs.clone(), runner.buf.prefix_pad.clone()))
    return samples


def stats(a: np.ndarray) -> dict[str, float]:
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def compare(base: Captured, cand: Captured) -> dict:
    a, b = cand.actions.astype(np.float64), base.actions.astype(np.float64)
    diff = np.abs(a - b)
    rel = relative_error(a, b)
    layers = [{"layer": i, "k_max_diff": float((cand.k[i] - base.k[i]).abs().max()),
               "v_max_diff": float((cand.v[i] - base.v[i]).abs().max()),
               "k_rel_error": float((cand.k[i] - base.k[i]).norm() / base.k[i].norm().clamp(min=1e-30)),
               "v_rel_error": float((cand.v[i] - base.v[i]).norm() / base.v[i].norm().clamp(min=1e-30))}
              for i in range(base.k.shape[0])]
    return {"baseline": stats(b), "candidate": stats(a), "max_diff": float(diff.max()), "mean_diff": float(diff.mean()),
            "rel_error": rel if rel is not None else float(np.linalg.norm(a - b)),
            "kv_layers": layers}


def verify(backend: str = "fp8", spec: RunnerSpec | None = None, max_rel_error: float = 0.03,
           scales: str = "dynamic", calibration_samples_n: int = 4, check_baseline: bool = False,
           denoise: str = "bf16") -> dict:
    """Run the comparison of the candidate (prefill `backend`, denoise `denoise`) with the baseline on `spec`'s
    model; returns the report (report["passed"] says whether rel_error <= max_rel_error). The baseline always runs
    the bf16 prefill and the PyTorch denoise."""
    spec = spec or RunnerSpec()
    if denoise not in CANDIDATE_DENOISE:
        raise VerifyError(f"unknown denoise {denoise!r}; choose one of {', '.join(CANDIDATE_DENOISE)}")
    if backend == "bf16" and denoise == "bf16":
        raise VerifyError("nothing to compare: the candidate is the baseline (give --backend fp8|tensorrt or "
                          "--denoise triton|fp8)")
    if backend not in CANDIDATES:
        raise VerifyError(f"unknown candidate backend {backend!r}; choose one of {CANDIDATES}")
    if scales not in ("dynamic", "static"):
        raise VerifyError(f"--scales must be 'dynamic' or 'static', got {scales!r}")
    if not (max_rel_error > 0):
        raise VerifyError(f"--max-rel-error must be > 0, got {max_rel_error}")
    t0 = time.perf_counter()

    # 1. The baseline: its own model instance, fingerprinted, run first.
    base_model = build_model(spec)
    fp_before = weights_fingerprint(base_model)
    base_runner = build_runner(spec, model=base_model, backend="bf16", denoise="bf16")
    cfg = base_model.cfg
    state_dim = base_runner.normalizer.action_dim
    obs, *calib_obs = sample_observations(base_runner.camera_names, cfg.vision.image_size, state_dim,
                                          1 + calibration_samples_n, spec.seed + 1)
    noise = np.random.default_rng(spec.seed + 2).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    base = capture(base_runner, obs, noise)

    # 2. The candidate: a second instance with the same weights.
    cand_model = build_model(spec)
    if weights_fingerprint(cand_model) != fp_before:
        raise VerifyError("the candidate's model instance does not hold the baseline's weights (non-deterministic "
                          "load?); the comparison would be meaningless")
    calibration = None
    if backend == "fp8" and scales == "static":
        calibration = calibration_samples(base_runner, calib_obs, noise)
    cand_runner = build_runner(spec, model=cand_model, backend=backend, denoise=denoise, calibration=calibration)
    note = cand_runner.backend_note
    cand = capture(cand_runner, obs, noise)
    ran = cand_runner.choices
    if backend != "bf16" and ran["prefill"].impl != backend:
        raise VerifyError(f"candidate backend {backend!r} did not run (prefill ran as {ran['prefill'].label!r}): "
                          f"{note or 'no reason given'}")
    if denoise != "bf16" and ran["denoise"].impl != FUSED_DENOISE[denoise]:
        raise VerifyError(f"candidate denoise {denoise!r} did not run (denoise ran as {ran['denoise'].label!r}): "
                          f"{note or 'no reason given'}")

    # 3. The baseline's weights must be exactly what they were.
    fp_after = weights_fingerprint(base_model)
    if fp_after != fp_before:
        raise VerifyError(f"baseline weights changed while the candidate ran ({fp_before[:16]} -> "
                          f"{fp_after[:16]}): building or running {backend!r} corrupted the shared model")

    report = {"backend": backend, "baseline_backend": base.prefill_backend, "candidate_backend": cand.prefill_backend,
              "baseline_denoise": base.denoise_backend, "candidate_denoise": cand.denoise_backend,
              "candidate_note": note, "preset": spec.preset,
              "checkpoint": spec.checkpoint or f"random-seed-{spec.seed}",
              "device": str(next(base_model.parameters()).device),
              "baseline_dtype": base_runner.choices["prefill"].dtype,
              "gpu": torch.cuda.get_device_name() if spec.device != "cpu" and torch.cuda.is_available() else None,
              "torch": torch.__version__, "seed": spec.seed, "scales": scales if backend == "fp8" else None,
              "weights_fingerprint_before": fp_before, "weights_fingerprint_after": fp_after,
              "baseline_prefill_ms": base.prefill_ms, "candidate_prefill_ms": cand.prefill_ms,
              **compare(base, cand), "max_rel_error": max_rel_error}
    if check_baseline:
        again = capture(base_runner, obs, noise)
        report["baseline_bit_identical"] = bool(np.array_equal(again.actions, base.actions)
                                                and torch.equal(again.k, base.k) and torch.equal(again.v, base.v))
        if not report["baseline_bit_identical"]:
            raise VerifyError("baseline rerun after the candidate is not bit-identical to the first run")
    else:
        report["baseline_bit_identical"] = None
    report["passed"] = report["rel_error"] <= max_rel_error
    report["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return report


def format_report(r: dict) -> str:
    b, c = r["baseline"], r["candidate"]
    base = "BF16" if r["baseline_dtype"] == "bf16" else r["baseline_dtype"]
    lines = [
        f"verify {r['candidate_backend']} + denoise {r['candidate_denoise']} vs {r['baseline_backend']} + denoise "
        f"{r['baseline_denoise']} ({r['preset']}, {r['checkpoint']}, "
        f"{r['gpu'] or r['device']})",
        f"  {base} range: [{b['min']:.4f}, {b['max']:.4f}], mean: {b['mean']:.4f}",
        f"  {r['backend']} range: [{c['min']:.4f}, {c['max']:.4f}], mean: {c['mean']:.4f}",
        f"  Max diff: {r['max_diff']:.4g}",
        f"  Mean diff: {r['mean_diff']:.4g}",
        f"  Relative error: {100 * r['rel_error']:.3f}% (limit {100 * r['max_rel_error']:.2f}%)",
        f"  prefill ms: baseline {r['baseline_prefill_ms']:.3f}, candidate {r['candidate_prefill_ms']:.3f} "
        "(one call; use pi-policy bench for timings)",
        f"  weights fingerprint: {r['weights_fingerprint_before'][:16]} before, "
        f"{r['weights_fingerprint_after'][:16]} after (unchanged)",
    ]
    if r["baseline_bit_identical"] is not None:
        lines.append(f"  {base} rerun bit-identical: {r['baseline_bit_identical']}")
    if r["candidate_note"]:
        lines.append(f"  note: {r['candidate_note']}")
    lines += ["", "| Layer | K max diff | V max diff | K rel | V rel |", "|---|---|---|---|---|"]
    lines += [f"| {row['layer']} | {row['k_max_diff']:.4g} | {row['v_max_diff']:.4g} | {row['k_rel_error']:.3%} | "
              f"{row['v_rel_error']:.3%} |" for row in r["kv_layers"]]
    lines.append("")
    lines.append("PASS" if r["passed"] else f"FAIL: relative error {r['rel_error']:.4%} > {r['max_rel_error']:.4%}")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def add_parser(subparsers) -> None:
    v = subparsers.add_parser("verify", help="compare a prefill backend (fp8, tensorrt) with the untouched baseline "
                                                     "(bf16 on a GPU, float32 on a CPU)",
                              description="Run a candidate prefill (or fused denoise) and the untouched baseline on "
                                          "the same observation and noise: action and per-layer K/V errors, weight "
                                          "fingerprints; exit 1 above --max-rel-error.")
    add_model_arguments(v, skip=("--backend", "--denoise"))
    v.add_argument("--backend", required=True, choices=CANDIDATES,
                   help="the candidate's prefill (bf16: unchanged, to verify a --denoise alone)")
    v.add_argument("--denoise", default="bf16", choices=CANDIDATE_DENOISE,
                   help="the candidate's denoise: bf16 (PyTorch, as the baseline), triton or fp8 (fused expert)")
    v.add_argument("--max-rel-error", type=float, default=0.03,
                   help="fail when the actions' relative error is above this fraction (default: %(default)s = 3%%)")
    v.add_argument("--scales", default="dynamic", choices=("dynamic", "static"), help="FP8 activation scales")
    v.add_argument("--calibration-samples", type=int, default=4, help="observations for static scales")
    v.add_argument("--check-baseline", action="store_true",
                   help="rerun the baseline after the candidate and require bit-identical actions and KV")
    v.add_argument("--json", default=None, help="write the report here")
    add_fp8_arguments(v)
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.backend, spec_from_args(args, backend="bf16", denoise="bf16"), args.max_rel_error,
                        args.scales, args.calibration_samples, args.check_baseline, denoise=args.denoise)
    except VerifyError as e:
        print(f"verify: ERROR: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        print(f"wrote {write_report(report, args.json)}")
    return 0 if report["passed"] else 1
