#!/usr/bin/env python3
"""GPU check of the FP8 prefill (pi0 full size, random weights): per-shape probe, prefill timings, verify.

    python scripts/gpu_fp8_check.py --out /tmp/fp8_check [--preset pi0] [--iters 50] [--skip-verify]

Writes probe.json, prefill.json, verify.json and summary.json under --out and prints each table.
Needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: H100, Thor, Ada).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi_policy.model.checkpoint import weights_fingerprint  # noqa: E402
from pi_policy.runtime import build_model  # noqa: E402
from pi_policy.runtime.prefill.fp8 import build_fp8_prefill, shape_key  # noqa: E402
from pi_policy.runtime.prefill.fp8_linear import fp8_supported  # noqa: E402
from pi_policy.runtime.prefill.fp8_probe import probe_fp8_shapes  # noqa: E402
from pi_policy.runtime.spec import RunnerSpec  # noqa: E402
from pi_policy.runtime.timer import graph_replay_times  # noqa: E402
from pi_policy.tools.verify import format_report, verify, write_report  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def time_prefill(fn, embs, pad, kv, iters: int) -> dict:
    """One CUDA graph of a whole prefill, replayed `iters` times; per-replay ms (p50, p99) from CUDA events."""
    with torch.no_grad():
        times = graph_replay_times(lambda: fn(embs, pad, kv), iters)
    times.sort()
    return {"p50_ms": times[len(times) // 2], "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))]}


def kv_rel(kv, ref) -> dict:
    out = {}
    for name, a, b in (("k", kv[0], ref[0]), ("v", kv[1], ref[1])):
        a, b = a.float(), b.float()
        out[f"{name}_rel_error"] = float((a - b).norm() / b.norm())
        out[f"{name}_max_diff_per_layer"] = [float((a[i] - b[i]).abs().max()) for i in range(a.shape[0])]
    return out


def mlp_only(model) -> dict[str, bool]:
    """Decisions that keep the attention projections (wqkv, wo) in bf16 and the MLP in FP8."""
    cfg = model.cfg
    m, w, q, kv = cfg.prefix_len, cfg.llm.width, cfg.llm.num_heads * cfg.llm.head_dim, cfg.llm.num_kv_heads
    kv = kv * cfg.llm.head_dim
    return {shape_key(m, w, q + 2 * kv): False, shape_key(m, q, w): False}


def bf16_compiled_prefill(model):
    """The bf16 prefill with torch.compile'd blocks: the fair baseline for compiled FP8 variants."""
    layers = [torch.compile(blk, dynamic=False) for blk in model.llm.layers]
    return lambda e, p, kv: model.prefill(e, p, kv, layers=layers)


def prefill_section(model, iters: int, decisions: dict) -> dict:
    cfg = model.cfg
    g = torch.Generator(device="cuda").manual_seed(0)
    # Prefix embeddings on the scale the model produces (image tokens ~N(0, 1) after projection is not
    # guaranteed with random weights; a unit normal is the stated workload here).
    embs = torch.randn(1, cfg.prefix_len, cfg.llm.width, device="cuda", generator=g).to(model.dtype)
    pad = torch.ones(1, cfg.prefix_len, dtype=torch.bool, device="cuda")
    pad[0, cfg.image_tokens + 12:] = False  # a 12-token prompt, padded
    shape = (cfg.llm.depth, 1, cfg.llm.num_kv_heads, cfg.prefix_len, cfg.llm.head_dim)

    def cache():
        return (torch.zeros(shape, dtype=model.dtype, device="cuda"), torch.zeros(shape, dtype=model.dtype,
                                                                                 device="cuda"))

    rows = {}
    ref = cache()
    rows["bf16"] = time_prefill(model.prefill, embs, pad, ref, iters)
    try:
        kv = cache()
        r = rows["bf16_compiled_blocks"] = time_prefill(bf16_compiled_prefill(model), embs, pad, kv, iters)
        r.update(kv_rel(kv, ref), speedup_vs_bf16=rows["bf16"]["p50_ms"] / r["p50_ms"])
    except Exception as e:
        rows["bf16_compiled_blocks"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    variants = {
        "fp8_dynamic": dict(),  # per-row scales, computed inside the RMSNorm and GeGLU kernels
        "fp8_dynamic_separate_quant": dict(fuse_producers=False),
        "fp8_dynamic_per_tensor_separate_quant": dict(dynamic="tensor", fuse_producers=False),
        "fp8_static": dict(calibration=[(embs, pad)]),
        "fp8_static_separate_quant": dict(calibration=[(embs, pad)], fuse_producers=False),
        "fp8_static_probe_decisions": dict(calibration=[(embs, pad)], decisions=decisions),
        "fp8_static_exact_accum": dict(calibration=[(embs, pad)], fast_accum=False),
        "fp8_static_per_channel": dict(calibration=[(embs, pad)], per_channel=True),
        "fp8_static_unfused_quant": dict(calibration=[(embs, pad)], fuse_quant=False),
        "fp8_static_mlp_only": dict(calibration=[(embs, pad)], decisions=mlp_only(model)),
        "fp8_static_compiled_blocks": dict(calibration=[(embs, pad)], compile_blocks=True),
        "fp8_static_compiled_blocks_probe_decisions": dict(calibration=[(embs, pad)], compile_blocks=True,
                                                           decisions=decisions),
    }
    for name, kw in variants.items():
        try:
            choice = build_fp8_prefill(model, **kw)
            kv = cache()
            rows[name] = time_prefill(choice.fn, embs, pad, kv, iters)
            rows[name].update(kv_rel(kv, ref))
            rows[name]["speedup_vs_bf16"] = rows["bf16"]["p50_ms"] / rows[name]["p50_ms"]
            rows[name]["summary"] = choice.fn.summary()
            del choice, kv
        except Exception as e:  # one failing variant must not hide the others
            rows[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder for the JSON files")
    p.add_argument("--preset", default="pi0")
    p.add_argument("--iters", type=int, default=50, help="timed iterations (prefill) and calls per probe graph")
    p.add_argument("--skip-verify", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_fp8_check: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    if not fp8_supported(dev):
        cc = torch.cuda.get_device_capability(dev)
        print(f"gpu_fp8_check: {torch.cuda.get_device_name(dev)} is sm_{cc[0]}{cc[1]}; FP8 needs >= 8.9",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    summary = {"gpu": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "preset": args.preset, "iters": args.iters}
    log(f"== {summary}")

    log(f"== building {args.preset} (random weights, seed 0, bf16)")
    model = build_model(preset=args.preset, device="cuda", seed=0)
    fp = weights_fingerprint(model.llm)
    log(f"   built in {time.perf_counter() - t0:.0f} s")

    log("== per-shape probe (ms per call, CUDA graph of --iters calls)")
    probe = probe_fp8_shapes(model, iters=args.iters)
    (out / "probe.json").write_text(json.dumps(probe, indent=2))
    log(f"{'linear':12s} {'MxKxN':>18s} {'bf16':>7s} {'fp8 dyn':>8s} {'fp8 st':>8s} {'gemm':>7s} {'st exact':>8s} "
        f"{'speedup':>7s}")
    for r in probe["shapes"]:
        log(f"{r['name']:12s} {r['m']:>5d}x{r['k']:>5d}x{r['n']:>5d} {r['bf16_ms']:7.4f} "
            f"{r['fp8_dynamic_fast_ms']:8.4f} {r['fp8_static_fast_ms']:8.4f} {r['fp8_gemm_only_fast_ms']:7.4f} "
            f"{r['fp8_static_exact_ms']:8.4f} {r['speedup_static_fast']:7.2f}x")

    log("== whole prefill, one CUDA graph each")
    prefill = prefill_section(model, args.iters, probe["decisions"])
    (out / "prefill.json").write_text(json.dumps(prefill, indent=2))
    for name, r in prefill.items():
        if "error" in r:
            log(f"{name:28s} ERROR {r['error']}")
        else:
            extra = (f" {r['speedup_vs_bf16']:.2f}x  K rel {r['k_rel_error']:.3%}  V rel {r['v_rel_error']:.3%}"
                     if "speedup_vs_bf16" in r else "")
            log(f"{name:28s} p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms{extra}")
    if weights_fingerprint(model.llm) != fp:
        log("ERROR: the bf16 model's weights changed while FP8 copies were built and run")
        summary["weights_changed"] = True
    summary["probe_decisions"] = probe["decisions"]
    summary["prefill"] = {k: {kk: v[kk] for kk in ("p50_ms", "speedup_vs_bf16", "k_rel_error", "v_rel_error")
                              if kk in v} for k, v in prefill.items()}
    del model
    torch.cuda.empty_cache()

    if not args.skip_verify:
        log("== verify --backend fp8 (dynamic scales), full pipeline, BF16 first")
        try:
            report = verify("fp8", RunnerSpec(preset=args.preset, device="cuda", progress=False), check_baseline=True)
            write_report(report, out / "verify.json")
            log(format_report(report))
            summary["verify"] = {k: report[k] for k in ("rel_error", "max_diff", "mean_diff", "passed",
                                                        "baseline_bit_identical")}
        except Exception as e:
            log(f"verify failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
            summary["verify"] = {"error": f"{type(e).__name__}: {e}"}
    summary["elapsed_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"== done in {summary['elapsed_s']} s; JSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
