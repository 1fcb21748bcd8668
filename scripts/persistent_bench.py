"""GPU measurement of the persistent action expert against the fused expert, in one process, written as JSON.

For each preset and batch: a realistic prefix (random images through the vision tower, a 20-token prompt, the
real prefill, the same for every batch entry but its noise), then
- accuracy against the PyTorch bf16 denoise (same weights, cache, noise): fused and persistent, bf16 and FP8
  weights (pi0.5 with its adaptive-norm gates opened, as in scripts/gpu_expert_check.py);
- the whole denoise (10 steps), CUDA-graph replay, median ms: PyTorch (eager graph), the fused expert and the
  persistent kernel, bf16 and FP8 weights;
- each task kind alone: the kernel over a list of only that kind's stages (all layers and steps), chained
  (each stage waits for the one before, as in the real list) and unchained (no waits): us per stage, GB/s of
  the stage's weights (tasks.stage_bytes), and the roofline's prediction for it (tasks.predict) beside it;
- with --sweep: tile and program-count alternatives for the whole kernel, the fastest kept for later rows.

Usage: python scripts/persistent_bench.py OUT_DIR [--presets pi0,pi05] [--batches 1,4,16] [--iters 30] [--sweep]
       python scripts/persistent_bench.py OUT_DIR --device cpu --presets tiny --batches 1 --steps 1   (a smoke test
       under Triton's interpreter: times mean nothing there)
Writes OUT_DIR/persistent_bench.json after every section and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before they are imported

from pi_policy.model.layers import RMSNorm  # noqa: E402
from pi_policy.runtime.expert.fused import FusedExpert  # noqa: E402
from pi_policy.runtime.expert.persistent import PersistentExpert, Tasks  # noqa: E402
from pi_policy.runtime.expert.tasks import KINDS, build_tasks, predict, stage_bytes  # noqa: E402
from pi_policy.runtime.factory import build_model  # noqa: E402
from pi_policy.runtime.stats import action_accuracy  # noqa: E402
from pi_policy.runtime.timer import graph_replay_times  # noqa: E402

RESULTS: dict = {}
DEVICE = "cuda"
SWEEP = [  # whole-kernel alternatives around the plan's defaults: tasks.TILES overrides, warps, programs per SM
    {}, {"warps": 4}, {"attn": dict(bm=16, bn=32, chunk=128, bs=16, tokens=1)},
    {"attn": dict(bm=32, bn=64, chunk=128, bs=32, tokens=1)}, {"attn": dict(bm=32, bn=16, chunk=256, bs=16, tokens=1)},
    {"gate_up": (16, 64)}, {"gate_up": (32, 128)}, {"qkv": (128, 64), "wo": (128, 64), "down": (128, 64)},
    {"qkv": (64, 128), "wo": (64, 128), "down": (64, 128)}, {"programs_per_sm": 2}]


def save(out: Path) -> None:
    (out / "persistent_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def median_ms(fn, iters: int) -> float:
    """Median ms of one CUDA-graph replay of fn (on a CPU: one call, host clock)."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return statistics.median(graph_replay_times(fn, iters, warmup=2))


def prefix(model, batch: int, seed: int = 0):
    cfg = model.cfg
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.rand(1, cfg.num_cameras, 3, s, s, generator=gen, device=DEVICE) * 2 - 1
    masks = torch.ones(1, cfg.num_cameras, dtype=torch.bool, device=DEVICE)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_token_len), generator=gen, device=DEVICE)
    tmask = torch.arange(cfg.max_token_len, device=DEVICE)[None] < 20
    with torch.no_grad():
        embs, pad = model.embed_prefix(model.embed_images(images), masks, tokens, tmask)
        embs, pad = embs.expand(batch, -1, -1).contiguous(), pad.expand(batch, -1).contiguous()
        cache = model.prefill(embs, pad)
    state = torch.randn(batch, cfg.action_dim, generator=gen, device=DEVICE) * 0.5
    noise = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=gen, device=DEVICE)
    return cache, pad, state, noise


def open_gates(model) -> None:
    """pi0.5's random init leaves its adaptive-norm gates near 0: gate bias 1, scale bias 0.1."""
    w = model.cfg.expert.width
    with torch.no_grad():
        for m in model.expert.modules():
            if isinstance(m, RMSNorm) and m.dense is not None:
                m.dense.bias[2 * w:] = 1.0
                m.dense.bias[:w] = 0.1


def accuracy(a: torch.Tensor, b: torch.Tensor) -> dict:
    r = action_accuracy(a.flatten(0, 1).float().cpu().numpy(), b.flatten(0, 1).float().cpu().numpy())
    return {k: r[k] for k in ("relative_error", "cosine", "max_diff")}


def per_kind(pe: PersistentExpert, inputs_of, batch: int, prefix_len: int, steps: int, iters: int, fp8: bool,
             card: str) -> list[dict]:
    """Each task kind alone, chained and unchained: us per stage and GB/s, beside the roofline's prediction."""
    g, plan, work = pe.work(batch, prefix_len, steps)
    predicted = {r["kind"]: r for r in predict(g, plan, fp8, card)}
    rows = []
    for kind in KINDS:
        if kind not in predicted:
            continue
        row = {"kind": kind, "prediction": predicted[kind]}
        for chained in (True, False):
            lst = build_tasks(g, plan, kinds=[kind], chained=chained)
            tasks = Tasks.of(lst, pe.device)
            inputs = inputs_of()
            ms = median_ms(lambda t=tasks, i=inputs: pe.run(work, g, plan, i, t), iters)
            us = 1e3 * ms / len(lst.stages)
            key = "chained" if chained else "unchained"
            row[key] = {"us_per_stage": round(us, 3), "stages": len(lst.stages),
                        "gbs": round(stage_bytes(kind, g, fp8) / (us * 1e3), 1) if us > 0 else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    work.buffers["qkv"].zero_()  # the single-kind lists leave partial sums behind
    work.buffers["ss"].zero_()
    return rows


def check_preset(preset: str, args, out: Path) -> None:
    res = RESULTS.setdefault(preset, {})
    model = build_model(preset=preset, device=DEVICE, seed=0)
    if args.steps:
        model.cfg = dataclasses.replace(model.cfg, num_steps=args.steps)
    if model.cfg.pi05:
        open_gates(model)
    experts = {f"{kind}_{w}": cls(model, w) for kind, cls in (("fused", FusedExpert), ("persistent", PersistentExpert))
               for w in ("bf16", "fp8")}
    for batch in (int(b) for b in args.batches.split(",")):
        check_batch(model, experts, batch, res.setdefault(f"batch{batch}", {}), args, out)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def check_batch(model, experts: dict, batch: int, row: dict, args, out: Path) -> None:
    cache, pad, state, noise = prefix(model, batch)
    dst = torch.empty_like(noise, dtype=torch.float32)
    ref = model.denoise(cache, pad, state, noise)
    acc = row.setdefault("accuracy_vs_torch_bf16", {})
    for name, e in experts.items():
        acc[name] = accuracy(e.denoise(cache, pad, state, noise), ref)
    print(model.cfg.name, batch, "accuracy", json.dumps(acc), flush=True)
    save(out)

    def timed(denoise) -> float:
        return median_ms(lambda: dst.copy_(denoise(cache, pad, state, noise)), args.iters)

    ms = row.setdefault("denoise_ms", {})
    ms["torch_eager_graph"] = timed(model.denoise)
    for name, e in experts.items():
        ms[name] = timed(e.denoise)
    row["per_robot_ms"] = {k: v / batch for k, v in ms.items()}
    print(model.cfg.name, batch, "denoise ms", json.dumps(ms), flush=True)
    save(out)
    if args.sweep:
        sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 1
        row["sweep"], best = sweep(model, timed, sms)
        if best is not None:
            experts["persistent_bf16"] = best
            row["denoise_ms"]["persistent_bf16_swept"] = timed(best.denoise)
        save(out)
    gpu = RESULTS["machine"]["gpu"]
    card = "Thor" if "Thor" in gpu else "H200"
    n = model.cfg.num_steps
    for w in ("bf16", "fp8"):
        pe = experts[f"persistent_{w}"]
        row[f"per_kind_{w}"] = per_kind(pe, lambda pe=pe: pe.inputs(cache, pad, state, noise.float().clone(), n),
                                        batch, pad.shape[1], n, args.iters, w == "fp8", card)
        save(out)


def sweep(model, timed, sms: int) -> tuple[list[dict], PersistentExpert | None]:
    """The whole kernel (bf16 weights) with each alternative of SWEEP; the fastest expert is returned."""
    rows, best = [], None
    for alt in SWEEP:
        tiles = {k: v for k, v in alt.items() if k != "programs_per_sm"}
        try:
            pe = PersistentExpert(model, "bf16", programs=sms * alt.get("programs_per_sm", 1), tiles=tiles)
            ms = timed(pe.denoise)
            rows.append({"alternative": alt, "ms": round(ms, 4)})
            if best is None or ms < best[0]:
                best = (ms, pe)
        except Exception as e:  # noqa: BLE001 - an alternative that does not build is one row of the report
            rows.append({"alternative": alt, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print("sweep", json.dumps(rows[-1]), flush=True)
    return rows, None if best is None else best[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--presets", default="pi0,pi05")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--steps", type=int, default=0, help="denoise steps (default: the preset's)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    RESULTS["machine"] = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
                          "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(RESULTS["machine"]), flush=True)
    for preset in args.presets.split(","):
        try:
            check_preset(preset, args, args.out)
        except Exception:  # noqa: BLE001 - report and go on to the next preset
            RESULTS.setdefault(preset, {})["error"] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
        save(args.out)
    print("\n| preset | batch | torch eager | fused bf16 | persistent bf16 | fused fp8 | persistent fp8 "
          "| persistent bf16 rel err / cos | persistent fp8 rel err |")
    for preset in args.presets.split(","):
        for key, row in RESULTS.get(preset, {}).items():
            if not key.startswith("batch"):
                continue
            t, a = row.get("denoise_ms", {}), row.get("accuracy_vs_torch_bf16", {})
            pb, pf = a.get("persistent_bf16", {}), a.get("persistent_fp8", {})
            print(f"| {preset} | {key[5:]} | {t.get('torch_eager_graph', float('nan')):.3f} "
                  f"| {t.get('fused_bf16', float('nan')):.3f} | {t.get('persistent_bf16', float('nan')):.3f} "
                  f"| {t.get('fused_fp8', float('nan')):.3f} | {t.get('persistent_fp8', float('nan')):.3f} "
                  f"| {pb.get('relative_error', float('nan')):.5f} / {pb.get('cosine', float('nan')):.6f} "
                  f"| {pf.get('relative_error', float('nan')):.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
