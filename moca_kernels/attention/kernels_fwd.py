"""Triton kernels of masked_attention's forward: FlashAttention-2-style, over packed sequences.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed. The
launchers (``launch.py``) choose the kernel (the backend's variant, ``op.py``) and its configuration
(``tiles.py``).

Every kernel walks the per-tile tables of ``metadata.py``: a program owns one query tile and visits only the
key tiles that hold an allowed pair: partial tiles before the full ones, full tiles (no mask arithmetic,
unmasked loads), partial tiles after, as three loops (``_fwd_kernel``, variant "base"). On partial tiles query
i keeps keys ``[lo_i, hi_i)`` (``spans``), two compares per score. Programs start in largest-first order
(``*_order`` in the tables). GQA by indexing: query head h reads key/value head h // GROUP.

Scores are kept in base 2: s2 = (q . k) * scale * log2(e), so exp2 replaces exp; the stored LSE is natural
(lse = s2_max * ln 2 + ln(sum)) and the backward converts it once per row.
"""

from __future__ import annotations

import triton
import triton.language as tl

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

