"""GPU check of the fused action expert at full size (pi0, pi05): accuracy against the PyTorch denoise with the
same weights, prefix cache and noise, and denoise time (CUDA-graph replay of the whole loop, median of events)
for the PyTorch path (eager and torch.compile'd), the fused expert with bf16 weights and with FP8 weights.

Usage: python scripts/gpu_expert_check.py OUT_DIR [--presets pi0,pi05] [--sweep] [--compile] [--iters 30]
Writes OUT_DIR/expert_check.json (rewritten after every section) and prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi_policy.runtime.expert import kernels  # noqa: E402
from pi_policy.runtime.expert.fused import FusedExpert  # noqa: E402
from pi_policy.runtime.factory import build_model  # noqa: E402
from pi_policy.runtime.stats import action_accuracy  # noqa: E402
from pi_policy.runtime.timer import graph_replay_times  # noqa: E402

RESULTS: dict = {}
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1 and a tiny preset) smoke-tests this script


def save(out: Path) -> None:
    (out / "expert_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def graph_ms(fn, iters: int) -> float:
    """Median ms of one CUDA-graph replay of fn."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    times = graph_replay_times(fn, iters, warmup=2)
    return statistics.median(times)


def prefix(model, missing_camera: bool, seed: int = 0):
    """A realistic prefix cache: random images through the vision tower, a 20-token prompt, the real prefill."""
    cfg = model.cfg
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.rand(1, cfg.num_cameras, 3, s, s, generator=gen, device=DEVICE) * 2 - 1
    masks = torch.ones(1, cfg.num_cameras, dtype=torch.bool, device=DEVICE)
    if missing_camera:
        masks[0, 1] = False
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_token_len), generator=gen, device=DEVICE)
    tmask = torch.arange(cfg.max_token_len, device=DEVICE)[None] < 20
    with torch.no_grad():
        embs, pad = model.embed_prefix(model.embed_images(images), masks, tokens, tmask)
        cache = model.prefill(embs, pad)
    state = torch.randn(1, cfg.action_dim, generator=gen, device=DEVICE) * 0.5
    noise = torch.randn(1, cfg.horizon, cfg.action_dim, generator=gen, device=DEVICE)
    return cache, pad, state, noise


def acc(a: torch.Tensor, b: torch.Tensor) -> dict:
    r = action_accuracy(a[0].cpu().numpy(), b[0].cpu().numpy())
    return {k: r[k] for k in ("relative_error", "max_diff", "mean_diff", "cosine") if k in r}


def accuracy(model, experts: dict, cases=("all_cameras", "missing_camera"), fp32: bool = True) -> dict:
    """Each fused expert against the PyTorch bf16 denoise (and a float32 copy of the model) on the same inputs."""
    ref32 = copy.deepcopy(model).float() if fp32 else None
    out = {}
    for case in cases:
        cache, pad, state, noise = prefix(model, case == "missing_camera")
        with torch.no_grad():
            base = model.denoise(cache, pad, state, noise)
            r = {}
            if ref32 is not None:
                truth = ref32.denoise(tuple(c.float() for c in cache), pad, state, noise)
                r["bf16_torch_vs_fp32"] = acc(base, truth)
            for w, fe in experts.items():
                got = fe.denoise(cache, pad, state, noise)
                r[f"{w}_fused_vs_bf16_torch"] = acc(got, base)
                if ref32 is not None:
                    r[f"{w}_fused_vs_fp32"] = acc(got, truth)
                r[f"{w}_finite"] = bool(torch.isfinite(got).all())
        out[case] = r
    del ref32
    torch.cuda.empty_cache()
    return out


def check_preset(preset: str, args, out: Path) -> None:
    res = RESULTS.setdefault(preset, {})
    t0 = time.perf_counter()
    model = build_model(preset=preset, device=DEVICE, seed=0)
    if args.steps:
        model.cfg = dataclasses.replace(model.cfg, num_steps=args.steps)
    res["build_s"] = time.perf_counter() - t0
    experts = {w: FusedExpert(model, w) for w in ("bf16", "fp8")}
    res |= accuracy(model, experts)
    print(preset, "accuracy", json.dumps({k: res[k] for k in ("all_cameras", "missing_camera")}), flush=True)
    save(out)
    pi05 = model.cfg.pi05
    if not pi05:  # which matrices cost FP8 the most accuracy
        keep = {f"fp8_keep_{'+'.join(k)}": FusedExpert(model, "fp8", k)
                for k in (("qkv",), ("wo",), ("gate_up",), ("down",), ("qkv", "wo"))}
        res["fp8_keep_bf16"] = accuracy(model, keep, ("all_cameras",), fp32=False)["all_cameras"]
        print(preset, "fp8 keep", json.dumps(res["fp8_keep_bf16"]), flush=True)
        save(out)
    if pi05:  # random init leaves pi0.5's gates ~0, so its layers barely matter: open them
        w = model.cfg.expert.width
        with torch.no_grad():
            for m in model.expert.modules():
                if getattr(m, "dense", None) is not None:
                    m.dense.bias[2 * w:] = 1.0
                    m.dense.bias[:w] = 0.1
        gated = {w: FusedExpert(model, w) for w in ("bf16", "fp8")}
        res["gates_open"] = accuracy(model, gated, ("all_cameras",))["all_cameras"]
        print(preset, "gates open", json.dumps(res["gates_open"]), flush=True)
        save(out)

    cache, pad, state, noise = prefix(model, False)
    dst = torch.empty_like(noise)
    timing = res.setdefault("denoise_ms", {})

    def fused_ms(fe):
        return graph_ms(lambda: dst.copy_(fe.denoise(cache, pad, state, noise)), args.iters)

    with torch.no_grad():
        timing["torch_eager_graph"] = graph_ms(lambda: dst.copy_(model.denoise(cache, pad, state, noise)), args.iters)
        for w, fe in experts.items():
            timing[f"fused_{w}"] = fused_ms(fe)
    print(preset, "denoise ms", json.dumps(timing), flush=True)
    save(out)
    if args.sweep and not pi05:
        res["sweep"] = sweep(experts, cache, pad, state, args.iters)
        save(out)
        with torch.no_grad():
            for w, fe in experts.items():
                timing[f"fused_{w}_tuned"] = fused_ms(fe)
            timing["fused_fp8_keep_qkv_tuned"] = fused_ms(FusedExpert(model, "fp8", ("qkv",)))
        print(preset, "tuned denoise ms", json.dumps(timing), flush=True)
        save(out)
    elif args.sweep:
        with torch.no_grad():
            for w, fe in experts.items():
                timing[f"fused_{w}_tuned"] = fused_ms(fe)
    if args.breakdown:
        for w, fe in experts.items():
            res[f"kernel_us_{w}"] = breakdown(fe, cache, pad, state, args.iters)
            print(preset, w, "kernel us per launch", json.dumps(res[f"kernel_us_{w}"]), flush=True)
            save(out)
    if args.compile and preset in args.compile.split(","):
        t0 = time.perf_counter()
        vel = torch.compile(model.velocity, dynamic=False)
        with torch.no_grad():
            model.denoise(cache, pad, state, noise, velocity=vel)
            res["compile_s"] = time.perf_counter() - t0
            timing["torch_compiled_graph"] = graph_ms(
                lambda: dst.copy_(model.denoise(cache, pad, state, noise, velocity=vel)), args.iters)
            res["compiled_vs_eager_torch"] = acc(model.denoise(cache, pad, state, noise, velocity=vel),
                                                 model.denoise(cache, pad, state, noise))
            res["fused_vs_compiled_torch"] = {w: acc(fe.denoise(cache, pad, state, noise),
                                                     model.denoise(cache, pad, state, noise, velocity=vel))
                                              for w, fe in experts.items()}
        print(preset, "denoise ms", json.dumps(timing), json.dumps(res["fused_vs_compiled_torch"]), flush=True)
        save(out)


def layer_inputs(fe: FusedExpert, cache, pad, state):
    cfg, e = fe.cfg, fe.cfg.expert
    s = cfg.suffix_len
    x = torch.randn(s, e.width, device=DEVICE)
    bufs = {"x": x, "qkv": torch.zeros(s, (e.num_heads + 2 * e.num_kv_heads) * e.head_dim, device=DEVICE),
            "ss": torch.zeros(s, device=DEVICE),
            "attn": torch.randn(s, e.num_heads * e.head_dim, device=DEVICE).bfloat16(),
            "h": torch.randn(s, e.mlp_dim, device=DEVICE).bfloat16()}
    _, pad8, cos, sin = fe._context(pad, state)
    return bufs, pad8, cos, sin


def launches(fe: FusedExpert, role: str, cache, bufs, pad8, cos, sin, tiles=None):
    """One launch of a kernel role per layer, on that layer's weights (so nothing stays in L2)."""
    e, tab = fe.cfg.expert, fe.schedule(fe.cfg.num_steps)
    tiles = tiles or (kernels.TILES["attn"] if role == "attn" else kernels.TILES[role])
    ad = fe.cfg.pi05
    x, qkv, ss, attn, h = (bufs[k] for k in ("x", "qkv", "ss", "attn", "h"))

    def run():
        for i, lw in enumerate(fe.layers):
            if role == "qkv":
                kernels.linear_splitk(x, lw["qkv"][0], qkv, wscale=lw["qkv"][1], ss=ss,
                                      mod=tab["mod_attn"][0, i] if ad else None, tiles=tiles)
            elif role == "attn":
                ss.fill_(float(e.width))  # keep rms finite: attention zeroes ss after reading
                kernels.attention(qkv, ss, cache[0][i], cache[1][i], pad8, cos, sin, attn, num_heads=e.num_heads,
                                  n_state=fe.cfg.suffix_len - fe.cfg.horizon, norm_dim=e.width, eps=e.eps,
                                  bias=tab["bias_qkv"][0, i] if ad else None, tiles=tiles)
            elif role == "wo":
                kernels.linear_splitk(attn, lw["wo"][0], x, wscale=lw["wo"][1], tiles=tiles)
            elif role == "gate_up":
                kernels.norm_geglu(x, lw["gate_up"][0], h, e.eps, wscale=lw["gate_up"][1], tiles=tiles)
            elif role == "down":
                kernels.linear_splitk(h, lw["down"][0], x, wscale=lw["down"][1], tiles=tiles)
    return run


def breakdown(fe: FusedExpert, cache, pad, state, iters: int) -> dict:
    bufs, pad8, cos, sin = layer_inputs(fe, cache, pad, state)
    n = len(fe.layers)
    return {role: 1e3 * graph_ms(launches(fe, role, cache, bufs, pad8, cos, sin), iters) / n
            for role in ("qkv", "attn", "wo", "gate_up", "down")}


CANDIDATES = {  # per role: tiles around the defaults in kernels.TILES (measured on an H200 in the first run)
    "qkv": [dict(bn=128, bk=64, split=8, warps=4, stages=3), dict(bn=128, bk=128, split=8, warps=4, stages=2),
            dict(bn=64, bk=64, split=8, warps=4, stages=2), dict(bn=128, bk=64, split=16, warps=4, stages=2)],
    "wo": [dict(bn=64, bk=128, split=8, warps=4, stages=3), dict(bn=64, bk=128, split=16, warps=4, stages=2),
           dict(bn=128, bk=128, split=8, warps=4, stages=2), dict(bn=64, bk=256, split=8, warps=4, stages=2)],
    "down": [dict(bn=64, bk=128, split=16, warps=4, stages=3), dict(bn=128, bk=128, split=16, warps=4, stages=2),
             dict(bn=64, bk=256, split=16, warps=4, stages=2), dict(bn=128, bk=256, split=16, warps=4, stages=2)],
    "gate_up": [dict(bn=64, bk=64, warps=4, stages=3), dict(bn=32, bk=64, warps=4, stages=4),
                dict(bn=32, bk=128, warps=4, stages=3), dict(bn=64, bk=128, warps=8, stages=3)],
    "attn": [dict(bm=32, bn=64, bs=16, chunk=128, warps=8, stages=2), dict(bm=32, bn=64, bs=16, chunk=256, warps=8,
                                                                         stages=2),
             dict(bm=16, bn=64, bs=16, chunk=128, warps=4, stages=2), dict(bm=32, bn=64, bs=32, chunk=128, warps=8,
                                                                         stages=2),
             dict(bm=32, bn=64, bs=16, chunk=128, warps=8, stages=2, tokens=2)],
}


def sweep(experts: dict, cache, pad, state, iters: int) -> dict:
    """Tiles per kernel role, timed on bf16 and on fp8 weights; the best of each goes into kernels.TILES."""
    report = {}
    for role, cands in CANDIDATES.items():
        rows = []
        for cand in cands:
            tiles = dict(kernels.TILES[role]) | cand
            row = {"tiles": cand}
            for w, fe in experts.items():
                if role == "attn" and w == "fp8":
                    continue
                try:
                    bufs, pad8, cos, sin = layer_inputs(fe, cache, pad, state)
                    row[w] = round(1e3 * graph_ms(launches(fe, role, cache, bufs, pad8, cos, sin, tiles),
                                                  iters) / len(fe.layers), 2)
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is one row of the report
                    row[w] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
        print("sweep", role, json.dumps(rows), flush=True)
        for w in ("bf16",) if role == "attn" else ("bf16", "fp8"):
            ok = [r for r in rows if isinstance(r.get(w), float)]
            if ok:
                best = dict(kernels.TILES[role]) | min(ok, key=lambda r: r[w])["tiles"]
                kernels.TILES[role if w == "bf16" else f"{role}_fp8"] = best
        report[role] = rows
    report["chosen"] = {k: v for k, v in kernels.TILES.items()}
    print("chosen tiles", json.dumps(report["chosen"]), flush=True)
    return report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--presets", default="pi0,pi05")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--compile", default="", help="presets whose PyTorch denoise is also timed compiled")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=0, help="denoise steps (default: the preset's)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    RESULTS["machine"] = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                          "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(RESULTS["machine"]), flush=True)
    for preset in args.presets.split(","):
        try:
            check_preset(preset, args, args.out)
        except Exception:  # noqa: BLE001 - report and go on to the next preset
            RESULTS.setdefault(preset, {})["error"] = traceback.format_exc()
            print(traceback.format_exc(), flush=True)
        save(args.out)
        torch.cuda.empty_cache()
    RESULTS["tiles"] = kernels.TILES
    save(args.out)
    print("\n| preset | torch eager graph | torch compiled | fused bf16 | fused fp8 | bf16 rel err / cos "
          "| fp8 rel err / cos |")
    for preset in args.presets.split(","):
        r = RESULTS.get(preset, {})
        t = r.get("denoise_ms", {})
        a = r.get("all_cameras", {})
        b16, f8 = a.get("bf16_fused_vs_bf16_torch", {}), a.get("fp8_fused_vs_bf16_torch", {})
        print(f"| {preset} | {t.get('torch_eager_graph', np.nan):.3f} | {t.get('torch_compiled_graph', np.nan):.3f} "
              f"| {t.get('fused_bf16_tuned', t.get('fused_bf16', np.nan)):.3f} "
              f"| {t.get('fused_fp8_tuned', t.get('fused_fp8', np.nan)):.3f} "
              f"| {b16.get('relative_error', np.nan):.5f} / {b16.get('cosine', np.nan):.6f} "
              f"| {f8.get('relative_error', np.nan):.5f} / {f8.get('cosine', np.nan):.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
