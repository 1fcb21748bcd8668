"""`pi-policy verify`: a candidate prefill backend against an untouched BF16 baseline, same inputs and noise.

Order matters (the reference's "5142% error" came from running the baseline after the FP8 engine
was loaded): the baseline runs first on a model instance nothing else touches, its weights are
fingerprinted before and after the candidate runs, and the candidate gets its own model instance.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model.checkpoint import weights_fingerprint
from .observation import Observation
from .runtime import build_model, build_runner
from .runtime.expert import DENOISE, NAMES

CANDIDATES = ("bf16", "fp8", "tensorrt")  # bf16: the prefill unchanged, a fused denoise (--denoise) is the candidate
PROMPTS = ("pick up the red block", "open the drawer", "fold the towel", "put the cup on the plate")


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


def sample_observations(camera_names: list[str], image_size: int, state_dim: int, n: int, seed: int
                        ) -> list[Observation]:
    """Deterministic synthetic observations (smooth random images, small states) for verification and calibration."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        images = {}
        for cam in camera_names:
            coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
            img = np.kron(coarse, np.ones((image_size // 8 + 1, image_size // 8 + 1, 1)))[:image_size, :image_size]
            noise = rng.normal(0, 12, img.shape)
            images[cam] = np.clip(img + noise, 0, 255).astype(np.uint8)
        state = rng.normal(0, 0.5, state_dim).astype(np.float32)
        out.append(Observation(images=images, state=state, prompt=PROMPTS[i % len(PROMPTS)], stamp=float(i)))
    return out


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
    norm = np.linalg.norm(b)
    layers = [{"layer": i, "k_max_diff": float((cand.k[i] - base.k[i]).abs().max()),
               "v_max_diff": float((cand.v[i] - base.v[i]).abs().max()),
               "k_rel_error": float((cand.k[i] - base.k[i]).norm() / base.k[i].norm().clamp(min=1e-30)),
               "v_rel_error": float((cand.v[i] - base.v[i]).norm() / base.v[i].norm().clamp(min=1e-30))}
              for i in range(base.k.shape[0])]
    return {"bf16": stats(b), "candidate": stats(a), "max_diff": float(diff.max()), "mean_diff": float(diff.mean()),
            "rel_error": float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a - b)),
            "kv_layers": layers}


def verify(backend: str = "fp8", preset: str = "tiny", checkpoint: str | None = None, device: str = "cpu",
           seed: int = 0, engine_path: str | None = None, max_rel_error: float = 0.03, scales: str = "dynamic",
           calibration_samples_n: int = 4, check_baseline: bool = False, progress: bool = True,
           norm_stats: str | None = None, tokenizer: str | None = None, fp8_options: dict | None = None,
           denoise: str = "bf16") -> dict:
    """Run the comparison; returns the report (report["passed"] says whether rel_error <= max_rel_error).
    The baseline always runs the PyTorch denoise; `denoise` is the candidate's."""
    if backend not in CANDIDATES:
        raise VerifyError(f"unknown candidate backend {backend!r}; choose one of {CANDIDATES}")
    if denoise not in DENOISE:
        raise VerifyError(f"unknown denoise {denoise!r}; choose one of {DENOISE}")
    if backend == "bf16" and denoise == "bf16":
        raise VerifyError("nothing to compare: the candidate is the baseline (give --backend fp8|tensorrt or "
                          "--denoise triton|fp8)")
    if scales not in ("dynamic", "static"):
        raise VerifyError(f"--scales must be 'dynamic' or 'static', got {scales!r}")
    if not (max_rel_error > 0):
        raise VerifyError(f"--max-rel-error must be > 0, got {max_rel_error}")
    t0 = time.perf_counter()
    common = dict(norm_stats=norm_stats, tokenizer=tokenizer, seed=seed, progress=progress)

    # 1. The baseline: its own model instance, fingerprinted, run first.
    base_model = build_model(preset, checkpoint, device, seed)
    fp_before = weights_fingerprint(base_model)
    base_runner = build_runner(preset, checkpoint, device=device, backend="bf16", model=base_model, denoise="bf16",
                               **common)
    cfg = base_model.cfg
    state_dim = base_runner.normalizer.action_dim
    obs, *calib_obs = sample_observations(base_runner.camera_names, cfg.vision.image_size, state_dim,
                                          1 + calibration_samples_n, seed + 1)
    noise = np.random.default_rng(seed + 2).standard_normal((cfg.horizon, cfg.action_dim)).astype(np.float32)
    base = capture(base_runner, obs, noise)

    # 2. The candidate: a second instance with the same weights.
    cand_model = build_model(preset, checkpoint, device, seed)
    if weights_fingerprint(cand_model) != fp_before:
        raise VerifyError("the candidate's model instance does not hold the baseline's weights (non-deterministic "
                          "load?); the comparison would be meaningless")
    extra = {"fp8_options": dict(fp8_options or {})} if backend == "fp8" else {}
    if backend == "fp8" and scales == "static":
        extra["calibration"] = calibration_samples(base_runner, calib_obs, noise)
    cand_runner = build_runner(preset, checkpoint, device=device, backend=backend, model=cand_model,
                               engine_path=engine_path, denoise=denoise, **extra, **common)
    note = getattr(cand_runner, "backend_note", "")
    cand = capture(cand_runner, obs, noise)
    if backend != "bf16" and not cand.prefill_backend.startswith(backend):
        raise VerifyError(f"candidate backend {backend!r} did not run (prefill ran as {cand.prefill_backend!r}): "
                          f"{note or 'no reason given'}")
    if denoise != "bf16" and not cand.denoise_backend.startswith(NAMES[denoise]):
        raise VerifyError(f"candidate denoise {denoise!r} did not run (denoise ran as {cand.denoise_backend!r}): "
                          f"{note or 'no reason given'}")

    # 3. The baseline's weights must be exactly what they were.
    fp_after = weights_fingerprint(base_model)
    if fp_after != fp_before:
        raise VerifyError(f"BF16 baseline weights changed while the candidate ran ({fp_before[:16]} -> "
                          f"{fp_after[:16]}): building or running {backend!r} corrupted the shared model")

    report = {"backend": backend, "baseline_backend": base.prefill_backend, "candidate_backend": cand.prefill_backend,
              "baseline_denoise": base.denoise_backend, "candidate_denoise": cand.denoise_backend,
              "candidate_note": note, "preset": preset, "checkpoint": checkpoint or f"random-seed-{seed}",
              "device": str(next(base_model.parameters()).device),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else None,
              "torch": torch.__version__, "seed": seed, "scales": scales if backend == "fp8" else None,
              "weights_fingerprint_before": fp_before, "weights_fingerprint_after": fp_after,
              "baseline_prefill_ms": base.prefill_ms, "candidate_prefill_ms": cand.prefill_ms,
              **compare(base, cand), "max_rel_error": max_rel_error}
    if check_baseline:
        again = capture(base_runner, obs, noise)
        report["baseline_bit_identical"] = bool(np.array_equal(again.actions, base.actions)
                                                and torch.equal(again.k, base.k) and torch.equal(again.v, base.v))
        if not report["baseline_bit_identical"]:
            raise VerifyError("BF16 baseline rerun after the candidate is not bit-identical to the first run")
    else:
        report["baseline_bit_identical"] = None
    report["passed"] = report["rel_error"] <= max_rel_error
    report["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return report


def format_report(r: dict) -> str:
    b, c = r["bf16"], r["candidate"]
    lines = [
        f"verify {r['candidate_backend']} + denoise {r['candidate_denoise']} vs {r['baseline_backend']} + denoise "
        f"{r['baseline_denoise']} ({r['preset']}, {r['checkpoint']}, "
        f"{r['gpu'] or r['device']})",
        f"  BF16 range: [{b['min']:.4f}, {b['max']:.4f}], mean: {b['mean']:.4f}",
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
        lines.append(f"  BF16 rerun bit-identical: {r['baseline_bit_identical']}")
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
