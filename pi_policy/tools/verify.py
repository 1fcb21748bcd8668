"""`pi-policy verify`: candidate stage implementations against an untouched baseline, same inputs and noise.

A candidate names what runs each stage that FP8 or a fused kernel can replace: vision (bf16 | fp8), prefill
(bf16 | fp8 | tensorrt) and denoise (bf16 | triton | fp8). `--combinations` checks every combination of FP8
stages against the one baseline. The gate is the error of the actions; the per-layer K/V errors are diagnostics
that show where an error enters.

Order matters (the reference's "5142% error" came from running the baseline after the FP8 engine
was loaded): the baseline runs first on a model instance nothing else touches, its weights are
fingerprinted before and after the candidates run, and the candidates get their own model instance (whose
weights are checked after each candidate, so that one candidate cannot spoil the next).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pi_policy.model.checkpoint import weights_fingerprint
from pi_policy.observation import Observation
from pi_policy.runtime import build_model, build_runner
from pi_policy.runtime.choice import FUSED_DENOISE
from pi_policy.runtime.options import PREFILL_BACKENDS, VISION_BACKENDS
from pi_policy.runtime.spec import RunnerSpec
from pi_policy.runtime.stats import cosine, relative_error
from pi_policy.tools.flags import add_fp8_arguments, add_model_arguments, spec_from_args
from pi_policy.tools.synthetic import sample_observations

CANDIDATES = PREFILL_BACKENDS  # bf16: the prefill unchanged, another stage (--vision, --denoise) is the candidate
STAGE_CHOICES = {"vision": VISION_BACKENDS, "prefill": PREFILL_BACKENDS, "denoise": ("bf16", *FUSED_DENOISE)}
FP8_STAGES = ("vision", "prefill", "denoise")  # the stages with an FP8 implementation
OUTLIER_NOTE = ("Random weights have none of the activation outliers of a trained Gemma (a few channels far larger "
                "than the rest: they set the scales and push the other values down to where FP8's precision "
                "falls): these errors show that the FP8 code is right, not that FP8 is accurate enough for a "
                "policy. Verify your own checkpoint (--checkpoint) before it drives a robot.")
INPUTS_NOTE = ("Inputs are synthetic observations; a robot's images and prompts may load the activations "
               "differently: also compare on a recorded bag (pi-policy eval-bag --backend bf16 --backend fp8).")


class VerifyError(RuntimeError):
    """The comparison itself is invalid: corrupted baseline, a candidate that silently fell back, bad input."""


@dataclass(frozen=True)
class Candidate:
    """What runs each replaceable stage; bf16 everywhere is the baseline."""

    vision: str = "bf16"
    prefill: str = "bf16"
    denoise: str = "bf16"

    @property
    def changed(self) -> dict[str, str]:
        return {s: getattr(self, s) for s in FP8_STAGES if getattr(self, s) != "bf16"}

    @property
    def label(self) -> str:
        return " + ".join(f"{s} {impl}" for s, impl in self.changed.items()) or "baseline"


def fp8_combinations(stages: tuple[str, ...] = FP8_STAGES) -> list[Candidate]:
    """Every non-empty combination of `stages` in FP8, single stages first."""
    bad = sorted(set(stages) - set(FP8_STAGES))
    if bad or not stages:
        raise VerifyError(f"--combinations takes stages from {', '.join(FP8_STAGES)}, "
                          f"got {', '.join(stages) or 'none'}")
    stages = tuple(s for s in FP8_STAGES if s in stages)
    return [Candidate(**dict.fromkeys(combo, "fp8")) for r in range(1, len(stages) + 1)
            for combo in itertools.combinations(stages, r)]


@dataclass
class Captured:
    actions: np.ndarray  # (horizon, action_dim) float32, robot units
    k: torch.Tensor  # (layers, B, kv_heads, P, head_dim) float32 on CPU
    v: torch.Tensor
    backends: dict[str, str]  # per stage, the label of what ran
    prefill_ms: float
    dtype: str  # the model's


def capture(runner, obs: Observation, noise: np.ndarray) -> Captured:
    with torch.no_grad():
        out = runner.infer(obs, noise=noise)
    k, v = (t.detach().float().cpu().clone() for t in runner.buf.kv)
    return Captured(np.array(out.actions, dtype=np.float32, copy=True), k, v, dict(out.latency.backends),
                    out.latency.stages_ms["prefill"], runner.choices["prefill"].dtype)


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
    return {"candidate": stats(a), "max_diff": float(diff.max()), "mean_diff": float(diff.mean()),
            "rel_error": rel if rel is not None else float(np.linalg.norm(a - b)), "cosine": cosine(a, b),
            "kv_layers": layers}


def check_ran(cand: Candidate, choices: dict, note: str) -> None:
    """Every stage the candidate changes ran as asked (a silent fallback would compare the baseline with itself)."""
    for stage, asked in cand.changed.items():
        if choices[stage].impl != (FUSED_DENOISE[asked] if stage == "denoise" else asked):
            hint = (f" (on this machine leave it out: --combinations "
                    f"{','.join(s for s in FP8_STAGES if s != stage)})" if asked == "fp8" else "")
            raise VerifyError(f"candidate {stage} {asked!r} did not run ({stage} ran as {choices[stage].label!r}): "
                              f"{note or 'no reason given'}{hint}")


def verify(backend: str = "fp8", spec: RunnerSpec | None = None, max_rel_error: float = 0.03,
           scales: str | None = None, calibration_samples_n: int = 4, check_baseline: bool = False,
           denoise: str = "bf16", vision: str = "bf16", combinations: tuple[str, ...] | None = None) -> dict:
    """Run the comparison on `spec`'s model; returns the report (report["passed"]: every candidate's action relative
    error is <= max_rel_error). The candidate is (vision, backend, denoise), or with `combinations` every combination
    of those stages in FP8. scales: dynamic (default) or static (calibrated now on calibration_samples_n
    observations); the spec's fp8 calibration file instead gives static scales from `pi-policy calibrate`. The
    baseline runs every stage as the model does (the PyTorch denoise)."""
    spec = spec or RunnerSpec()
    calibration = spec.fp8.calibration
    if combinations is not None:
        if (vision, backend, denoise) != ("bf16", "bf16", "bf16"):
            raise VerifyError("give either --combinations or one candidate (--vision/--backend/--denoise), not both")
        candidates = fp8_combinations(tuple(combinations))
    else:
        for stage, impl in (("vision", vision), ("prefill", backend), ("denoise", denoise)):
            if impl not in STAGE_CHOICES[stage]:
                what = "candidate backend" if stage == "prefill" else f"{stage}"
                raise VerifyError(f"unknown {what} {impl!r}; choose one of {', '.join(STAGE_CHOICES[stage])}")
        candidates = [Candidate(vision, backend, denoise)]
        if not candidates[0].changed:
            raise VerifyError("nothing to compare: the candidate is the baseline (give --backend fp8|tensorrt, "
                              "--vision fp8, --denoise triton|fp8 or --combinations)")
    if scales not in (None, "dynamic", "static"):
        raise VerifyError(f"--scales must be 'dynamic' or 'static', got {scales!r}")
    if scales == "static" and calibration:
        raise VerifyError("give either --scales static (calibrate now) or --fp8-calibration FILE, not both")
    if not (max_rel_error > 0):
        raise VerifyError(f"--max-rel-error must be > 0, got {max_rel_error}")
    quantized = any(c.vision == "fp8" or c.prefill == "fp8" for c in candidates)
    t0 = time.perf_counter()
    baseline = spec.replace(backend="bf16", denoise="bf16", vision="bf16")

    # 1. The baseline: its own model instance, fingerprinted, run first.
    base_model = build_model(baseline)
    fp_before = weights_fingerprint(base_model)
    base_runner = build_runner(baseline, model=base_model)
    cfg = base_model.cfg
    state_dim = base_runner.normalizer.action_dim
    obs, *calib_obs = sample_observations(base_runner.camera_names, cfg.vision.image_size, state_dim,
                                          1 + calibration_samples_n, spec.seed + 1)
    noise = np.random.default_rng(spec.seed + 2).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    base = capture(base_runner, obs, noise)
    amax = None
    if quantized and scales == "static":
        from pi_policy.runtime.calibrate import calibrate_fp8, capture_samples

        amax = calibrate_fp8(base_model, capture_samples(base_runner, calib_obs, noise), spec.fp8,
                             progress=spec.progress).amax

    # 2. The candidates: a second instance with the same weights, checked after each.
    cand_model = build_model(baseline)
    if weights_fingerprint(cand_model) != fp_before:
        raise VerifyError("the candidate's model instance does not hold the baseline's weights (non-deterministic "
                          "load?); the comparison would be meaningless")
    results = []
    for cand in candidates:
        runner = build_runner(baseline, model=cand_model, backend=cand.prefill, denoise=cand.denoise,
                              vision=cand.vision, calibration=amax)
        note, choices = runner.backend_note, dict(runner.choices)
        got = capture(runner, obs, noise)
        del runner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        check_ran(cand, choices, note)
        if cand is not candidates[-1] and weights_fingerprint(cand_model) != fp_before:
            raise VerifyError(f"candidate {cand.label!r} changed its model instance's weights; the next candidates "
                              "would be compared with a different model")
        result = {"label": cand.label, "stages": asdict(cand), "ran": got.backends, "note": note,
                  "prefill_ms": got.prefill_ms, **compare(base, got)}
        result["passed"] = result["rel_error"] <= max_rel_error
        results.append(result)

    # 3. The baseline's weights must be exactly what they were.
    fp_after = weights_fingerprint(base_model)
    if fp_after != fp_before:
        raise VerifyError(f"baseline weights changed while the candidates ran ({fp_before[:16]} -> "
                          f"{fp_after[:16]}): building or running them corrupted the shared model")

    report = {"baseline_backend": base.backends["prefill"], "baseline_backends": base.backends,
              "baseline_denoise": base.backends["denoise"], "baseline_dtype": base.dtype, "preset": spec.preset,
              "checkpoint": spec.checkpoint or f"random-seed-{spec.seed}", "random_weights": spec.checkpoint is None,
              "device": str(next(base_model.parameters()).device),
              "gpu": torch.cuda.get_device_name() if spec.device != "cpu" and torch.cuda.is_available() else None,
              "torch": torch.__version__, "seed": spec.seed,
              "scales": (f"static ({calibration})" if calibration else "static" if scales == "static" else
                         f"dynamic per {spec.fp8.dynamic}") if quantized else None,
              "weights_fingerprint_before": fp_before, "weights_fingerprint_after": fp_after,
              "baseline": stats(base.actions.astype(np.float64)), "baseline_prefill_ms": base.prefill_ms,
              "max_rel_error": max_rel_error, "candidates": results,
              "notes": ([OUTLIER_NOTE] if spec.checkpoint is None else []) + [INPUTS_NOTE]}
    if combinations is None:  # the one candidate's fields at the top, as before combinations existed
        r = results[0]
        report |= {"backend": backend, "vision": vision, "candidate_backend": r["ran"]["prefill"],
                   "candidate_vision": r["ran"]["vision"], "candidate_denoise": r["ran"]["denoise"],
                   "candidate_note": r["note"], "candidate_prefill_ms": r["prefill_ms"],
                   **{k: r[k] for k in ("candidate", "max_diff", "mean_diff", "rel_error", "cosine", "kv_layers")}}
    if check_baseline:
        again = capture(base_runner, obs, noise)
        report["baseline_bit_identical"] = bool(np.array_equal(again.actions, base.actions)
                                                and torch.equal(again.k, base.k) and torch.equal(again.v, base.v))
        if not report["baseline_bit_identical"]:
            raise VerifyError("baseline rerun after the candidate is not bit-identical to the first run")
    else:
        report["baseline_bit_identical"] = None
    report["passed"] = all(r["passed"] for r in results)
    report["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return report


def baseline_label(dtype: str) -> str:
    """The baseline by its real dtype: BF16 on a GPU, float32 on a CPU (where the model runs in float32)."""
    return "BF16" if dtype == "bf16" else dtype


GATE = "the gate: exit 1 above it"
KV_HEADING = ("Per-layer K/V error of the prefill cache: diagnostics, not the gate (they show where an error "
              "enters; the action error decides)")


def _kv_table(layers: list[dict]) -> list[str]:
    return (["| Layer | K max diff | V max diff | K rel | V rel |", "|---|---|---|---|---|"]
            + [f"| {row['layer']} | {row['k_max_diff']:.4g} | {row['v_max_diff']:.4g} | {row['k_rel_error']:.3%} | "
               f"{row['v_rel_error']:.3%} |" for row in layers])


def _header(r: dict, what: str) -> list[str]:
    b = r["baseline"]
    base = baseline_label(r["baseline_dtype"])
    lines = [f"verify {what} vs {base} baseline ({r['preset']}, {r['checkpoint']}, {r['gpu'] or r['device']}"
             + (f", activation scales {r['scales']}" if r["scales"] else "") + ")",
             f"  {base} range: [{b['min']:.4f}, {b['max']:.4f}], mean: {b['mean']:.4f}"]
    return lines


def _footer(r: dict) -> list[str]:
    base = baseline_label(r["baseline_dtype"])
    lines = [f"  weights fingerprint: {r['weights_fingerprint_before'][:16]} before, "
             f"{r['weights_fingerprint_after'][:16]} after (unchanged)"]
    if r["baseline_bit_identical"] is not None:
        lines.append(f"  {base} rerun bit-identical: {r['baseline_bit_identical']}")
    return lines


def format_report(r: dict) -> str:
    """The single-candidate block (range, diffs, relative error and cosine against the limit, K/V diagnostics),
    or with several candidates one row each; then the notes and PASS or FAIL."""
    cands = r["candidates"]
    if len(cands) == 1 and "rel_error" in r:
        c = cands[0]
        ran = " + ".join(f"{s} {c['ran'][s]}" for s in c["stages"])
        lines = _header(r, ran) + [
            f"  {c['label']} range: [{c['candidate']['min']:.4f}, {c['candidate']['max']:.4f}], "
            f"mean: {c['candidate']['mean']:.4f}",
            f"  Max diff: {c['max_diff']:.4g}",
            f"  Mean diff: {c['mean_diff']:.4g}",
            f"  Cosine: {c['cosine']:.6f}",
            f"  Relative error: {100 * c['rel_error']:.3f}% (limit {100 * r['max_rel_error']:.2f}%: {GATE})",
            f"  prefill ms: baseline {r['baseline_prefill_ms']:.3f}, candidate {c['prefill_ms']:.3f} "
            "(one call; use pi-policy bench for timings)"] + _footer(r)
        if c["note"]:
            lines.append(f"  note: {c['note']}")
        lines += ["", KV_HEADING] + _kv_table(c["kv_layers"])
    else:
        lines = _header(r, f"{len(cands)} FP8 combinations") + [
            f"  action relative error limit {100 * r['max_rel_error']:.2f}% per combination ({GATE}); K and V "
            "relative errors of the first and last layer are diagnostics (every layer in --json)", "",
            "| candidate | rel error | cosine | max diff | K rel first/last | V rel first/last | result |",
            "|---|---|---|---|---|---|---|"]
        for c in cands:
            kv = c["kv_layers"]
            lines.append(f"| {c['label']} | {c['rel_error']:.3%} | {c['cosine']:.6f} | {c['max_diff']:.4g} | "
                         f"{kv[0]['k_rel_error']:.2%} / {kv[-1]['k_rel_error']:.2%} | "
                         f"{kv[0]['v_rel_error']:.2%} / {kv[-1]['v_rel_error']:.2%} | "
                         f"{'PASS' if c['passed'] else 'FAIL'} |")
        lines += [""] + _footer(r)
        parts = dict.fromkeys(part for c in cands for part in c["note"].split("; ") if part)  # each once
        lines += [f"  note: {part}" for part in parts]
    lines += [""] + r["notes"] + [""]
    failed = [c for c in cands if not c["passed"]]
    lines.append("PASS" if not failed else "FAIL: " + "; ".join(
        f"{c['label']}: relative error {c['rel_error']:.4%} > {r['max_rel_error']:.4%}" for c in failed))
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def add_parser(subparsers) -> None:
    v = subparsers.add_parser("verify", help="compare candidate vision, prefill and denoise implementations (FP8, "
                                             "TensorRT, fused) with the untouched baseline (bf16 on a GPU, float32 "
                                             "on a CPU)",
                              description="Run candidates (one, or every combination of FP8 stages) and the untouched "
                                          "baseline on the same observation and noise: action error and cosine (the "
                                          "gate: exit 1 above --max-rel-error), per-layer K/V errors (diagnostics), "
                                          "weight fingerprints.")
    add_model_arguments(v, skip=("--backend", "--denoise", "--vision"))
    v.add_argument("--backend", default="bf16", choices=CANDIDATES,
                   help="the candidate's prefill (default bf16: unchanged, to verify another stage alone)")
    v.add_argument("--vision", default="bf16", choices=VISION_BACKENDS,
                   help="the candidate's vision tower: bf16 (as the baseline) or fp8 (FP8 linears)")
    v.add_argument("--denoise", default="bf16", choices=STAGE_CHOICES["denoise"],
                   help="the candidate's denoise: bf16 (PyTorch, as the baseline), triton or fp8 (fused expert)")
    v.add_argument("--combinations", nargs="?", const=",".join(FP8_STAGES), default=None, metavar="STAGES",
                   help="every combination of these stages in FP8 as a candidate, each against the one baseline "
                        f"(default: {','.join(FP8_STAGES)})")
    v.add_argument("--max-rel-error", type=float, default=0.03,
                   help="fail when a candidate's action relative error is above this fraction (the gate; default: "
                        "%(default)s = 3%%)")
    v.add_argument("--scales", default=None, choices=("dynamic", "static"),
                   help="FP8 activation scales: dynamic (default) or static, calibrated now on --calibration-samples "
                        "observations (or give --fp8-calibration FILE)")
    v.add_argument("--calibration-samples", type=int, default=4, help="observations for static scales")
    v.add_argument("--check-baseline", action="store_true",
                   help="rerun the baseline after the candidates and require bit-identical actions and KV")
    v.add_argument("--json", default=None, help="write the report here")
    add_fp8_arguments(v)
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    combos = None if args.combinations is None else tuple(x for x in args.combinations.split(",") if x)
    try:
        report = verify(args.backend, spec_from_args(args, backend="bf16", denoise="bf16", vision="bf16"),
                        args.max_rel_error, args.scales, args.calibration_samples, args.check_baseline,
                        denoise=args.denoise, vision=args.vision, combinations=combos)
    except (VerifyError, ValueError, FileNotFoundError) as e:
        print(f"verify: ERROR: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        print(f"wrote {write_report(report, args.json)}")
    return 0 if report["passed"] else 1
