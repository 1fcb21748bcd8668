"""The persistent action expert: one Triton kernel that runs a whole denoise loop from a task list.

Each program takes a task number from an atomic ticket, reads the task's row (tasks.FIELDS), loads the first
K-chunk of the task's weights, and only then waits for the stage before it (a counter in global memory reaching
that stage's task count, read with acquire semantics); it claims its next ticket, computes, and releases its own
stage's counter. Weights never depend on the wait, so each program's next weight read is in flight while the
previous stage drains. The tile math is the fused kernels' (kernels.py: the attention split, the combine, the
action output, the GeGLU and the bf16/FP8 matrix product are the same device functions); RMSNorm is folded the
same way (sums of squares gathered by the GEMM that reads the residual, Gemma's (1 + w) in the weights, pi0.5's
scale, shift and gate from the precomputed step tables). Residual x and the qkv accumulators are float32;
split-K products are added with float32 atomics; the combine clears the qkv accumulators for the next layer.

Task kinds (tasks.KINDS): action_in (pi0.5: x = x_t W_in^T + b; pi0: u = silu(x_t W^T + c_k) with action_in
folded into the time MLP's first layer), time_out (pi0: x = u W^T + b, and the state token), qkv, attn,
combine, wo, gate_up, down, out (final norm, action projection, x_t += dt v).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from pi_policy.runtime.expert.kernels import _action_out_tile, _attn_split_tile, _combine_tile, _geglu, _mma
from pi_policy.runtime.expert.tasks import KINDS, Geometry, Plan, pow2

K_ACTION_IN = tl.constexpr(KINDS.index("action_in"))
K_TIME_OUT = tl.constexpr(KINDS.index("time_out"))
K_QKV = tl.constexpr(KINDS.index("qkv"))
K_ATTN = tl.constexpr(KINDS.index("attn"))
K_COMBINE = tl.constexpr(KINDS.index("combine"))
K_WO = tl.constexpr(KINDS.index("wo"))
K_GATE_UP = tl.constexpr(KINDS.index("gate_up"))
K_DOWN = tl.constexpr(KINDS.index("down"))
K_OUT = tl.constexpr(KINDS.index("out"))


@triton.jit
def _wait_then_claim(counters, sizes, wait, ticket):
    """Spin until counter `wait` (if any) reaches its stage's task count, then take the next ticket."""
    if wait >= 0:
        target = tl.load(sizes + wait)
        while tl.atomic_add(counters + wait, 0, sem="acquire", scope="gpu") < target:
            pass
    return tl.atomic_add(ticket, 1, sem="relaxed", scope="gpu")


@triton.jit
def _release(counters, done):
    tl.debug_barrier()  # every thread's stores and atomics of this task precede the release
    tl.atomic_add(counters + done, 1, sem="release", scope="gpu")


@triton.jit
def _w_chunk(w_ptr, rn, N, k0, k_hi, stride_w, BK: tl.constexpr):
    """Weight rows rn, columns [k0, k0 + BK) below k_hi: streamed once, so evicted first."""
    rk = k0 + tl.arange(0, BK)
    return tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < k_hi),
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _a_chunk(a_ptr, stride_a, rows, row_ok, k0, k_hi, mod_ptr, A_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
             BK: tl.constexpr):
    """Activation rows, columns [k0, k0 + BK): with A_NORM (the fp32 residual) also their sum of squares, and
    pi0.5's (1 + scale) applied. Read through L2 (.cg): other programs wrote them in this launch."""
    rk = k0 + tl.arange(0, BK)
    a = tl.load(a_ptr + rows[:, None] * stride_a + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < k_hi),
                other=0.0, cache_modifier=".cg")
    ss = tl.zeros((a.shape[0],), dtype=tl.float32)
    if A_NORM:
        a = a.to(tl.float32)
        ss = tl.sum(a * a, axis=1)
        if HAS_MOD:
            a = a * tl.load(mod_ptr + rk, mask=rk < k_hi, other=0.0)[None, :]
    return a, ss


@triton.jit
def _gemm(a_ptr, stride_a, rows, row_ok, w_ptr, stride_w, rn, N, k_lo, k_hi, w0, mod_ptr,
          A_NORM: tl.constexpr, HAS_MOD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(a' @ w.T over K in [k_lo, k_hi), the rows' sum of squares over that range); w0, the first weight chunk,
    was loaded by the caller before it waited."""
    a, ss = _a_chunk(a_ptr, stride_a, rows, row_ok, k_lo, k_hi, mod_ptr, A_NORM, HAS_MOD, BK)
    acc = _mma(a, tl.trans(w0), tl.zeros((BM, BN), dtype=tl.float32))
    for k0 in range(k_lo + BK, k_hi, BK):
        a, s = _a_chunk(a_ptr, stride_a, rows, row_ok, k0, k_hi, mod_ptr, A_NORM, HAS_MOD, BK)
        acc = _mma(a, tl.trans(_w_chunk(w_ptr, rn, N, k0, k_hi, stride_w, BK)), acc)
        ss += s
    return acc, ss


@triton.jit
def _gemm_pair(a_ptr, stride_a, rows, row_ok, w_ptr, stride_w, rn, N, off, K, w0, v0, mod_ptr,
               HAS_MOD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The gate and up products of the fp32 residual rows (weight rows rn and off + rn), whole K, with the rows'
    sum of squares; w0 and v0 are their first chunks."""
    a, ss = _a_chunk(a_ptr, stride_a, rows, row_ok, 0, K, mod_ptr, True, HAS_MOD, BK)
    acc_g = _mma(a, tl.trans(w0), tl.zeros((BM, BN), dtype=tl.float32))
    acc_u = _mma(a, tl.trans(v0), tl.zeros((BM, BN), dtype=tl.float32))
    for k0 in range(BK, K, BK):
        a, s = _a_chunk(a_ptr, stride_a, rows, row_ok, k0, K, mod_ptr, True, HAS_MOD, BK)
        acc_g = _mma(a, tl.trans(_w_chunk(w_ptr, rn, N, k0, K, stride_w, BK)), acc_g)
        acc_u = _mma(a, tl.trans(_w_chunk(w_ptr + off * stride_w, rn, N, k0, K, stride_w, BK)), acc_u)
        ss += s
    return acc_g, acc_u, ss


@triton.jit
def _scale_cols(acc, ptr, rn, N, ON: tl.constexpr):
    if ON:
        acc = acc * tl.load(ptr + rn, mask=rn < N, other=0.0)[None, :]
    return acc


@triton.jit
def _persistent_expert(
        tasks, counters, sizes, ticket, n_tasks,
        xt_ptr, state_ptr, kc_ptr, vc_ptr, pad_ptr, cos_ptr, sin_ptr,
        wqkv, sqkv, wo, so, wgu, sgu, wdn, sdn, w_in, in_bias, w_to, b_to, w_out, out_bias, out_bias_step,
        mod_attn, bias_qkv, gate_attn, mod_mlp, bias_gu, gate_mlp, mod_out,
        x_ptr, u_ptr, qkv_ptr, ss_ptr, o_ptr, lse_ptr, attn_ptr, h_ptr,
        B, S, HZ, A, W, NQKV, F, P, H, KVH, L, n_state, n_prefix_splits, chunk,
        stride_kl, stride_kb, stride_kh, stride_kp, stride_pad, eps, qk_scale, dt, kps_qkv, kps_wo, kps_down,
        ADAPTIVE: tl.constexpr, FP8_QKV: tl.constexpr, FP8_WO: tl.constexpr, FP8_GU: tl.constexpr,
        FP8_DOWN: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BM: tl.constexpr,
        QKV_BN: tl.constexpr, QKV_BK: tl.constexpr, WO_BN: tl.constexpr, WO_BK: tl.constexpr,
        GU_BN: tl.constexpr, GU_BK: tl.constexpr, DN_BN: tl.constexpr, DN_BK: tl.constexpr,
        IN_BN: tl.constexpr, TO_BN: tl.constexpr, TO_BK: tl.constexpr, OUT_BM: tl.constexpr, OUT_BK: tl.constexpr,
        AT_BM: tl.constexpr, AT_BN: tl.constexpr, AT_BS: tl.constexpr, NS: tl.constexpr, CB_T: tl.constexpr,
        CB_H: tl.constexpr, CB_Z: tl.constexpr):
    M = B * S
    R = B * HZ
    NQ = H * D
    t = tl.atomic_add(ticket, 1, sem="relaxed", scope="gpu")
    while t < n_tasks:
        row = tasks + t * 8
        kind = tl.load(row)
        step = tl.load(row + 1)
        layer = tl.load(row + 2)
        ta = tl.load(row + 3)
        tb = tl.load(row + 4)
        tc = tl.load(row + 5)
        wait = tl.load(row + 6)
        done = tl.load(row + 7)
        sl = step * L + layer  # this layer-step's row of pi0.5's tables
        nxt = t
        if kind == K_QKV:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * QKV_BN + tl.arange(0, QKV_BN)
            k_lo = tc * kps_qkv
            k_hi = tl.minimum(k_lo + kps_qkv, W)
            wl = wqkv + layer.to(tl.int64) * NQKV * W
            w0 = _w_chunk(wl, rn, NQKV, k_lo, k_hi, W, QKV_BK)
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            acc, ss = _gemm(x_ptr, W, rm, rm < M, wl, W, rn, NQKV, k_lo, k_hi, w0, mod_attn + sl * W,
                            True, ADAPTIVE, BM, QKV_BN, QKV_BK)
            acc = _scale_cols(acc, sqkv + layer * NQKV, rn, NQKV, FP8_QKV)
            tl.atomic_add(qkv_ptr + rm[:, None] * NQKV + rn[None, :], acc,
                          mask=(rm[:, None] < M) & (rn[None, :] < NQKV), sem="relaxed", scope="gpu")
            if tb == 0:
                tl.atomic_add(ss_ptr + rm, ss, mask=rm < M, sem="relaxed", scope="gpu")
        elif kind == K_ATTN:
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            _attn_split_tile(ta, tb, tc, qkv_ptr, ss_ptr, bias_qkv + sl * NQKV, cos_ptr, sin_ptr,
                             kc_ptr + layer.to(tl.int64) * stride_kl, vc_ptr + layer.to(tl.int64) * stride_kl,
                             pad_ptr, o_ptr, lse_ptr, B, S, P, H, KVH, n_state, chunk, n_prefix_splits, NQKV,
                             stride_kb, stride_kh, stride_kp, stride_pad, W, eps, qk_scale, ADAPTIVE, D, AT_BM,
                             AT_BN, AT_BS)
        elif kind == K_COMBINE:
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            _combine_tile(ta, o_ptr, lse_ptr, attn_ptr, qkv_ptr, ss_ptr, M * H, M, H, NQKV, NQ, NQKV,
                          NS, D, CB_T, CB_H, CB_Z)
        elif kind == K_WO:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * WO_BN + tl.arange(0, WO_BN)
            k_lo = tc * kps_wo
            k_hi = tl.minimum(k_lo + kps_wo, NQ)
            wl = wo + layer.to(tl.int64) * W * NQ
            w0 = _w_chunk(wl, rn, W, k_lo, k_hi, NQ, WO_BK)
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            acc, _ = _gemm(attn_ptr, NQ, rm, rm < M, wl, NQ, rn, W, k_lo, k_hi, w0, mod_attn,
                           False, False, BM, WO_BN, WO_BK)
            acc = _scale_cols(acc, so + layer * W, rn, W, FP8_WO)
            acc = _scale_cols(acc, gate_attn + sl * W, rn, W, ADAPTIVE)
            tl.atomic_add(x_ptr + rm[:, None] * W + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < W),
                          sem="relaxed", scope="gpu")
        elif kind == K_GATE_UP:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * GU_BN + tl.arange(0, GU_BN)
            wl = wgu + layer.to(tl.int64) * 2 * F * W
            w0 = _w_chunk(wl, rn, F, 0, W, W, GU_BK)
            v0 = _w_chunk(wl + F * W, rn, F, 0, W, W, GU_BK)
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            g, u, ss = _gemm_pair(x_ptr, W, rm, rm < M, wl, W, rn, F, F, W, w0, v0, mod_mlp + sl * W,
                                  ADAPTIVE, BM, GU_BN, GU_BK)
            rs = 1.0 / tl.sqrt(ss / W + eps)
            g = _scale_cols(g * rs[:, None], sgu + layer * 2 * F, rn, F, FP8_GU)
            u = _scale_cols(u * rs[:, None], sgu + layer * 2 * F + F, rn, F, FP8_GU)
            if ADAPTIVE:
                g = g + tl.load(bias_gu + sl * 2 * F + rn, mask=rn < F, other=0.0)[None, :]
                u = u + tl.load(bias_gu + sl * 2 * F + F + rn, mask=rn < F, other=0.0)[None, :]
            tl.store(h_ptr + rm[:, None] * F + rn[None, :], _geglu(g, u).to(h_ptr.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < F))
        elif kind == K_DOWN:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * DN_BN + tl.arange(0, DN_BN)
            k_lo = tc * kps_down
            k_hi = tl.minimum(k_lo + kps_down, F)
            wl = wdn + layer.to(tl.int64) * W * F
            w0 = _w_chunk(wl, rn, W, k_lo, k_hi, F, DN_BK)
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            acc, _ = _gemm(h_ptr, F, rm, rm < M, wl, F, rn, W, k_lo, k_hi, w0, mod_mlp,
                           False, False, BM, DN_BN, DN_BK)
            acc = _scale_cols(acc, sdn + layer * W, rn, W, FP8_DOWN)
            acc = _scale_cols(acc, gate_mlp + sl * W, rn, W, ADAPTIVE)
            tl.atomic_add(x_ptr + rm[:, None] * W + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < W),
                          sem="relaxed", scope="gpu")
        elif kind == K_ACTION_IN:
            rr = ta * BM + tl.arange(0, BM)  # action rows (b, i)
            rn = tb * IN_BN + tl.arange(0, IN_BN)
            w0 = _w_chunk(w_in, rn, W, 0, A, A, BA)
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            a, _ = _a_chunk(xt_ptr, A, rr, rr < R, 0, A, mod_attn, False, False, BA)
            acc = _mma(a, tl.trans(w0), tl.zeros((BM, IN_BN), dtype=tl.float32))
            acc = acc + tl.load(in_bias + step * W + rn, mask=rn < W, other=0.0)[None, :]
            mask = (rr[:, None] < R) & (rn[None, :] < W)
            if ADAPTIVE:  # the action tokens are the residual stream's rows
                xrow = (rr // HZ) * S + (S - HZ) + rr % HZ
                tl.store(x_ptr + xrow[:, None] * W + rn[None, :], acc, mask=mask)
            else:  # the hidden layer of pi0's action-time MLP
                tl.store(u_ptr + rr[:, None] * W + rn[None, :], (acc * tl.sigmoid(acc)).to(u_ptr.dtype.element_ty),
                         mask=mask)
        elif kind == K_TIME_OUT:
            rr = ta * BM + tl.arange(0, BM)
            rn = tb * TO_BN + tl.arange(0, TO_BN)
            w0 = _w_chunk(w_to, rn, W, 0, W, W, TO_BK)
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            acc, _ = _gemm(u_ptr, W, rr, rr < R, w_to, W, rn, W, 0, W, w0, mod_attn, False, False, BM, TO_BN, TO_BK)
            acc = acc + tl.load(b_to + rn, mask=rn < W, other=0.0)[None, :]
            xrow = (rr // HZ) * S + (S - HZ) + rr % HZ
            tl.store(x_ptr + xrow[:, None] * W + rn[None, :], acc, mask=(rr[:, None] < R) & (rn[None, :] < W))
            if ta == 0:  # the state token(s) open every batch entry's suffix
                for bs in range(0, B * n_state):
                    xs = (bs // n_state) * S + bs % n_state
                    tl.store(x_ptr + xs * W + rn, tl.load(state_ptr + bs * W + rn, mask=rn < W, other=0.0),
                             mask=rn < W)
        else:  # K_OUT
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            _action_out_tile(ta, x_ptr, w_out, out_bias + step * out_bias_step, mod_out + step * W, xt_ptr, R, HZ,
                             S, A, W, W, W, eps, dt, ADAPTIVE, OUT_BM, BA, OUT_BK)
        _release(counters, done)
        t = nxt


def launch(args: dict, g: Geometry, p: Plan, n_tasks: int, fp8: dict[str, bool]) -> None:
    """One launch of the persistent kernel over `n_tasks` tasks; `args` holds every tensor and stride by name."""
    _persistent_expert[(min(p.programs, n_tasks),)](
        **args, n_tasks=n_tasks,
        B=g.batch, S=g.suffix, HZ=g.horizon, A=g.action_dim, W=g.width, NQKV=g.qkv_cols, F=g.mlp, P=g.prefix,
        H=g.heads, KVH=g.kv_heads, L=g.layers, n_state=g.suffix - g.horizon,
        n_prefix_splits=p.attn.prefix_splits(g.prefix), chunk=p.attn.chunk,
        qk_scale=g.head_dim**-0.5 * math.log2(math.e),
        kps_qkv=p.qkv.k_per_split(g.width), kps_wo=p.wo.k_per_split(g.q_cols), kps_down=p.down.k_per_split(g.mlp),
        ADAPTIVE=g.pi05, FP8_QKV=fp8["qkv"], FP8_WO=fp8["wo"], FP8_GU=fp8["gate_up"], FP8_DOWN=fp8["down"],
        D=g.head_dim, BA=pow2(g.action_dim), BM=p.bm, QKV_BN=p.qkv.bn, QKV_BK=p.qkv.bk, WO_BN=p.wo.bn,
        WO_BK=p.wo.bk, GU_BN=p.gate_up.bn, GU_BK=p.gate_up.bk, DN_BN=p.down.bn, DN_BK=p.down.bk,
        IN_BN=p.action_in.bn, TO_BN=p.time_out.bn, TO_BK=p.time_out.bk, OUT_BM=p.out_bm, OUT_BK=p.out_bk,
        AT_BM=p.attn.bm, AT_BN=p.attn.bn, AT_BS=p.attn.bs, NS=p.attn.splits(g), CB_T=p.attn.tokens,
        CB_H=triton.next_power_of_2(g.heads), CB_Z=max(16, 1024 // p.attn.tokens),
        num_warps=p.warps, num_stages=p.stages)
