"""Triton kernels of masked_attention: FlashAttention-2-style forward and backward over packed sequences.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed.

Every kernel walks the per-tile tables of ``metadata.py``: a program owns one tile (query tile: forward, dQ;
key tile: dK/dV) and visits only the tiles of the other side that hold an allowed pair: partial tiles before
the full ones, full tiles (no mask arithmetic; in the forward and dQ kernels also unmasked loads), partial
tiles after. On partial tiles query i keeps keys ``[lo_i, hi_i)`` (``spans``), two compares per score. The
forward and dQ kernels run the three stretches as three loops; the dK/dV kernel, whose accumulators leave few
registers, runs one loop with a branch (uniform over the program) that masks the partial tiles.
Programs start in largest-first order (``*_order`` in the tables).

GQA by indexing: query head h reads key/value head h // GROUP; the dK/dV program of a key/value head loops over
the GROUP query heads that read it, so the group's gradients are summed in registers (no atomics). When key
tiles x key/value heads are too few to fill the GPU, the group is split over a few programs whose float32
partial sums are added in a fixed order.

dQ: either float32 atomics from the dK/dV kernel (5 matmuls per tile pair in all), or a separate kernel per
query tile (7 matmuls, no atomics: the deterministic mode). The non-deterministic default takes whichever was
faster on the first call (``_DQ_STRATEGY``).

Tile sizes: the owner tile sizes are fixed per (device, dtype, head dim) (``plan``) because the tables are
built for them; the walked tile size, warps and stages are timed on the first GPU call per head dim, dtype and
group size (``_pick``), never per T.

Scores are kept in base 2: s2 = (q . k) * scale * log2(e), so exp2 replaces exp; the stored LSE is natural
(lse = s2_max * ln 2 + ln(sum)) and the backward converts it once per row.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..dispatch import autotune_enabled, env_variant
from .metadata import n_tiles

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------------------
# Tile-range helper
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_runs(Table, tile, BLOCK: tl.constexpr):
    """From a table row (span_lo, full_lo, full_hi, span_hi) in tokens, the token starts of the three runs of
    BLOCK-sized tiles: partial [a, b), full [b, c), partial [c, d)."""
    span_lo = tl.load(Table + 4 * tile)
    full_lo = tl.load(Table + 4 * tile + 1)
    full_hi = tl.load(Table + 4 * tile + 2)
    span_hi = tl.load(Table + 4 * tile + 3)
    a = (span_lo // BLOCK) * BLOCK
    d = tl.cdiv(span_hi, BLOCK) * BLOCK
    b = tl.cdiv(full_lo, BLOCK) * BLOCK    # first tile inside the full range
    c = (full_hi // BLOCK) * BLOCK         # end of the last tile inside it
    none = c <= b
    b = tl.where(none, d, b)
    c = tl.where(none, d, c)
    return a, b, c, d


@triton.jit
def _offsets(x, OFFS64: tl.constexpr):
    """Row/column indices for pointer arithmetic: int64 only when T * stride can reach 2^31 (OFFS64, decided
    on the host); int32 otherwise, which saves registers and 64-bit multiplies in the inner loops."""
    if OFFS64:
        return x.to(tl.int64)
    else:
        return x


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, start, end, T, qk_scale,
               offs_n, offs_d, d_ok,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
               OFFS64: tl.constexpr):
    """Online softmax over the key tiles starting at start, start + BLOCK_N, ... < end."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        coff = _offsets(cols, OFFS64)
        k_ptrs = K_head + coff[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_head + coff[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            kv_ok = (cols < T)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)   # [BLOCK_M, BLOCK_N]
        if MASKED:
            allowed = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)          # running max, base 2 (qk_scale > 0)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key yet: no NaN
        else:
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])           # one FMA per score
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(
    Q, K, V, Out, Lse,   # q, out [T, Hq, D]; k, v [T, Hkv, D] (unit stride along D); lse [Hq, T] float32
    Spans,               # int32 [2, T]: query i attends to keys [Spans[0, i], Spans[1, i])
    QTable,              # int32 q_table [nQ, 4] followed by q_order [nQ] (metadata.py)
    T, GROUP, qk_scale,  # qk_scale = scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr,
):
    """Program (h, slot) owns query tile QOrder[slot] of head h: writes its out rows and lse entries."""
    h = tl.program_id(0)
    tile = tl.load(QTable + 4 * tl.cdiv(T, BLOCK_M) + tl.program_id(1))
    hk = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    rows64 = _offsets(offs_m, OFFS64)
    q = tl.load(Q + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    row_lo = tl.load(Spans + offs_m, mask=row_ok, other=0)
    row_hi = tl.load(Spans + T + offs_m, mask=row_ok, other=0)   # padding rows: empty span
    K_head = K + hk * stride_kh
    V_head = V + hk * stride_vh
    a, b, c, d = _tile_runs(QTable, tile, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, a, b, T,
                               qk_scale, offs_n, offs_d, d_ok, True, EVEN_D, BLOCK_N, DOT_PREC, OFFS64)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, b, c, T,
                               qk_scale, offs_n, offs_d, d_ok, False, EVEN_D, BLOCK_N, DOT_PREC, OFFS64)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, row_lo, row_hi, c, d, T,
                               qk_scale, offs_n, offs_d, d_ok, True, EVEN_D, BLOCK_N, DOT_PREC, OFFS64)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)   # only padding rows have l == 0 (every query sees itself)
    out = acc / l_safe[:, None]
    tl.store(Out + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    # lse = ln(sum_j exp(scale * q.k_j)) = (m2 + log2(l)) * ln 2
    tl.store(Lse + h.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=["T"])
def _fwd_ws_kernel(
    Q, K, V, Out, Lse, Spans, QTable,   # as _fwd_kernel, but Spans [2, T] with row stride stride_s
    T, GROUP, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, WS: tl.constexpr,
):
    """Forward variants "ws" (WS) and "tma": one loop over every non-empty key tile, span mask on each, every
    input read through a tensor descriptor (TMA on sm_90; zero outside [T, HEAD_DIM]). This is the form that
    Triton's Hopper warp specialization accepts (triton 3.6 and 3.9, sm_90: a single loop whose loads, the
    query tile's and the spans' included, are all descriptor loads; a second loop, a pointer load or a branch
    in the loop makes it fail or give up; bench/NOTES.md). With WS it splits the loop into a producer warp
    group (TMA loads) and two consumer warp groups (wgmma and softmax, half of the rows each).

    Query tiles of BLOCK_M rows may be a part of the owner tile (Q_TILE = SUB x BLOCK_M): program
    (h, slot * SUB + sub) owns rows [sub * BLOCK_M, (sub + 1) * BLOCK_M) of query tile QOrder[slot]; the owner
    tile's key range covers each of its rows' spans, so the tables stay those of Q_TILE."""
    SUB: tl.constexpr = Q_TILE // BLOCK_M
    h = tl.program_id(0)
    tile = tl.load(QTable + 4 * tl.cdiv(T, Q_TILE) + tl.program_id(1) // SUB)
    hk = h // GROUP
    row0 = tile * Q_TILE + (tl.program_id(1) % SUB) * BLOCK_M
    q_desc = tl.make_tensor_descriptor(Q + h * stride_qh, shape=[T, HEAD_DIM], strides=[stride_qt, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + hk * stride_kh, shape=[T, HEAD_DIM], strides=[stride_kt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + hk * stride_vh, shape=[T, HEAD_DIM], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    # spans [2, T] with row stride stride_s (a multiple of 4: the host pads a copy when T is not), one 1-D
    # descriptor per row (a [1, BLOCK_M] block of a 2-D one breaks triton 3.9's warp specialization); rows >= T
    # read lo = hi = 0 (outside the descriptor): an empty span
    lo_desc = tl.make_tensor_descriptor(Spans, shape=[T], strides=[1], block_shape=[BLOCK_M])
    hi_desc = tl.make_tensor_descriptor(Spans + stride_s, shape=[T], strides=[1], block_shape=[BLOCK_M])
    q = q_desc.load([row0, 0])
    row_lo = lo_desc.load([row0])
    row_hi = hi_desc.load([row0])
    a, b, c, d = _tile_runs(QTable, tile, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(a, d, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([start_n, 0])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        cols = start_n + offs_n
        qk = tl.where((cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no allowed key yet: no NaN
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)   # only padding rows have l == 0
    out = acc / l_safe[:, None]
    tl.store(Out + offs_m.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(Lse + h.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


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


# ---------------------------------------------------------------------------------------------------------
# Plans and configs
# ---------------------------------------------------------------------------------------------------------

# Owner tile sizes (query tile of forward/dQ, key tile of dK/dV): they fix the metadata tables, so they are
# chosen from static facts only (device type, dtype, head dim). The tile size each loop walks, warps and
# stages are tuned per GPU on the first call (see _pick). Tests may override both with use_tiles().
_TILE_OVERRIDE: Optional[Dict[str, int]] = None


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def plan(device: torch.device, dtype: torch.dtype, head_dim: int) -> Tuple[int, int]:
    """(q_tile, k_tile): the owner tile sizes for these inputs."""
    if _TILE_OVERRIDE is not None:
        return _TILE_OVERRIDE["q_tile"], _TILE_OVERRIDE["k_tile"]
    if device.type != "cuda":   # interpreted: tiny tiles keep the interpreter fast and exercise many tiles
        return 16, 16
    forced = os.environ.get("MOCA_ATTENTION_TILES", "").strip()   # "q_tile,k_tile" (sweeps)
    if forced and dtype != torch.float32:
        q_tile, k_tile = (int(x) for x in forced.split(","))
        return q_tile, k_tile
    if dtype == torch.float32:   # correctness path (tf32x3): small tiles keep it free of spills
        return (64, 64) if head_dim <= 64 else (16, 16)
    return 128, 128


class use_tiles:
    """Context manager (tests): force owner tiles, the walked tile sizes and the GQA group split of the dK/dV
    kernel, e.g. ``use_tiles(q_tile=32, k_tile=16, fwd_n=16, dkdv_m=32, dq_n=16, split=2)``."""

    def __init__(self, q_tile: int, k_tile: int, fwd_n: int, dkdv_m: int, dq_n: int, split: int = 1):
        self.value = dict(q_tile=q_tile, k_tile=k_tile, fwd_n=fwd_n, dkdv_m=dkdv_m, dq_n=dq_n, split=split)

    def __enter__(self):
        global _TILE_OVERRIDE
        self.old, _TILE_OVERRIDE = _TILE_OVERRIDE, self.value
        return self

    def __exit__(self, *exc):
        global _TILE_OVERRIDE
        _TILE_OVERRIDE = self.old


def _candidates(kind: str, dtype: torch.dtype, bd: int, device: torch.device, variant: str = "base"):
    """(walked tile, num_warps, num_stages) candidates; the first is the default. MOCA_ATTENTION_TUNE=N keeps
    the first N (0 or 1: no timing, one compile per kernel; tests and quick benchmarks save compile time)."""
    cands = _all_candidates(kind, dtype, bd, device)
    if variant != "base" and kind == "dkdv" and device.type == "cuda" and dtype != torch.float32 and bd > 64:
        # with unmasked loads the 64-row walk compiles without spills at 3 stages (triton 3.6, sm_90; NOTES.md)
        cands = [(64, 8, 3)] + [c for c in cands if c != (64, 8, 3)]
    keep = os.environ.get("MOCA_ATTENTION_TUNE", "").strip()
    if not autotune_enabled():
        return cands[:1]
    return cands[:max(1, int(keep))] if keep.isdigit() else cands


def _fused_candidates(dtype: torch.dtype, bd: int, device: torch.device):
    """(dK/dV walked rows, dQ walked keys, num_warps, num_stages) of the fused backward kernel; the first is the
    default (FlexAttention's H100 backward walks 64 / 64 with 8 warps, 3 stages). MOCA_ATTENTION_TUNE as
    _candidates."""
    if _TILE_OVERRIDE is not None:
        cands = [(_TILE_OVERRIDE["dkdv_m"], _TILE_OVERRIDE["dq_n"], 4, 1)]
    elif device.type != "cuda":
        cands = [(16, 16, 4, 1)]
    elif dtype == torch.float32:
        cands = [(32, 32, 4, 2)] if bd <= 64 else [(16, 16, 4, 2)]
    elif bd > 64:   # sm_90, triton 3.6, EVEN_T: the first spills nothing; 64 / 64 spills 132 B (2 stages: 56 B)
        cands = [(32, 64, 8, 3), (64, 64, 8, 3), (64, 64, 8, 2)]
    else:           # D <= 64: all three spill-free
        cands = [(64, 64, 8, 3), (32, 64, 8, 3), (64, 64, 8, 2)]
    keep = os.environ.get("MOCA_ATTENTION_TUNE", "").strip()
    if not autotune_enabled():
        return cands[:1]
    return cands[:max(1, int(keep))] if keep.isdigit() else cands


def _all_candidates(kind, dtype, bd, device):
    if _TILE_OVERRIDE is not None:
        walk = _TILE_OVERRIDE[{"fwd": "fwd_n", "dkdv": "dkdv_m", "dq": "dq_n"}[kind]]
        return [(walk, 4, 1)]
    if device.type != "cuda":
        return [(16, 4, 1)]
    if dtype == torch.float32:
        return [(32, 4, 2)] if bd <= 64 else [(16, 4, 2)]
    # Register/spill counts of every candidate were checked by compiling for sm_90a with triton 3.6 (the first
    # one spills nothing); FlexAttention's H100 defaults are fwd 128 x 64 (8 warps, 3 stages), bwd 64 x 128.
    if kind == "fwd":    # 128-row query tiles walking key tiles
        cands = [(64, 8, 2), (64, 8, 3), (128, 8, 3)] if bd > 64 else [(128, 8, 3), (64, 4, 3), (128, 8, 2)]
    elif kind == "dkdv":   # 128-key tiles walking query tiles
        cands = [(32, 8, 3), (64, 8, 2), (64, 8, 3)] if bd > 64 else [(64, 8, 3), (32, 8, 3), (64, 8, 2)]
    else:   # dq
        cands = [(64, 8, 3), (32, 8, 3), (64, 8, 2)] if bd > 64 else [(64, 8, 3), (32, 8, 3), (32, 4, 3)]
    if os.environ.get("MOCA_ATTENTION_EXTRA", "0") == "1":   # a wider search (bench/sweep_attention.py)
        extra = {"fwd": [(128, 8, 2), (32, 4, 3), (64, 4, 3)], "dkdv": [(32, 4, 3), (64, 4, 3), (16, 4, 4), (32, 8, 4)],
                 "dq": [(32, 4, 3), (64, 4, 3), (128, 8, 2)]}[kind]
        cands = cands + [c for c in extra if c not in cands]
    return cands


# Tuned choice per (kernel, head dim, dtype, group size, owner tile, flags, device); never keyed by T.
_TUNED: Dict[tuple, tuple] = {}


def _pick(key, candidates, launch, before_each=None):
    """The fastest candidate for ``key``, timed once with triton.testing.do_bench (the first one when there is
    one candidate); a candidate that fails to compile (too much shared memory) is skipped."""
    if key not in _TUNED:
        if len(candidates) == 1:
            _TUNED[key] = candidates[0]
        else:
            from triton.testing import do_bench

            best, best_ms = candidates[0], float("inf")
            for cfg in candidates:
                def run(cfg=cfg):
                    if before_each is not None:
                        before_each()
                    launch(cfg)
                try:
                    ms = do_bench(run, warmup=3, rep=15)
                except Exception:  # out of resources on this GPU: not a candidate here
                    continue
                if ms < best_ms:
                    best, best_ms = cfg, ms
            _TUNED[key] = best
    return _TUNED[key]


_SM_COUNT: Dict[int, int] = {}
# The dK/dV kernel runs one program per (key tile, key/value head). With few key/value heads (GQA) that can be
# too few programs to fill the GPU evenly (2 heads x 128 tiles on 132 SMs: the longest programs set the end);
# below this many programs per SM, the query heads of a group are split over several programs.
MIN_DKDV_PROGRAMS_PER_SM = int(os.environ.get("MOCA_ATTENTION_MIN_DKDV_PROGRAMS", "3"))


def _group_split(programs: int, group: int, device: torch.device) -> int:
    if _TILE_OVERRIDE is not None and "split" in _TILE_OVERRIDE:
        return max(1, min(group, _TILE_OVERRIDE["split"]))
    if device.type != "cuda" or group == 1:
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = MIN_DKDV_PROGRAMS_PER_SM * _SM_COUNT[idx]
    return max(1, min(group, -(-want // programs)))


def _dot_prec(dtype: torch.dtype, device: torch.device) -> str:
    """float32 inputs: exact products when interpreted (the CPU tests' oracle comparisons); on a GPU three TF32
    products per dot (tf32x3, about float32 accuracy on tensor cores: the exact path is an FMA loop that
    spills tens of KB per thread). 16-bit inputs: ignored."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if device.type != "cuda" else "tf32x3"


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset (row * stride + head * stride + d) of these [T, H, D] tensors, or of their
    float32 [T, H, D] dQ accumulator, can reach 2^31."""
    return max((t.shape[0] + 1) * t.stride(0) + t.shape[1] * t.stride(1) for t in tensors) >= 2**31 - 1


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, tables: torch.Tensor,
            scale: float, q_tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [T, Hq, D] (q's dtype), lse [Hq, T] float32. tables: the mask's flat tables for (q_tile, *)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = _alloc.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(Hq, T, dtype=torch.float32, device=q.device)
    bd = block_d(D)
    grid = (Hq, n_tiles(T, q_tile))

    def launch(cfg):
        walk, warps, stages = cfg
        _fwd_kernel[grid](
            q, k, v, out, lse, spans, tables, T, group, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=bd, EVEN_D=D == bd, BLOCK_M=q_tile, BLOCK_N=walk, DOT_PREC=_dot_prec(q.dtype, q.device),
            OFFS64=_needs_int64(q, k, v, out),
            num_warps=warps, num_stages=stages)

    variant = fwd_variant()
    if variant != "base" and _descriptor_ready(q, k, v, spans):
        _forward_desc(q, k, v, out, lse, spans, tables, scale, q_tile, variant)
        return out, lse
    key = ("fwd", D, q.dtype, group, q_tile, q.device)
    launch(_pick(key, _candidates("fwd", q.dtype, bd, q.device), launch))
    return out, lse


# Forward variants, read at call time from MOCA_ATTENTION_FWD (compared side by side by
# bench/sweep_attention_bwd.py --fwd-variants; the default stays "base" until an H100 run says otherwise):
#   base  _fwd_kernel: three loops (partial tiles masked, full tiles unmasked, partial tiles), pointer loads
#         (cp.async), 8 warps;
#   ws    _fwd_ws_kernel with WS: one loop over every non-empty key tile, all loads through tensor descriptors
#         (TMA), warp-specialized by Triton (a producer warp group, two consumer warp groups: 12 warps);
#   tma   the same kernel without warp specialization (separates the gain of WS from that of TMA / one loop).
# ws and tma run where tensor descriptors can (16-bit inputs on a GPU with 16-byte aligned bases and strides,
# see _descriptor_ready; float32 and any input when interpreted); elsewhere the base kernel runs.
FWD_VARIANTS = ("base", "ws", "tma")


def fwd_variant() -> str:
    return env_variant("MOCA_ATTENTION_FWD", "fwd", FWD_VARIANTS, {"fwd": "base"}, "masked_attention")


def _descriptor_ready(q, k, v, spans) -> bool:
    """Whether _fwd_ws_kernel can read these through tensor descriptors: always when interpreted; on a GPU,
    16-bit inputs (the float32 path keeps the base kernel's small tiles) whose base addresses are 16-byte
    aligned and whose row and head strides are multiples of 16 bytes (TMA's rules)."""
    if q.device.type != "cuda":
        return True
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    size = q.element_size()
    aligned = all(t.data_ptr() % 16 == 0 for t in (q, k, v, spans))
    strides = all((t.stride(0) * size) % 16 == 0 and (t.stride(1) * size) % 16 == 0 for t in (q, k, v))
    return aligned and strides and spans.is_contiguous()


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors live in a global scratch buffer that Triton asks an allocator for; give
    it torch's (caching) allocator unless the caller set one. The setting is per thread (a ContextVar)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_scratch)


def _fwd_desc_candidates(variant: str, dtype: torch.dtype, bd: int, device: torch.device, q_tile: int):
    """(query rows per program, walked key tile, num_warps, num_stages) of _fwd_ws_kernel; the first is the
    default. MOCA_ATTENTION_TUNE as _candidates."""
    cands = _fwd_desc_all_candidates(variant, dtype, bd, device, q_tile)
    keep = os.environ.get("MOCA_ATTENTION_TUNE", "").strip()
    if not autotune_enabled():
        return cands[:1]
    return cands[:max(1, int(keep))] if keep.isdigit() else cands


def _fwd_desc_all_candidates(variant, dtype, bd, device, q_tile):
    if _TILE_OVERRIDE is not None:   # interpreter tests: two programs per owner tile where it is large enough
        return [(q_tile // 2 if q_tile >= 32 else q_tile, _TILE_OVERRIDE["fwd_n"], 4, 1)]
    if device.type != "cuda":
        return [(q_tile, 16, 4, 1)]
    # Compiled for sm_90a with triton 3.6 and 3.9 (bench/compile_attention_fwd.py; bench/NOTES.md): none spills.
    # ws: warp specialization applies only with 4 warps (it adds a producer and a second consumer warp group:
    # 12 warps, 168 registers each); Triton's Hopper attention tutorial searches BLOCK_M 64/128, BLOCK_N
    # 32/64/128, 2-4 stages.
    if variant == "ws":
        cands = [(128, 64, 4, 3), (128, 128, 4, 2), (128, 64, 4, 2), (64, 64, 4, 3)]
    else:   # tma: 138 registers at (128, 64, 8, 3); (64, 64, 8, 3) at 108-110 fits two programs per SM
        cands = [(128, 64, 8, 3), (64, 64, 8, 3), (128, 128, 8, 2)]
    cands = [c for c in cands if c[0] <= q_tile and q_tile % c[0] == 0]
    return cands or [(q_tile, 64, 4 if variant == "ws" else 8, 3)]


def _forward_desc(q, k, v, out, lse, spans, tables, scale, q_tile, variant):
    """Forward variants "ws" / "tma" (_fwd_ws_kernel) into out and lse."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    bd = block_d(D)
    if q.device.type == "cuda":
        _ensure_allocator()

    spans = spans.view(2, T)
    if T % 4:   # a descriptor's row stride must be a multiple of 16 bytes: a padded copy (odd T only)
        spans = torch.nn.functional.pad(spans, (0, 4 - T % 4))
    stride_s = spans.stride(0)

    def launch(cfg):
        block_m, walk, warps, stages = cfg
        _fwd_ws_kernel[(Hq, n_tiles(T, q_tile) * (q_tile // block_m))](
            q, k, v, out, lse, spans, tables, T, group, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            stride_s,
            HEAD_DIM=D, BLOCK_D=bd, Q_TILE=q_tile, BLOCK_M=block_m, BLOCK_N=walk,
            DOT_PREC=_dot_prec(q.dtype, q.device), WS=variant == "ws", num_warps=warps, num_stages=stages)

    key = ("fwd_" + variant, D, q.dtype, group, q_tile, q.device)
    launch(_pick(key, _fwd_desc_candidates(variant, q.dtype, bd, q.device, q_tile), launch))


# Backward variants, read at call time from MOCA_ATTENTION_BWD (compared side by side by
# bench/sweep_attention_bwd.py; the default stays "base" until an H100 run says otherwise):
#   base   two launches (dK/dV, then dQ by atomics or by its own kernel), loads masked at T;
#   even   base, plus unmasked loads in the walked loops when T is a multiple of the walked tile (EVEN_T), and
#          the dK/dV kernel's 64-row walk first among its candidates (it spills without EVEN_T);
#   fused  even, with dK/dV and dQ programs in one launch (_bwd_fused_kernel; no atomics, deterministic).
BWD_VARIANTS = ("base", "even", "fused")


def bwd_variant() -> str:
    return env_variant("MOCA_ATTENTION_BWD", "bwd", BWD_VARIANTS, {"bwd": "base"}, "masked_attention")


# dQ strategy of the non-deterministic backward per (head dim, dtype, group, tiles, device): "atomic" or
# "separate", the faster of the two, timed on the first GPU call (MOCA_ATTENTION_DQ=atomic|separate forces one).
_DQ_STRATEGY: Dict[tuple, str] = {}


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, dlse: Optional[torch.Tensor], spans: torch.Tensor, tables: torch.Tensor, scale: float,
             q_tile: int, k_tile: int, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (input dtypes).

    Two ways to get dQ: "separate" (a dQ kernel per query tile after the dK/dV kernel: no atomics, bitwise
    reproducible, but the scores are formed twice: 7 matmuls per tile pair instead of 5) and "atomic" (the
    dK/dV kernel adds each key tile's share of dQ into a float32 buffer with atomics). ``deterministic``
    forces "separate"; otherwise the faster one is used (see _DQ_STRATEGY)."""
    q, k, v, out, do = (_unit_last(t) for t in (q, k, v, out, do))
    T, Hq, D = q.shape
    dev = q.device
    bd = block_d(D)
    delta = torch.empty(Hq, T, dtype=torch.float32, device=dev)
    dlse_c = dlse.contiguous() if dlse is not None else None
    block = 64 if bd <= 128 else 32
    _bwd_delta_kernel[(Hq, triton.cdiv(T, block))](
        out, do, dlse_c if dlse_c is not None else delta, delta, T,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=block, HAS_DLSE=dlse_c is not None, num_warps=4)

    variant = bwd_variant()
    if variant == "fused":
        return _backward_fused(do, q, k, v, lse, delta, spans, tables, scale, q_tile, k_tile)
    run = lambda strategy: _backward_from_delta(do, q, k, v, out, lse, delta, spans, tables, scale,  # noqa: E731
                                                q_tile, k_tile, strategy, variant)
    if deterministic:
        return run("separate")
    return run(_dq_strategy(q, k, q_tile, k_tile, run, variant))


def _dq_strategy(q, k, q_tile, k_tile, run, variant="base") -> str:
    forced = os.environ.get("MOCA_ATTENTION_DQ", "").strip()
    if forced in ("atomic", "separate"):
        return forced
    tune = os.environ.get("MOCA_ATTENTION_TUNE", "").strip()
    if q.device.type != "cuda" or (tune.isdigit() and int(tune) <= 1) or not autotune_enabled():
        return "atomic"
    key = (q.shape[2], q.dtype, q.shape[1] // k.shape[1], q_tile, k_tile, variant, q.device)
    if key not in _DQ_STRATEGY:
        from triton.testing import do_bench

        times = {}
        for strategy in ("atomic", "separate"):
            run(strategy)   # compile and tune its kernels outside the timing
            times[strategy] = do_bench(lambda s=strategy: run(s), warmup=3, rep=15)
        _DQ_STRATEGY[key] = min(times, key=times.get)
    return _DQ_STRATEGY[key]


def _backward_from_delta(do, q, k, v, out, lse, delta, spans, tables, scale, q_tile, k_tile, strategy,
                         variant="base"):
    even = variant != "base"   # EVEN_T where T is a multiple of the walked tile
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    bd = block_d(D)
    dev = q.device
    prec = _dot_prec(q.dtype, q.device)
    offs64 = _needs_int64(q, k, v, out, do)
    nq = n_tiles(T, q_tile)
    q_tables = tables[:5 * nq]
    k_tables = tables[5 * nq:]

    split = _group_split(Hkv * n_tiles(T, k_tile), group, dev)
    heads_per_prog = triton.cdiv(group, split)
    split = triton.cdiv(group, heads_per_prog)
    if split == 1:
        dk = _alloc.empty(T, Hkv, D, dtype=k.dtype, device=dev)
        dv = _alloc.empty(T, Hkv, D, dtype=v.dtype, device=dev)
    else:   # float32 partial sums over parts of the group, summed below (fixed order: deterministic)
        dk = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
        dv = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
    atomic = strategy == "atomic"
    if atomic:
        dq_acc = torch.zeros(T, Hq, D, dtype=torch.float32, device=dev)
    else:
        dq_acc = delta   # unused pointer
        dq = _alloc.empty(T, Hq, D, dtype=q.dtype, device=dev)

    def launch_dkdv(cfg):
        walk, warps, stages = cfg
        _bwd_dkdv_kernel[(Hkv * split, n_tiles(T, k_tile))](
            q, k, v, do, lse, delta, dk, dv, dq_acc, spans, k_tables, T, group, split, heads_per_prog,
            scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(-4) if split > 1 else 0, dk.stride(-3), dk.stride(-2),
            dv.stride(-4) if split > 1 else 0, dv.stride(-3), dv.stride(-2),
            dq_acc.stride(0) if atomic else 0, dq_acc.stride(1) if atomic else 0,
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=walk, BLOCK_N=k_tile, ATOMIC_DQ=atomic, DOT_PREC=prec, OFFS64=offs64,
            EVEN_T=even and T % walk == 0, num_warps=warps, num_stages=stages)

    key = ("dkdv", D, q.dtype, group, split, k_tile, atomic, variant, dev)
    timing = key not in _TUNED
    cfg = _pick(key, _candidates("dkdv", q.dtype, bd, dev, variant), launch_dkdv,
                before_each=(lambda: dq_acc.zero_()) if atomic else None)
    if atomic and timing:
        dq_acc.zero_()   # timing runs (if any) added into it
    launch_dkdv(cfg)
    if split > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)

    if atomic:
        dq = dq_acc.to(q.dtype)
    else:
        def launch_dq(cfg):
            walk, warps, stages = cfg
            _bwd_dq_kernel[(Hq, nq)](
                q, k, v, do, lse, delta, dq, spans, q_tables, T, group, scale * LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                HEAD_DIM=D, BLOCK_D=bd, EVEN_D=D == bd, BLOCK_M=q_tile, BLOCK_N=walk, DOT_PREC=prec, OFFS64=offs64,
                EVEN_T=even and T % walk == 0, num_warps=warps, num_stages=stages)

        key = ("dq", D, q.dtype, group, q_tile, variant, dev)
        launch_dq(_pick(key, _candidates("dq", q.dtype, bd, dev, variant), launch_dq))
    return dq, dk, dv


def _backward_fused(do, q, k, v, lse, delta, spans, tables, scale, q_tile, k_tile):
    """Backward variant "fused": one launch of _bwd_fused_kernel (dK/dV programs first, then dQ programs)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    bd = block_d(D)
    dev = q.device
    nq, nk = n_tiles(T, q_tile), n_tiles(T, k_tile)
    q_tables, k_tables = tables[:5 * nq], tables[5 * nq:]
    # the dQ programs already fill the GPU, so the group is split only when both kinds together are too few
    split = _group_split(Hkv * nk + Hq * nq, group, dev)
    heads_per_prog = triton.cdiv(group, split)
    split = triton.cdiv(group, heads_per_prog)
    if split == 1:
        dk = _alloc.empty(T, Hkv, D, dtype=k.dtype, device=dev)
        dv = _alloc.empty(T, Hkv, D, dtype=v.dtype, device=dev)
    else:
        dk = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
        dv = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
    dq = _alloc.empty(T, Hq, D, dtype=q.dtype, device=dev)
    n_dkdv = Hkv * split * nk
    offs64 = _needs_int64(q, k, v, do)

    def launch(cfg):
        dkdv_walk, dq_walk, warps, stages = cfg
        _bwd_fused_kernel[(n_dkdv + Hq * nq,)](
            q, k, v, do, lse, delta, dk, dv, dq, spans, k_tables, q_tables,
            T, group, Hq, split, heads_per_prog, n_dkdv, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(-4) if split > 1 else 0, dk.stride(-3), dk.stride(-2),
            dv.stride(-4) if split > 1 else 0, dv.stride(-3), dv.stride(-2), dq.stride(0), dq.stride(1),
            HEAD_DIM=D, BLOCK_D=bd, K_TILE=k_tile, DKDV_WALK=dkdv_walk, Q_TILE=q_tile, DQ_WALK=dq_walk,
            DOT_PREC=_dot_prec(q.dtype, dev), OFFS64=offs64, EVEN_T=T % dkdv_walk == 0 and T % dq_walk == 0,
            num_warps=warps, num_stages=stages)

    key = ("fused", D, q.dtype, group, split, q_tile, k_tile, dev)
    launch(_pick(key, _fused_candidates(q.dtype, bd, dev), launch))
    if split > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dq, dk, dv
