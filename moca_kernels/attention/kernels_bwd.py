"""Triton kernels of masked_attention's backward over packed sequences (the forward's tables and spans).

Imported lazily (only when the triton backend runs). A dK/dV program owns a key tile and walks the query tiles
that see it; a dQ program owns a query tile and walks its key tiles (``kernels_fwd.py`` explains the walk). The
dK/dV kernel, whose accumulators leave few registers, runs one loop with a branch (uniform over the program)
that masks the partial tiles.

GQA by indexing: the dK/dV program of a key/value head loops over the GROUP query heads that read it, so the
group's gradients are summed in registers (no atomics). When key tiles x key/value heads are too few to fill
the GPU, the group is split over a few programs whose float32 partial sums are added in a fixed order.

dQ: either float32 atomics from the dK/dV kernel (5 matmuls per tile pair in all), or a separate kernel per
query tile (7 matmuls, no atomics: the deterministic mode), or (variant "fused") dK/dV and dQ programs in one
launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_fwd import _offsets, _tile_runs

# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _bwd_delta_kernel(
    Out, dOut, dLse, Delta,   # out, d_out [T, Hq, D]; d_lse [Hq, T] float32 (unused without HAS_DLSE)
    T, stride_ot, stride_oh, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Program (h, m) writes Delta[h, rows] = sum_d out * d_out (- d_lse): the softmax backward's row term.
    (A gradient of the lse output enters as dS_ij += P_ij * dlse_i, i.e. Delta_i -= dlse_i.)"""
    h = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = offs_m.to(tl.int64)
    o = tl.load(Out + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(dOut + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dLse + h.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(Delta + h.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile: no load mask at all when every row is inside T (EVEN_T) and D == BLOCK_D; the
    masks' predicates and addresses cost registers the dK/dV loop does not have (see bench/NOTES.md)."""
    if EVEN_T:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _load_vec(ptrs, ok, EVEN_T: tl.constexpr):
    if EVEN_T:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q_head, dO_head, Lse_head, Delta_head, DQ_head, Spans, cols, start, full_lo, full_hi,
                end, T, qk_scale, sm_scale, stride_qt, stride_dot, stride_dqt, offs_m, offs_d, d_ok,
                ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr,
                EVEN_T: tl.constexpr, EVEN_D: tl.constexpr):
    """Accumulate dK, dV of one key tile over its query tiles start, start + BLOCK_M, ... < end (one query head);
    tiles outside [full_lo, full_hi) are partial and get the span mask (a branch uniform over the program).
    With ATOMIC_DQ, also add this key tile's share of dQ into the float32 accumulator.
    One loop rather than three (as in the forward): the dK/dV accumulators leave few registers, and three
    pipelined loops spill. EVEN_T (T % BLOCK_M == 0, so every walked row is < T): unmasked loads."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        roff = _offsets(rows, OFFS64)
        q = _load_rows(Q_head + roff[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, EVEN_T, EVEN_D)
        do = _load_rows(dO_head + roff[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok, EVEN_T, EVEN_D)
        lse = _load_vec(Lse_head + rows, row_ok, EVEN_T)
        delta = _load_vec(Delta_head + rows, row_ok, EVEN_T)
        # P^T [BLOCK_N, BLOCK_M] = exp(scale * k.q - lse), in base 2
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        p_t = tl.math.exp2(qk_t * qk_scale - (lse * 1.4426950408889634)[None, :])
        if (start_m < full_lo) | (start_m >= full_hi):
            row_lo = _load_vec(Spans + rows, row_ok, EVEN_T)
            row_hi = _load_vec(Spans + T + rows, row_ok, EVEN_T)   # padding rows: empty span
            allowed = (cols[:, None] >= row_lo[None, :]) & (cols[:, None] < row_hi[None, :])
            p_t = tl.where(allowed, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)          # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                 # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])                                      # dS = P (dP - Delta)
        ds_lp = ds_t.to(q.dtype)
        dk = tl.dot(ds_lp, q, dk, input_precision=DOT_PREC)                      # dK += dS^T Q (scaled later)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_lp), k, input_precision=DOT_PREC) * sm_scale  # dQ += scale * dS K
            tl.atomic_add(DQ_head + roff[:, None] * stride_dqt + offs_d[None, :], dq,
                          mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(
    head_part, slot,
    Q, K, V, dO, Lse, Delta, dK, dV, DQacc, Spans, KTable,
    T, GROUP, SPLIT, HEADS_PER_PROG, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr, EVEN_T: tl.constexpr,
):
    """One dK/dV program: key tile KOrder[slot] of key/value head head_part // SPLIT, query heads of part
    head_part % SPLIT (see _bwd_dkdv_kernel)."""
    hk = head_part // SPLIT
    part = head_part % SPLIT
    tile = tl.load(KTable + 4 * tl.cdiv(T, BLOCK_N) + slot)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < T
    cols64 = _offsets(cols, OFFS64)
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + cols64[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + cols64[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_ok, other=0.0)
    a, b, c, d = _tile_runs(KTable, tile, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    g_lo = part * HEADS_PER_PROG
    g_hi = tl.minimum(g_lo + HEADS_PER_PROG, GROUP)
    for g in range(g_lo, g_hi):
        h = hk * GROUP + g
        Q_head = Q + h * stride_qh
        dO_head = dO + h * stride_doh
        Lse_head = Lse + h.to(tl.int64) * T
        Delta_head = Delta + h.to(tl.int64) * T
        DQ_head = DQacc + h * stride_dqh
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q_head, dO_head, Lse_head, Delta_head, DQ_head, Spans, cols, a, b, c, d,
                             T, qk_scale, sm_scale, stride_qt, stride_dot, stride_dqt, offs_m, offs_d, d_ok,
                             ATOMIC_DQ, BLOCK_M, DOT_PREC, OFFS64, EVEN_T, BLOCK_D == HEAD_DIM)
    dk = dk * sm_scale   # s = scale * q.k
    tl.store(dK + part * stride_dks + cols64[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
             dk.to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dV + part * stride_dvs + cols64[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=["T"])
def _bwd_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV, DQacc,   # dk, dv [T, Hkv, D]; DQacc float32 [T, Hq, D] (ATOMIC_DQ only)
    Spans, KTable,                             # KTable: k_table [nK, 4] followed by k_order [nK]
    T, GROUP, SPLIT, HEADS_PER_PROG, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr, EVEN_T: tl.constexpr = False,
):
    """Program (hk * SPLIT + part, slot) owns key tile KOrder[slot] of key/value head hk and the query heads
    hk * GROUP + [part * HEADS_PER_PROG, ...) reading it: writes their summed dK and dV rows (into partial
    buffer ``part`` when SPLIT > 1; the host sums the parts) and (ATOMIC_DQ) adds to dQ of the query tiles
    it meets. SPLIT > 1 only when key tiles x heads are too few to fill the GPU."""
    _dkdv_program(tl.program_id(0), tl.program_id(1),
                  Q, K, V, dO, Lse, Delta, dK, dV, DQacc, Spans, KTable,
                  T, GROUP, SPLIT, HEADS_PER_PROG, qk_scale, sm_scale,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                  stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ATOMIC_DQ, DOT_PREC, OFFS64, EVEN_T)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, start, end, T, qk_scale,
              offs_n, offs_d, d_ok,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              OFFS64: tl.constexpr, EVEN_T: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over the key tiles starting at start, ... < end."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        coff = _offsets(cols, OFFS64)
        k_ptrs = K_head + coff[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_head + coff[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = _load_rows(k_ptrs, cols < T, d_ok, EVEN_T, EVEN_D)
            v = _load_rows(v_ptrs, cols < T, d_ok, EVEN_T, EVEN_D)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            allowed = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_program(
    h, slot,
    Q, K, V, dO, Lse, Delta, dQ, Spans, QTable,
    T, GROUP, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr, EVEN_T: tl.constexpr,
):
    """One dQ program: query tile QOrder[slot] of head h."""
    tile = tl.load(QTable + 4 * tl.cdiv(T, BLOCK_M) + slot)
    hk = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    rows64 = _offsets(offs_m, OFFS64)
    ld = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(dO + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ld, other=0.0)
    lse2 = tl.load(Lse + h.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + h.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    row_lo = tl.load(Spans + offs_m, mask=row_ok, other=0)
    row_hi = tl.load(Spans + T + offs_m, mask=row_ok, other=0)
    K_head = K + hk * stride_kh
    V_head = V + hk * stride_vh
    a, b, c, d = _tile_runs(QTable, tile, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, a, b, T, qk_scale,
                   offs_n, offs_d, d_ok, True, EVEN_D, BLOCK_N, DOT_PREC, OFFS64, EVEN_T)
    dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, b, c, T, qk_scale,
                   offs_n, offs_d, d_ok, False, EVEN_D, BLOCK_N, DOT_PREC, OFFS64, EVEN_T)
    dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, c, d, T, qk_scale,
                   offs_n, offs_d, d_ok, True, EVEN_D, BLOCK_N, DOT_PREC, OFFS64, EVEN_T)
    tl.store(dQ + rows64[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], (dq * sm_scale).to(dQ.dtype.element_ty),
             mask=ld)


@triton.jit(do_not_specialize=["T"])
def _bwd_dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ, Spans, QTable,
    T, GROUP, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr, EVEN_T: tl.constexpr = False,
):
    """Program (h, slot) owns query tile QOrder[slot] of head h: writes its dQ rows (deterministic mode)."""
    _dq_program(tl.program_id(0), tl.program_id(1),
                Q, K, V, dO, Lse, Delta, dQ, Spans, QTable, T, GROUP, qk_scale, sm_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                stride_dqt, stride_dqh, HEAD_DIM, BLOCK_D, EVEN_D, BLOCK_M, BLOCK_N, DOT_PREC, OFFS64, EVEN_T)


@triton.jit(do_not_specialize=["T"])
def _bwd_fused_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV, dQ, Spans, KTable, QTable,
    T, GROUP, HQ, SPLIT, HEADS_PER_PROG, N_DKDV, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, K_TILE: tl.constexpr, DKDV_WALK: tl.constexpr,
    Q_TILE: tl.constexpr, DQ_WALK: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """dK/dV and dQ in one launch (bwd variant "fused", deterministic: no atomics). Programs 0 .. N_DKDV - 1 are
    dK/dV programs (key tiles largest first, each slot for every head part), the rest dQ programs (query tiles
    largest first, each slot for every query head): the dQ programs fill the SMs that the long dK/dV programs
    leave idle at the end, instead of waiting for a second launch."""
    pid = tl.program_id(0)
    if pid < N_DKDV:
        parts = N_DKDV // tl.cdiv(T, K_TILE)
        _dkdv_program(pid % parts, pid // parts,
                      Q, K, V, dO, Lse, Delta, dK, dV, Delta, Spans, KTable,
                      T, GROUP, SPLIT, HEADS_PER_PROG, qk_scale, sm_scale,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                      stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh, 0, 0,
                      HEAD_DIM, BLOCK_D, DKDV_WALK, K_TILE, False, DOT_PREC, OFFS64, EVEN_T)
    else:
        off = pid - N_DKDV
        _dq_program(off % HQ, off // HQ,
                    Q, K, V, dO, Lse, Delta, dQ, Spans, QTable, T, GROUP, qk_scale, sm_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                    stride_dqt, stride_dqh, HEAD_DIM, BLOCK_D, BLOCK_D == HEAD_DIM, Q_TILE, DQ_WALK, DOT_PREC,
                    OFFS64, EVEN_T)

