"""GPU probe: is FP8 faster than BF16 for each LLM linear shape on this card? Feeds build_fp8_prefill's decisions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pi_policy.model.pi0 import PiModel
from pi_policy.runtime.prefill.fp8 import QUANTIZED, shape_key
from pi_policy.runtime.prefill.fp8_linear import FP8Linear, fp8_scale, fp8_supported, get_module, quantize_fp8
from pi_policy.runtime.timer import time_graph


@torch.no_grad()
def probe_fp8_shapes(model: PiModel, m: int | None = None, iters: int = 50) -> dict:
    """Time each LLM linear shape in bf16 and FP8 (static and dynamic scales, fast accumulation on and off).

    Returns {"shapes": [per-shape timings], "decisions": {"MxKxN": use_fp8}}; FP8 wins a shape when its
    static-scale time, quantization included, beats bf16. Needs a CUDA GPU with FP8 (sm_89+).
    """
    device = next(model.parameters()).device
    if not fp8_supported(device):
        raise RuntimeError(f"probe_fp8_shapes needs a CUDA GPU with compute capability >= 8.9; model is on {device}")
    m = m or model.cfg.prefix_len
    gen = torch.Generator(device=device).manual_seed(0)
    rows, decisions = [], {}
    blk = model.llm.layers[0]
    for name in QUANTIZED:
        lin = get_module(blk, name)
        k, n = lin.in_features, lin.out_features
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
        w = lin.weight.to(torch.bfloat16)
        row = {"name": name, "m": m, "k": k, "n": n, "bf16_ms": time_graph(lambda x=x, w=w: F.linear(x, w), iters)}
        for fast in (True, False):
            q = FP8Linear(lin, kernel="scaled_mm", fast_accum=fast)
            tag = "fast" if fast else "exact"
            row[f"fp8_dynamic_{tag}_ms"] = time_graph(lambda q=q, x=x: q(x), iters)
            q.act_scale = fp8_scale(x.abs().amax())
            row[f"fp8_static_{tag}_ms"] = time_graph(lambda q=q, x=x: q(x), iters)
            xq = quantize_fp8(x, q.act_scale)
            row[f"fp8_gemm_only_{tag}_ms"] = time_graph(
                lambda q=q, xq=xq: torch._scaled_mm(xq, q.weight.t(), scale_a=q.act_scale, scale_b=q.weight_scale,
                                                    out_dtype=torch.bfloat16, use_fast_accum=q.fast_accum), iters)
        row["speedup_static_fast"] = row["bf16_ms"] / row["fp8_static_fast_ms"]
        row["fp8_wins"] = row["fp8_static_fast_ms"] < row["bf16_ms"]
        decisions[shape_key(m, k, n)] = row["fp8_wins"]
        rows.append(row)
    return {"device": torch.cuda.get_device_name(device), "iters": iters, "shapes": rows, "decisions": decisions}
