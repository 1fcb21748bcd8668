"""Roofline of the four stages: the FLOPs and the fewest bytes each must move, their floor on a GPU, the achieved
fraction, and a projection for Jetson Thor.

Counts come from the configuration (matmul weights, attention products, each input read once and each output
written once), not from a profiler. The floor of a stage is max(FLOPs / peak FLOP/s, bytes / peak bandwidth).
The Thor column is a projection: Thor's floor divided by the fraction of its floor the stage reached on the
measured GPU. It is never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from pi_policy.model.config import PiConfig

# Jetson Thor (T5000), from NVIDIA's published figures: dense bf16 and fp8 tensor throughput, LPDDR5X bandwidth.
THOR = {"name": "Jetson Thor (published peaks)", "bf16_tflops": 258.0, "fp8_tflops": 517.0, "bandwidth_gbs": 273.0}


@dataclass
class StageCost:
    flops: float
    bytes: float
    fp8_flops: bool = False  # the stage's GEMMs run in FP8 (its FLOPs count against the FP8 peak)


def _gemma_layer_params(width: int, mlp: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(qkv weights, everything else) of one Gemma block's matmuls."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return width * (q + 2 * kv), q * width + 3 * width * mlp


def stage_costs(cfg: PiConfig, prefill_weight_bytes: float = 2.0, denoise_weight_bytes: float = 2.0,
                act_bytes: float = 2.0) -> dict[str, StageCost]:
    """FLOPs and bytes of each stage for one inference of `cfg` (its num_cameras views, batch 1)."""
    v, g, e = cfg.vision, cfg.llm, cfg.expert
    n, t = cfg.num_cameras, v.num_tokens
    # vision: patch embedding, the transformer blocks, the projector to the LLM width
    blk = 4 * v.width * v.width + 2 * v.width * v.mlp_dim
    w_vision = 3 * v.patch_size**2 * v.width + v.depth * blk + v.width * g.width
    vision = StageCost(2 * n * t * w_vision + v.depth * n * 4 * t * t * v.width,
                       act_bytes * w_vision + n * 3 * v.image_size**2 + act_bytes * n * t * g.width)
    # embed prefix: a gather of the prompt's embeddings and a concatenation
    p = cfg.prefix_len
    embed = StageCost(0.0, act_bytes * (2 * p * g.width + cfg.max_token_len * g.width))
    # prefill: every LLM layer over the prefix, the last one only up to its K/V
    qkv, rest = _gemma_layer_params(g.width, g.mlp_dim, g.num_heads, g.num_kv_heads, g.head_dim)
    w_llm = g.depth * qkv + (g.depth - 1) * rest
    attn = (g.depth - 1) * 4 * p * p * g.num_heads * g.head_dim
    kv_bytes = act_bytes * g.depth * 2 * p * g.num_kv_heads * g.head_dim
    prefill = StageCost(2 * p * w_llm + attn, prefill_weight_bytes * w_llm + act_bytes * p * g.width + kv_bytes,
                        fp8_flops=prefill_weight_bytes == 1.0)
    # denoise: every step runs the expert over the suffix, attending to the cached prefix and itself
    s = cfg.suffix_len
    qkv, rest = _gemma_layer_params(e.width, e.mlp_dim, e.num_heads, e.num_kv_heads, e.head_dim)
    w_expert = e.depth * (qkv + rest) + 2 * cfg.action_dim * e.width + 2 * e.width * e.width + (
        (2 * e.depth + 1) * e.width * 3 * e.width if cfg.pi05  # pi0.5's adaptive norms: scale, shift, gate
        else cfg.action_dim * e.width + e.width * e.width)
    step_flops = 2 * s * w_expert + e.depth * 4 * s * (p + s) * e.num_heads * e.head_dim
    step_bytes = denoise_weight_bytes * w_expert + kv_bytes
    denoise = StageCost(cfg.num_steps * step_flops, cfg.num_steps * step_bytes)
    return {"vision": vision, "embed_prefix": embed, "prefill": prefill, "denoise": denoise}


def floor_ms(cost: StageCost, tflops: float, bandwidth_gbs: float, fp8_tflops: float | None = None) -> float:
    peak = fp8_tflops if cost.fp8_flops and fp8_tflops else tflops
    return max(cost.flops / (peak * 1e12), cost.bytes / (bandwidth_gbs * 1e9)) * 1e3


def roofline(cfg: PiConfig, measured_ms: dict[str, float], peaks: dict, prefill_fp8: bool = False,
             denoise_fp8: bool = False) -> list[dict]:
    """One row per stage: counts, the floor on the measured GPU (peaks: bf16_tflops, bandwidth_gbs and
    optionally fp8_tflops), the achieved fraction of that floor, and the projected Thor time."""
    costs = stage_costs(cfg, 1.0 if prefill_fp8 else 2.0, 1.0 if denoise_fp8 else 2.0)
    rows = []
    for stage, c in costs.items():
        floor = floor_ms(c, peaks["bf16_tflops"], peaks["bandwidth_gbs"], peaks.get("fp8_tflops"))
        thor = floor_ms(c, THOR["bf16_tflops"], THOR["bandwidth_gbs"], THOR["fp8_tflops"])
        ms = measured_ms.get(stage)
        achieved = floor / ms if ms else None
        bound = "memory" if c.bytes / (peaks["bandwidth_gbs"] * 1e9) * 1e3 >= floor * 0.999 else "compute"
        rows.append({"stage": stage, "gflop": c.flops / 1e9, "mbytes": c.bytes / 1e6, "bound": bound,
                     "floor_ms": floor, "measured_ms": ms, "achieved": achieved, "thor_floor_ms": thor,
                     "thor_projected_ms": thor / achieved if achieved else None})
    return rows


def format_roofline(rows: list[dict], peaks: dict) -> str:
    lines = [f"roofline on {peaks.get('name', 'this GPU')}: {peaks['bf16_tflops']:.0f} TFLOP/s bf16, "
             f"{peaks['bandwidth_gbs']:.0f} GB/s ({peaks.get('source', 'given')}); Thor: "
             f"{THOR['bf16_tflops']:.0f} TFLOP/s bf16, {THOR['fp8_tflops']:.0f} fp8, {THOR['bandwidth_gbs']:.0f} GB/s "
             "(published). Thor ms = Thor floor / fraction achieved here: a PROJECTION, not a measurement.",
             "| Stage | GFLOP | MB moved | bound | floor ms | measured ms | achieved | Thor floor ms "
             "| Thor projected ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        meas = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.2f}"
        ach = "-" if r["achieved"] is None else f"{100 * r['achieved']:.0f}%"
        proj = "-" if r["thor_projected_ms"] is None else f"{r['thor_projected_ms']:.2f}"
        lines.append(f"| {r['stage']} | {r['gflop']:.1f} | {r['mbytes']:.1f} | {r['bound']} | {r['floor_ms']:.3f} | "
                     f"{meas} | {ach} | {r['thor_floor_ms']:.2f} | {proj} |")
    total = [sum(r[k] or 0.0 for r in rows) for k in ("floor_ms", "thor_floor_ms", "thor_projected_ms")]
    lines.append(f"| total | | | | {total[0]:.3f} | | | {total[1]:.2f} | {total[2]:.2f} |")
    return "\n".join(lines)


def measure_peaks(device) -> dict:
    """The two ceilings, measured once on this GPU: a large device-to-device copy (bytes read + written) and a
    large bf16 matrix product."""
    import torch

    from pi_policy.runtime.timer import time_graph

    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = time_graph(lambda: y.copy_(x), 20)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = time_graph(lambda: a @ b, 10)
    return {"name": torch.cuda.get_device_name(device), "source": "measured: 256 MiB copy, 8192^3 bf16 matmul",
            "bandwidth_gbs": 2 * x.numel() / (copy_ms * 1e-3) / 1e9, "bf16_tflops": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}
