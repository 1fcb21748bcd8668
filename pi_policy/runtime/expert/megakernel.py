"""The persistent action expert: one Triton kernel that runs a whole denoise loop from a task list.

Each program takes a task number from an atomic ticket, reads the task's row (tasks.FIELDS), loads the first
K-chunk of the task's weights, and only then waits for the stage before it (a counter in global memory reaching
that stage's task count, read with acquire semantics); it claims its next ticket, computes, and releases its own
stage's counter. Weights never depend on the wait, so each program's next weight read is in flight while the
previous stage drains. The tile math is the fused kernels' (kernels.py: the attention split, the combine, the
action output, GeGLU and the bf16/FP8 MMA are the same device functions; the GEMM loops here start from the
weight chunk loaded before the wait); RMSNorm is folded the same way (sums of squares gathered by the GEMM that
reads the residual, Gemma's (1 + w) in the weights, pi0.5's scale, shift and gate from the precomputed step
tables). Residual x and the qkv accumulators are float32; split-K products are added with float32 atomics; the
combine clears the qkv accumulators for the next layer. Each matrix kind's weights are bf16, FP8 (scaled per
output column after the product) or mixed: FP8 layers in one stack, layers kept bf16 in another, a slot per layer.

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
def _slot(slot_ptr, layer, MODE: tl.constexpr):
    """Where a layer's matrix is (mode 2, mixed): >= 0 in the FP8 stack, < 0 at -1 - slot among the bf16 ones kept;
    otherwise the layer itself."""
    if MODE == 2:
        return tl.load(slot_ptr + layer)
    return layer


@triton.jit
def _gemm_task(a_ptr, stride_a, rows, row_ok, w_ptr, scale_ptr, stride_w, rn, N, k_lo, k_hi, mod_ptr,
               counters, sizes, wait, ticket, A_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
               HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """A GEMM task: its first weight chunk loaded, then the wait for the stage before and the next ticket, then
    the product, scaled per output column for FP8 weights. Returns (product, rows' sum of squares, next ticket)."""
    w0 = _w_chunk(w_ptr, rn, N, k_lo, k_hi, stride_w, BK)
    nxt = _wait_then_claim(counters, sizes, wait, ticket)
    acc, ss = _gemm(a_ptr, stride_a, rows, row_ok, w_ptr, stride_w, rn, N, k_lo, k_hi, w0, mod_ptr, A_NORM, HAS_MOD,
                    BM, BN, BK)
    return _scale_cols(acc, scale_ptr, rn, N, HAS_SCALE), ss, nxt


@triton.jit
def _pair_task(a_ptr, stride_a, rows, row_ok, w_ptr, scale_ptr, stride_w, rn, N, K, mod_ptr, eps,
               counters, sizes, wait, ticket, HAS_MOD: tl.constexpr, HAS_SCALE: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """A gate/up task: both first weight chunks loaded, the wait, the next ticket, then the two products of the
    normed rows (1/rms applied, FP8 scales applied). Returns (gate, up, next ticket)."""
    w0 = _w_chunk(w_ptr, rn, N, 0, K, stride_w, BK)
    v0 = _w_chunk(w_ptr + N * stride_w, rn, N, 0, K, stride_w, BK)
    nxt = _wait_then_claim(counters, sizes, wait, ticket)
    g, u, ss = _gemm_pair(a_ptr, stride_a, rows, row_ok, w_ptr, stride_w, rn, N, N, K, w0, v0, mod_ptr, HAS_MOD,
                          BM, BN, BK)
    rs = 1.0 / tl.sqrt(ss / K + eps)
    g = _scale_cols(g * rs[:, None], scale_ptr, rn, N, HAS_SCALE)
    u = _scale_cols(u * rs[:, None], scale_ptr + N, rn, N, HAS_SCALE)
    return g, u, nxt


@triton.jit
def _persistent_expert(
        tasks, counters, sizes, ticket, n_tasks,
        xt_ptr, state_ptr, kc_ptr, vc_ptr, pad_ptr, cos_ptr, sin_ptr,
        w_qkv, s_qkv, k_qkv, slot_qkv, w_wo, s_wo, k_wo, slot_wo, w_gu, s_gu, k_gu, slot_gu,
        w_dn, s_dn, k_dn, slot_dn, w_in, in_bias, w_to, b_to, w_out, out_bias, out_bias_step,
        mod_attn, bias_qkv, gate_attn, mod_mlp, bias_gu, gate_mlp, mod_out,
        x_ptr, u_ptr, qkv_ptr, ss_ptr, o_ptr, lse_ptr, attn_ptr, h_ptr,
        B, S, HZ, A, W, NQKV, F, P, H, KVH, L, n_state, n_prefix_splits, chunk,
        stride_kl, stride_kb, stride_kh, stride_kp, stride_pad, eps, qk_scale, dt, kps_qkv, kps_wo, kps_down,
        ADAPTIVE: tl.constexpr, MODE_QKV: tl.constexpr, MODE_WO: tl.constexpr, MODE_GU: tl.constexpr,
        MODE_DOWN: tl.constexpr, D: tl.constexpr, BA: tl.constexpr, BM: tl.constexpr,
        QKV_BN: tl.constexpr, QKV_BK: tl.constexpr, WO_BN: tl.constexpr, WO_BK: tl.constexpr,
        GU_BN: tl.constexpr, GU_BK: tl.constexpr, DN_BN: tl.constexpr, DN_BK: tl.constexpr,
        IN_BN: tl.constexpr, TO_BN: tl.constexpr, TO_BK: tl.constexpr, OUT_BM: tl.constexpr, OUT_BK: tl.constexpr,
        AT_BM: tl.constexpr, AT_BN: tl.constexpr, AT_BS: tl.constexpr, NS: tl.constexpr, CB_T: tl.constexpr,
        CB_H: tl.constexpr, CB_Z: tl.constexpr, KINDS_ON: tl.constexpr):
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
        nxt = t  # every kind in the list has its branch (KINDS_ON is the list's kinds), so each sets nxt
        if KINDS_ON // 2**K_QKV % 2 and kind == K_QKV:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * QKV_BN + tl.arange(0, QKV_BN)
            k_lo = tc * kps_qkv
            k_hi = tl.minimum(k_lo + kps_qkv, W)
            i = _slot(slot_qkv, layer, MODE_QKV).to(tl.int64)
            if MODE_QKV == 2 and i < 0:
                acc, ss, nxt = _gemm_task(x_ptr, W, rm, rm < M, k_qkv + (-1 - i) * NQKV * W, s_qkv, W, rn, NQKV, k_lo,
                                          k_hi, mod_attn + sl * W, counters, sizes, wait, ticket, True, ADAPTIVE,
                                          False, BM, QKV_BN, QKV_BK)
            else:
                acc, ss, nxt = _gemm_task(x_ptr, W, rm, rm < M, w_qkv + i * NQKV * W, s_qkv + i * NQKV, W, rn, NQKV,
                                          k_lo, k_hi, mod_attn + sl * W, counters, sizes, wait, ticket, True,
                                          ADAPTIVE, MODE_QKV > 0, BM, QKV_BN, QKV_BK)
            tl.atomic_add(qkv_ptr + rm[:, None] * NQKV + rn[None, :], acc,
                          mask=(rm[:, None] < M) & (rn[None, :] < NQKV), sem="relaxed", scope="gpu")
            if tb == 0:
                tl.atomic_add(ss_ptr + rm, ss, mask=rm < M, sem="relaxed", scope="gpu")
        elif KINDS_ON // 2**K_ATTN % 2 and kind == K_ATTN:
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            _attn_split_tile(ta, tb, tc, qkv_ptr, ss_ptr, bias_qkv + sl * NQKV, cos_ptr, sin_ptr,
                             kc_ptr + layer.to(tl.int64) * stride_kl, vc_ptr + layer.to(tl.int64) * stride_kl,
                             pad_ptr, o_ptr, lse_ptr, B, S, P, H, KVH, n_state, chunk, n_prefix_splits, NQKV,
                             stride_kb, stride_kh, stride_kp, stride_pad, W, eps, qk_scale, ADAPTIVE, D, AT_BM,
                             AT_BN, AT_BS)
        elif KINDS_ON // 2**K_COMBINE % 2 and kind == K_COMBINE:
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            _combine_tile(ta, o_ptr, lse_ptr, attn_ptr, qkv_ptr, ss_ptr, M * H, M, H, NQKV, NQ, NQKV,
                          NS, D, CB_T, CB_H, CB_Z)
        elif KINDS_ON // 2**K_WO % 2 and kind == K_WO:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * WO_BN + tl.arange(0, WO_BN)
            k_lo = tc * kps_wo
            k_hi = tl.minimum(k_lo + kps_wo, NQ)
            i = _slot(slot_wo, layer, MODE_WO).to(tl.int64)
            if MODE_WO == 2 and i < 0:
                acc, _, nxt = _gemm_task(attn_ptr, NQ, rm, rm < M, k_wo + (-1 - i) * W * NQ, s_wo, NQ, rn, W, k_lo,
                                         k_hi, mod_attn, counters, sizes, wait, ticket, False, False, False, BM,
                                         WO_BN, WO_BK)
            else:
                acc, _, nxt = _gemm_task(attn_ptr, NQ, rm, rm < M, w_wo + i * W * NQ, s_wo + i * W, NQ, rn, W, k_lo,
                                         k_hi, mod_attn, counters, sizes, wait, ticket, False, False, MODE_WO > 0,
                                         BM, WO_BN, WO_BK)
            acc = _scale_cols(acc, gate_attn + sl * W, rn, W, ADAPTIVE)
            tl.atomic_add(x_ptr + rm[:, None] * W + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < W),
                          sem="relaxed", scope="gpu")
        elif KINDS_ON // 2**K_GATE_UP % 2 and kind == K_GATE_UP:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * GU_BN + tl.arange(0, GU_BN)
            i = _slot(slot_gu, layer, MODE_GU).to(tl.int64)
            if MODE_GU == 2 and i < 0:
                g, u, nxt = _pair_task(x_ptr, W, rm, rm < M, k_gu + (-1 - i) * 2 * F * W, s_gu, W, rn, F, W,
                                       mod_mlp + sl * W, eps, counters, sizes, wait, ticket, ADAPTIVE, False, BM,
                                       GU_BN, GU_BK)
            else:
                g, u, nxt = _pair_task(x_ptr, W, rm, rm < M, w_gu + i * 2 * F * W, s_gu + i * 2 * F, W, rn, F, W,
                                       mod_mlp + sl * W, eps, counters, sizes, wait, ticket, ADAPTIVE, MODE_GU > 0,
                                       BM, GU_BN, GU_BK)
            if ADAPTIVE:
                g = g + tl.load(bias_gu + sl * 2 * F + rn, mask=rn < F, other=0.0)[None, :]
                u = u + tl.load(bias_gu + sl * 2 * F + F + rn, mask=rn < F, other=0.0)[None, :]
            tl.store(h_ptr + rm[:, None] * F + rn[None, :], _geglu(g, u).to(h_ptr.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < F))
        elif KINDS_ON // 2**K_DOWN % 2 and kind == K_DOWN:
            rm = ta * BM + tl.arange(0, BM)
            rn = tb * DN_BN + tl.arange(0, DN_BN)
            k_lo = tc * kps_down
            k_hi = tl.minimum(k_lo + kps_down, F)
            i = _slot(slot_dn, layer, MODE_DOWN).to(tl.int64)
            if MODE_DOWN == 2 and i < 0:
                acc, _, nxt = _gemm_task(h_ptr, F, rm, rm < M, k_dn + (-1 - i) * W * F, s_dn, F, rn, W, k_lo, k_hi,
                                         mod_mlp, counters, sizes, wait, ticket, False, False, False, BM, DN_BN, DN_BK)
            else:
                acc, _, nxt = _gemm_task(h_ptr, F, rm, rm < M, w_dn + i * W * F, s_dn + i * W, F, rn, W, k_lo, k_hi,
                                         mod_mlp, counters, sizes, wait, ticket, False, False, MODE_DOWN > 0, BM,
                                         DN_BN, DN_BK)
            acc = _scale_cols(acc, gate_mlp + sl * W, rn, W, ADAPTIVE)
            tl.atomic_add(x_ptr + rm[:, None] * W + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < W),
                          sem="relaxed", scope="gpu")
        elif KINDS_ON // 2**K_ACTION_IN % 2 and kind == K_ACTION_IN:
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
        elif KINDS_ON // 2**K_TIME_OUT % 2 and kind == K_TIME_OUT:
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
        elif KINDS_ON // 2**K_OUT % 2 and kind == K_OUT:
            nxt = _wait_then_claim(counters, sizes, wait, ticket)
            _action_out_tile(ta, x_ptr, w_out, out_bias + step * out_bias_step, mod_out + step * W, xt_ptr, R, HZ,
                             S, A, W, W, W, eps, dt, ADAPTIVE, OUT_BM, BA, OUT_BK)
        _release(counters, done)
        t = nxt


def arguments(args: dict, g: Geometry, p: Plan, n_tasks: int, kinds: int, modes: dict[str, int]) -> dict:
    """Every argument of the kernel, by name, with its launch options: `args` (tensors and strides), the geometry,
    the tiles of plan `p`, each matrix kind's weight mode (0 bf16, 1 FP8, 2 FP8 with some layers bf16), and
    `kinds`: bit k set when the list has tasks of kind KINDS[k] (only their branches are compiled)."""
    return dict(
        **args, n_tasks=n_tasks,
        B=g.batch, S=g.suffix, HZ=g.horizon, A=g.action_dim, W=g.width, NQKV=g.qkv_cols, F=g.mlp, P=g.prefix,
        H=g.heads, KVH=g.kv_heads, L=g.layers, n_state=g.suffix - g.horizon,
        n_prefix_splits=p.attn.prefix_splits(g.prefix), chunk=p.attn.chunk,
        qk_scale=g.head_dim**-0.5 * math.log2(math.e),
        kps_qkv=p.qkv.k_per_split(g.width), kps_wo=p.wo.k_per_split(g.q_cols), kps_down=p.down.k_per_split(g.mlp),
        ADAPTIVE=g.pi05, MODE_QKV=modes["qkv"], MODE_WO=modes["wo"], MODE_GU=modes["gate_up"],
        MODE_DOWN=modes["down"],
        D=g.head_dim, BA=pow2(g.action_dim), BM=p.bm, QKV_BN=p.qkv.bn, QKV_BK=p.qkv.bk, WO_BN=p.wo.bn,
        WO_BK=p.wo.bk, GU_BN=p.gate_up.bn, GU_BK=p.gate_up.bk, DN_BN=p.down.bn, DN_BK=p.down.bk,
        IN_BN=p.action_in.bn, TO_BN=p.time_out.bn, TO_BK=p.time_out.bk, OUT_BM=p.out_bm, OUT_BK=p.out_bk,
        AT_BM=p.attn.bm, AT_BN=p.attn.bn, AT_BS=p.attn.bs, NS=p.attn.splits(g), CB_T=p.attn.tokens,
        CB_H=triton.next_power_of_2(g.heads), CB_Z=max(16, 1024 // p.attn.tokens), KINDS_ON=kinds,
        num_warps=p.warps, num_stages=p.stages)


def launch(kwargs: dict, programs: int) -> None:
    """One launch of `programs` programs (at most one per task) with arguments(...)."""
    _persistent_expert[(min(programs, kwargs["n_tasks"]),)](**kwargs)
