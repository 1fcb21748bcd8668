"""Triton kernels for one denoise step of the action expert, with their launch wrappers.

The suffix is tiny (51 tokens) and the weights are large, so every GEMM here streams its weights once and is
parallel over output columns and, where the column count is small, over K (split-K, summed with fp32 atomics
into a zero-initialised or residual buffer). RMSNorm never gets its own pass: rms(x) is a per-row scalar, so
the kernel that reads x for a GEMM accumulates the sum of squares in the same loop and scales the rows of the
product (the (1 + w) factor is folded into the weights at start-up; pi0.5's (1 + scale) multiplies x on load and
its shift is a precomputed bias). Weights are bf16 or float8_e4m3fn with per-output-channel scales (W8A16:
converted to bf16 on load, scaled in the epilogue). All kernels run under TRITON_INTERPRET=1 for CPU tests.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl
from torch import Tensor

# Tile sizes per kernel role (bn/bk: output columns and K per tile; split: K splits; warps, stages).
TILES = {  # the best of sweeps on an H200 (scripts/gpu_expert_check.py --sweep), for bf16 and FP8 weights alike
    "qkv": dict(bn=128, bk=64, split=8, warps=4, stages=3),
    "wo": dict(bn=64, bk=128, split=8, warps=4, stages=3),
    "down": dict(bn=64, bk=128, split=16, warps=4, stages=3),
    "gate_up": dict(bn=32, bk=64, warps=4, stages=4),
    "out": dict(bm=16, bk=128, warps=4, stages=3),
    "attn": dict(bm=32, bn=64, bs=32, chunk=128, warps=8, stages=2, tokens=1),  # tokens: per combine program
}


# Triton's interpreter multiplies bf16 tiles as raw 16-bit integers (and truncates fp32 -> bf16): there the
# products run in fp32.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _mma(a, b, acc):
    """acc + a @ b with bf16 operands and fp32 accumulation."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)


@triton.jit
def _geglu(g, u):
    """gelu_tanh(g) * u; the tanh-approximate GELU 0.5 g (1 + tanh(z)) written as g * sigmoid(2 z)."""
    return g * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) * u


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _launch(t: dict) -> dict:
    return {"num_warps": t["warps"], "num_stages": t["stages"]}


# -- split-K linear: out[m, n] += sum_k a'[m, k] w[n, k] (* wscale[n]) (* gate[n]) ------------------------------
@triton.jit
def _linear_splitk(a_ptr, w_ptr, out_ptr, wscale_ptr, gate_ptr, mod_ptr, ss_ptr,
                   M, N, K, stride_am, stride_wn, stride_om, k_per_split,
                   A_NORM: tl.constexpr, HAS_MOD: tl.constexpr, HAS_WSCALE: tl.constexpr, HAS_GATE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for kk in range(0, k_per_split, BK):
        rk = pid_k * k_per_split + kk + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                    other=0.0)
        if A_NORM:  # a is the fp32 residual stream: this split's share of sum(x^2), then pi0.5's (1 + scale)
            a = a.to(tl.float32)
            ss += tl.sum(a * a, axis=1)
            if HAS_MOD:
                a = a * tl.load(mod_ptr + rk, mask=rk < K, other=0.0)[None, :]
        acc = _mma(a, tl.trans(w), acc)
    if HAS_WSCALE:
        acc = acc * tl.load(wscale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_GATE:
        acc = acc * tl.load(gate_ptr + rn, mask=rn < N, other=0.0)[None, :]
    # relaxed: kernel boundaries order these adds against every reader
    tl.atomic_add(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N),
                  sem="relaxed")
    if A_NORM:
        if pid_n == 0:
            tl.atomic_add(ss_ptr + rm, ss, mask=rm < M, sem="relaxed")


def linear_splitk(a: Tensor, w: Tensor, out: Tensor, *, wscale: Tensor | None = None, gate: Tensor | None = None,
                  mod: Tensor | None = None, ss: Tensor | None = None, tiles: dict | None = None) -> None:
    """out (M, N) fp32 += a' @ w.T (* wscale) (* gate). With `ss` given, `a` is the fp32 residual stream: each row's
    sum of squares is added into ss (M,) and `mod` (K,), if given, multiplies a's columns before the product."""
    t = tiles or TILES["qkv"]
    m, k = a.shape
    n = w.shape[0]
    bm, bn, bk = _pow2(min(m, 64)), min(t["bn"], _pow2(n)), min(t["bk"], _pow2(k))
    split = max(1, min(t.get("split", 1), triton.cdiv(k, bk)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk  # a multiple of bk, so splits never overlap
    split = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    dummy = out
    _linear_splitk[grid](a, w, out, wscale if wscale is not None else dummy, gate if gate is not None else dummy,
                         mod if mod is not None else dummy, ss if ss is not None else dummy,
                         m, n, k, a.stride(0), w.stride(0), out.stride(0), k_per_split,
                         A_NORM=ss is not None, HAS_MOD=mod is not None, HAS_WSCALE=wscale is not None,
                         HAS_GATE=gate is not None, BM=bm, BN=bn, BK=bk, **_launch(t))


# -- RMSNorm + gate/up projection + GeGLU: h = gelu(g) * u, the MLP's hidden activations ----------------------------
@triton.jit
def _norm_geglu(x_ptr, w_ptr, h_ptr, wscale_ptr, mod_ptr, bias_ptr,
                M, F, K, stride_xm, stride_wn, stride_hm, eps,
                HAS_MOD: tl.constexpr, HAS_WSCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)  # hidden columns: gate rows rn and up rows F + rn of the weight
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        ss += tl.sum(a * a, axis=1)
        if HAS_MOD:
            a = a * tl.load(mod_ptr + rk, mask=rk < K, other=0.0)[None, :]
        a = a.to(tl.bfloat16)
        wmask = (rn[:, None] < F) & (rk[None, :] < K)
        wg = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wmask, other=0.0)
        wu = tl.load(w_ptr + (F + rn[:, None]) * stride_wn + rk[None, :], mask=wmask, other=0.0)
        acc_g = _mma(a, tl.trans(wg), acc_g)
        acc_u = _mma(a, tl.trans(wu), acc_u)
    rs = 1.0 / tl.sqrt(ss / K + eps)
    g = acc_g * rs[:, None]
    u = acc_u * rs[:, None]
    if HAS_WSCALE:
        g = g * tl.load(wscale_ptr + rn, mask=rn < F, other=0.0)[None, :]
        u = u * tl.load(wscale_ptr + F + rn, mask=rn < F, other=0.0)[None, :]
    if HAS_BIAS:
        g = g + tl.load(bias_ptr + rn, mask=rn < F, other=0.0)[None, :]
        u = u + tl.load(bias_ptr + F + rn, mask=rn < F, other=0.0)[None, :]
    h = _geglu(g, u)
    tl.store(h_ptr + rm[:, None] * stride_hm + rn[None, :], h.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < F))


def norm_geglu(x: Tensor, w: Tensor, h: Tensor, eps: float, *, wscale: Tensor | None = None,
               mod: Tensor | None = None, bias: Tensor | None = None, tiles: dict | None = None) -> None:
    """h (M, F) = gelu_tanh(g) * u with [g, u] = rmsnorm(x) @ w.T (+ bias); w is (2F, K), gate rows first."""
    t = tiles or TILES["gate_up"]
    m, k = x.shape
    f = w.shape[0] // 2
    bm, bn, bk = _pow2(min(m, 64)), min(t["bn"], _pow2(f)), min(t["bk"], _pow2(k))
    dummy = h
    _norm_geglu[(triton.cdiv(f, bn), triton.cdiv(m, bm))](
        x, w, h, wscale if wscale is not None else dummy, mod if mod is not None else dummy,
        bias if bias is not None else dummy, m, f, k, x.stride(0), w.stride(0), h.stride(0), eps,
        HAS_MOD=mod is not None, HAS_WSCALE=wscale is not None, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, **_launch(t))


# -- final RMSNorm + action projection + Euler update: x_t += dt * v ------------------------------------------------
@triton.jit
def _action_out(x_ptr, w_ptr, bias_ptr, mod_ptr, xt_ptr, R, HZ, S, A, K, stride_xm, stride_wn, eps, dt,
                HAS_MOD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    _action_out_tile(tl.program_id(0), x_ptr, w_ptr, bias_ptr, mod_ptr, xt_ptr, R, HZ, S, A, K, stride_xm, stride_wn,
                     eps, dt, HAS_MOD, BM, BN, BK)


@triton.jit
def _action_out_tile(pid, x_ptr, w_ptr, bias_ptr, mod_ptr, xt_ptr, R, HZ, S, A, K, stride_xm, stride_wn, eps, dt,
                     HAS_MOD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Action rows pid * BM + [0, BM): the final norm, the action projection and the Euler update."""
    rr = pid * BM + tl.arange(0, BM)  # action rows, batch-major: (b, i) with i < HZ
    xrow = (rr // HZ) * S + (S - HZ) + rr % HZ  # the last HZ tokens of each batch's suffix are the actions
    rn = tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + xrow[:, None] * stride_xm + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                    other=0.0)
        ss += tl.sum(a * a, axis=1)
        if HAS_MOD:
            a = a * tl.load(mod_ptr + rk, mask=rk < K, other=0.0)[None, :]
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < A) & (rk[None, :] < K),
                    other=0.0)
        acc = _mma(a, tl.trans(w), acc)
    v = acc / tl.sqrt(ss / K + eps)[:, None] + tl.load(bias_ptr + rn, mask=rn < A, other=0.0)[None, :]
    ptrs = xt_ptr + rr[:, None] * A + rn[None, :]
    mask = (rr[:, None] < R) & (rn[None, :] < A)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + dt * v, mask=mask)


def action_out(x: Tensor, w: Tensor, bias: Tensor, xt: Tensor, eps: float, dt: float, *,
               mod: Tensor | None = None, tiles: dict | None = None) -> None:
    """xt (B, HZ, A) fp32 += dt * (rmsnorm(x) @ w.T + bias) over the last HZ rows of each batch's S rows of x."""
    t = tiles or TILES["out"]
    b, hz, a_dim = xt.shape
    s, k = x.shape[0] // b, x.shape[1]
    bm, bk = min(t["bm"], _pow2(b * hz)), min(t["bk"], _pow2(k))
    _action_out[(triton.cdiv(b * hz, bm),)](
        x, w, bias, mod if mod is not None else bias, xt, b * hz, hz, s, a_dim, k, x.stride(0), w.stride(0),
        eps, dt, HAS_MOD=mod is not None, BM=bm, BN=_pow2(a_dim), BK=bk, **_launch(t))


# -- attention of the suffix queries over [prefix cache, suffix], split over keys --------------------------------
@triton.jit
def _online_softmax(q, k, v, valid, m_i, l_i, acc, qk_scale):
    s = _mma(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), dtype=tl.float32)) * qk_scale  # log2 units
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _mma(p, v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _normed_rope(qkv_ptr, ss_ptr, bias_ptr, cos_ptr, sin_ptr, tok, ok, col, d, dr, sign, stride_qkv, K, eps,
                 HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, D: tl.constexpr):
    """Rows `tok` of the qkv accumulators at columns col + d: scaled by 1/rms, biased, rotated (RoPE), as bf16.
    col: one column offset, or one per row (a (rows, 1) block: the query rows of several heads)."""
    rs = 1.0 / tl.sqrt(tl.load(ss_ptr + tok, mask=ok, other=1.0) / K + eps)
    base = qkv_ptr + tok[:, None] * stride_qkv + col
    x = tl.load(base + d[None, :], mask=ok[:, None], other=0.0) * rs[:, None]
    if HAS_BIAS:
        x = x + tl.load(bias_ptr + col + d[None, :])
    if ROPE:  # Gemma's half-split rotation: x * cos + [-x2, x1] * sin
        xr = tl.load(base + dr[None, :], mask=ok[:, None], other=0.0) * rs[:, None]
        if HAS_BIAS:
            xr = xr + tl.load(bias_ptr + col + dr[None, :])
        cos = tl.load(cos_ptr + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        sin = tl.load(sin_ptr + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        x = x * cos + sign[None, :] * xr * sin
    return x.to(tl.bfloat16)


@triton.jit
def _attn_split(qkv_ptr, ss_ptr, bias_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pad_ptr, o_ptr, lse_ptr,
                B, S, P, H, KVH, n_state, chunk, n_prefix_splits, stride_qkv, stride_kb, stride_kh, stride_kp,
                stride_pad, K, eps, qk_scale,
                HAS_BIAS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
    _attn_split_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), qkv_ptr, ss_ptr, bias_ptr, cos_ptr,
                     sin_ptr, kc_ptr, vc_ptr, pad_ptr, o_ptr, lse_ptr, B, S, P, H, KVH, n_state, chunk,
                     n_prefix_splits, stride_qkv, stride_kb, stride_kh, stride_kp, stride_pad, K, eps, qk_scale,
                     HAS_BIAS, D, BM, BN, BS)


@triton.jit
def _attn_split_tile(pid_r, split, bh, qkv_ptr, ss_ptr, bias_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pad_ptr, o_ptr,
                     lse_ptr, B, S, P, H, KVH, n_state, chunk, n_prefix_splits, stride_qkv, stride_kb, stride_kh,
                     stride_kp, stride_pad, K, eps, qk_scale,
                     HAS_BIAS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
    """Query rows pid_r * BM + [0, BM) of batch and KV head bh against key split `split`: partial output and
    log-sum-exp. Splits [0, n_prefix_splits) take `chunk` cached prefix keys each, then one split per BS suffix keys."""
    b, kvh = bh // KVH, bh % KVH
    G = H // KVH
    r = pid_r * BM + tl.arange(0, BM)  # query rows: (token m, head h of this KV group) folded
    row_ok = r < S * G
    m = r // G
    h = kvh * G + r % G
    d = tl.arange(0, D)
    dr = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    # q: each row's own head columns h * D + d
    q = _normed_rope(qkv_ptr, ss_ptr, bias_ptr, cos_ptr, sin_ptr, b * S + m, row_ok, h[:, None] * D, d, dr, sign,
                     stride_qkv, K, eps, HAS_BIAS, True, D)

    m_i = tl.full((BM,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    if split < n_prefix_splits:  # a chunk of the cached prefix: keys already normed and rotated
        kbase = kc_ptr + b * stride_kb + kvh * stride_kh
        vbase = vc_ptr + b * stride_kb + kvh * stride_kh
        for j0 in range(split * chunk, split * chunk + chunk, BN):
            j = j0 + tl.arange(0, BN)
            jok = j < P
            valid = jok & (tl.load(pad_ptr + b * stride_pad + j, mask=jok, other=0) != 0)
            k = tl.load(kbase + j[:, None] * stride_kp + d[None, :], mask=jok[:, None], other=0.0)
            v = tl.load(vbase + j[:, None] * stride_kp + d[None, :], mask=jok[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax(q, k.to(tl.bfloat16), v.to(tl.bfloat16), valid[None, :], m_i, l_i,
                                            acc, qk_scale)
    else:  # a block of the suffix, block-causal: the state token(s) see only the state, actions see all
        j = (split - n_prefix_splits) * BS + tl.arange(0, BS)
        jok = j < S
        k = _normed_rope(qkv_ptr, ss_ptr, bias_ptr, cos_ptr, sin_ptr, b * S + j, jok, H * D + kvh * D, d, dr,
                         sign, stride_qkv, K, eps, HAS_BIAS, True, D)
        v = _normed_rope(qkv_ptr, ss_ptr, bias_ptr, cos_ptr, sin_ptr, b * S + j, jok,
                         H * D + KVH * D + kvh * D, d, dr, sign, stride_qkv, K, eps, HAS_BIAS, False, D)
        valid = jok[None, :] & ((j[None, :] < n_state) | (m[:, None] >= n_state))
        m_i, l_i, acc = _online_softmax(q, k, v, valid, m_i, l_i, acc, qk_scale)
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    idx = split * B * S * H + (b * S + m) * H + h  # partials laid out (split, B * S * H, D)
    tl.store(o_ptr + idx[:, None] * D + d[None, :], o, mask=row_ok[:, None])
    tl.store(lse_ptr + idx, lse, mask=row_ok)


@triton.jit
def _attn_combine(o_ptr, lse_ptr, out_ptr, acc_ptr, ss_ptr, R, BS, H, n_acc, stride_out, stride_acc,
                  NS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BZ: tl.constexpr):
    _combine_tile(tl.program_id(0), o_ptr, lse_ptr, out_ptr, acc_ptr, ss_ptr, R, BS, H, n_acc, stride_out, stride_acc,
                  NS, D, BT, BH, BZ)


@triton.jit
def _combine_tile(pid, o_ptr, lse_ptr, out_ptr, acc_ptr, ss_ptr, R, BS, H, n_acc, stride_out, stride_acc,
                  NS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BZ: tl.constexpr):
    """Tokens pid * BT + [0, BT), each with its H heads (rows r = token * H + head of the (split, row, D)
    partials): the splits merged by their log-sum-exp, then the tokens' qkv accumulators and sums of squares
    cleared. The split loops are unrolled (NS is a constant) so that every split's loads are in flight at once."""
    t = pid * BT + tl.arange(0, BT)
    hh = tl.arange(0, BH)
    r = t[:, None] * H + hh[None, :]
    rok = (t[:, None] < BS) & (hh[None, :] < H)
    d = tl.arange(0, D)
    mx = tl.full((BT, BH), float("-inf"), dtype=tl.float32)
    for s in tl.static_range(NS):
        mx = tl.maximum(mx, tl.load(lse_ptr + s * R + r, mask=rok, other=float("-inf")))
    mx = tl.where(rok, mx, 0.0)
    num = tl.zeros((BT, BH, D), dtype=tl.float32)
    den = tl.zeros((BT, BH), dtype=tl.float32)
    for s in tl.static_range(NS):
        w = tl.exp2(tl.load(lse_ptr + s * R + r, mask=rok, other=float("-inf")) - mx)
        num += w[:, :, None] * tl.load(o_ptr + (s * R + r)[:, :, None] * D + d[None, None, :],
                                       mask=rok[:, :, None], other=0.0)
        den += w
    out = num / tl.where(rok, den, 1.0)[:, :, None]
    tl.store(out_ptr + t[:, None, None] * stride_out + hh[None, :, None] * D + d[None, None, :],
             out.to(out_ptr.dtype.element_ty), mask=rok[:, :, None])
    # attention was the last reader of these tokens' qkv accumulators: clear them for the next layer
    tok = t < BS
    for c in range(0, n_acc, BZ):
        cc = c + tl.arange(0, BZ)
        tl.store(acc_ptr + t[:, None] * stride_acc + cc[None, :], tl.zeros((BT, BZ), dtype=tl.float32),
                 mask=tok[:, None] & (cc[None, :] < n_acc))
    tl.store(ss_ptr + t, tl.zeros((BT,), dtype=tl.float32), mask=tok)


def attention(qkv: Tensor, ss: Tensor, k_cache: Tensor, v_cache: Tensor, pad: Tensor, cos: Tensor, sin: Tensor,
              out: Tensor, *, num_heads: int, n_state: int, norm_dim: int, eps: float, bias: Tensor | None = None,
              tiles: dict | None = None) -> None:
    """Attention of the suffix queries over [valid prefix keys, block-causal suffix keys], into out (B*S, H*D) bf16.

    qkv (B*S, (H + 2 KVH) D) fp32 holds the un-normalised q, k, v products and ss (B*S,) their rows' sums of
    squares (from linear_splitk); both are zeroed here once read. k/v_cache (B, KVH, P, D) with RoPE applied,
    pad (B, P) int8 (1 = valid key), cos/sin (B*S, D) fp32 for the suffix positions.
    """
    t = tiles or TILES["attn"]
    b, kvh, p, d = k_cache.shape
    s = qkv.shape[0] // b
    g = num_heads // kvh
    bm, bn = min(t["bm"], _pow2(s * g)), min(t["bn"], _pow2(max(p, s)))
    chunk = max(bn, t["chunk"] // bn * bn)
    bs = min(t["bs"], _pow2(s))
    n_prefix = triton.cdiv(p, chunk)
    splits = n_prefix + triton.cdiv(s, bs)
    o = qkv.new_empty((splits, b * s * num_heads, d))
    lse = qkv.new_empty((splits, b * s * num_heads))
    assert k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
    _attn_split[(triton.cdiv(s * g, bm), splits, b * kvh)](
        qkv, ss, bias if bias is not None else qkv, cos, sin, k_cache, v_cache, pad, o, lse,
        b, s, p, num_heads, kvh, n_state, chunk, n_prefix, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), pad.stride(0), norm_dim, eps, d**-0.5 * math.log2(math.e),
        HAS_BIAS=bias is not None, D=d, BM=bm, BN=bn, BS=bs, **_launch(t))
    bt = min(t.get("tokens", 1), triton.next_power_of_2(b * s))
    _attn_combine[(triton.cdiv(b * s, bt),)](
        o, lse, out, qkv, ss, b * s * num_heads, b * s, num_heads, qkv.shape[1], out.stride(0), qkv.stride(0),
        NS=splits, D=d, BT=bt, BH=triton.next_power_of_2(num_heads), BZ=max(16, 1024 // bt),
        num_warps=4)
