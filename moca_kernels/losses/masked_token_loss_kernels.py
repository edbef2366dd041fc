"""Triton kernels of masked_token_loss, variant v1 (pointer loads), and the backward's Triton GEMM.

The launchers and the passes they make are described in ``masked_token_loss_triton.py``; the descriptor
variants (v2, v3) are in ``masked_token_loss_desc.py`` and share the tile helpers below.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..tuning import autotune_enabled
from ..tuning import interpret as triton_interpret

_FP16_G_RANGE = 2.0**14  # float16 G is stored as (p - y) * g * 2^14 / max|g|: |G| <= 16384 < 65504
_LOG2E = 1.4426950408889634

_INTERPRET = triton_interpret()


def _tile_configs():
    if _INTERPRET:  # the interpreter's cost grows with the tile; one small config
        return [triton.Config({"BLOCK_M": 16, "BLOCK_V": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    return [
        # first = what autotuning off takes: 160 KiB of shared memory at most, safe on every sm_80+ part
        triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_V": 256, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 32, "GROUP_M": 16}, num_warps=4, num_stages=4),
    ]


def _gemm_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


_SMEM_LIMIT = 200 * 1024  # H100 has 227 KiB per block; leave room for the epilogue's scratch


def _prune(operand_names, n_name):
    """Keep configs whose pipelined operand tiles fit in shared memory for these dtypes (float32 needs
    BLOCK_K = 32); with autotuning off keep only the first that fits."""

    def prune(configs, named_args, **kwargs):
        esize = max(named_args[a].element_size() for a in operand_names)
        fit = [c for c in configs if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs[n_name]) * c.kwargs["BLOCK_K"] * esize
               <= _SMEM_LIMIT]
        fit = fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] + c.kwargs[n_name]) * c.kwargs["BLOCK_K"])]
        # 128-byte K slices: BLOCK_K = 64 for 16-bit types, 32 for float32 (fewer candidates to compile)
        fit = [c for c in fit if c.kwargs["BLOCK_K"] * esize >= 128] or fit
        return fit if autotune_enabled() else fit[:1]

    return prune


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row tiles at a time, so the programs in flight share
    their row tiles and column tiles in L2 (Triton's grouped ordering)."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """S[rows, cols] = hidden[rows] @ weight[cols]^T (+ bias[cols]) in float32; rows and cols are int64."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk   # [BLOCK_M, BLOCK_K]
    b_ptrs = weight_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk   # [BLOCK_K, BLOCK_V] = W^T tile
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lse_step(s, cols, col_ok, label, m_i, l_i, target):
    """One [rows, cols] logit tile into the running max m_i, sum l_i (of exp(S - m_i)) and label logit."""
    s = tl.where(col_ok[None, :], s, float("-inf"))
    # every tile holds at least one valid column, so m_new is finite and exp2(-inf) = 0 on the first tile
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    l_i = l_i * tl.exp2((m_i - m_new) * 1.4426950408889634) + \
        tl.sum(tl.exp2((s - m_new[:, None]) * 1.4426950408889634), axis=1)
    target += tl.sum(tl.where(cols[None, :] == label[:, None], s, 0.0), axis=1)
    return m_new, l_i, target


@triton.jit
def _store_g_tile(s, rows, cols, local, row_ok, col_ok, v_count, labels_ptr, lse_ptr, gscale_ptr, inv_scale_ptr,
                  grad_ptr, dbias_ptr, filter_eps, active_ptr, stats_ptr,
                  BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, FILTER: tl.constexpr):
    """G = (softmax(S) - onehot(label)) * gscale of one logit tile S, stored at column ``local`` of the chunk
    (row stride v_count); with BIAS_GRAD its column sums go to dbias by float32 atomics.

    FILTER (the op's filter_eps, Cut Cross-Entropy's gradient filter): a tile whose |softmax - onehot| stays
    below filter_eps everywhere is dropped (stored as zeros, no dbias atomics); a kept tile marks its columns in
    active_ptr ([v_count] int8, 1 = some tile of the column is kept: the launcher multiplies only those columns
    in the GEMMs) and stats_ptr ([2] int32) counts (tiles, kept tiles)."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(gscale_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # d loss_r / d S[r, v] = softmax(S)[r, v] - [v == y_r], times d out / d loss_r
    p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    grad = (p - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)) * g[:, None]
    ok = row_ok[:, None] & col_ok[None, :]
    grad = tl.where(ok, grad, 0.0)
    bias_cols = col_ok
    if FILTER:
        d = tl.where(ok, p - tl.where(cols[None, :] == label[:, None], 1.0, 0.0), 0.0)
        col_max = tl.max(tl.abs(d), axis=0)                                 # [BLOCK_V]
        tile_max = tl.max(col_max, axis=0)
        kept = (col_max * 0.0 + tile_max) >= filter_eps                     # the tile's verdict, per column
        grad = tl.where(kept[None, :], grad, 0.0)
        bias_cols = col_ok & kept
        tl.store(active_ptr + local, kept.to(tl.int8), mask=bias_cols)
        tl.atomic_add(stats_ptr, 1)
        tl.atomic_add(stats_ptr + 1, (tile_max >= filter_eps).to(tl.int32))
    tl.store(grad_ptr + rows[:, None] * v_count + local[None, :], grad.to(grad_ptr.dtype.element_ty), mask=ok)
    if BIAS_GRAD:
        col_sum = tl.sum(grad, axis=0)
        if HAS_SCALE:
            col_sum = col_sum * tl.load(inv_scale_ptr)
        tl.atomic_add(dbias_ptr + cols, col_sum, mask=bias_cols)


@triton.autotune(configs=_tile_configs(), key=["H", "V"],
                 prune_configs_by={"early_config_prune": _prune(("hidden_ptr", "weight_ptr"), "BLOCK_V")})
@triton.heuristics({"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0})
@triton.jit
def _lse_fwd_kernel(
    hidden_ptr,      # [n, H] counted rows (any strides)
    weight_ptr,      # [V, H] LM head (any strides)
    bias_ptr,        # [V] (unused without HAS_BIAS)
    labels_ptr,      # [n] int32, each in [0, V)
    part_lse_ptr,    # [n, n_splits] float32 out: log-sum-exp of the row's logits within one split
    target_ptr,      # [n] float32 out: the logit of the row's label (written by the split that holds it)
    n, V, H, n_splits,
    stride_hn, stride_hk, stride_wv, stride_wk,
    SPLIT_V: tl.constexpr,     # vocabulary columns per split (a multiple of BLOCK_V)
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program: BLOCK_M rows x one split of the vocabulary, walked BLOCK_V columns at a time."""
    pid_m, pid_s = _swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), n_splits, GROUP_M)
    # int64 offsets: row * stride and column * stride pass 2^31 for large n or V x H.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_start = pid_s * SPLIT_V
    v_end = tl.minimum(v_start + SPLIT_V, V)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp(S - m_i)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < v_end
        s = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        m_i, l_i, target = _lse_step(s, cols, col_ok, label, m_i, l_i, target)
    tl.store(part_lse_ptr + rows * n_splits + pid_s, m_i + tl.log(l_i), mask=row_ok)
    hit = row_ok & (label >= v_start) & (label < v_end)
    tl.store(target_ptr + rows, target, mask=hit)


@triton.autotune(configs=_tile_configs(), key=["H", "V"],
                 restore_value=["dbias_ptr", "stats_ptr", "active_ptr"],
                 prune_configs_by={"early_config_prune": _prune(("hidden_ptr", "weight_ptr"), "BLOCK_V")})
@triton.heuristics({"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0})
@triton.jit
def _grad_logits_kernel(
    hidden_ptr,      # [n, H] counted rows
    weight_ptr,      # [V, H]
    bias_ptr,        # [V] (unused without HAS_BIAS)
    labels_ptr,      # [n] int32
    lse_ptr,         # [n] float32, from the forward
    gscale_ptr,      # [n] float32: d out / d loss[r] (times the float16 range factor R when HAS_SCALE)
    inv_scale_ptr,   # [1] float32: 1 / R (unused without HAS_SCALE)
    grad_ptr,        # [n, v_count] out (input dtype): G for this chunk, row stride v_count
    dbias_ptr,       # [V] float32 in/out: += column sums of G (unused without BIAS_GRAD)
    filter_eps,      # float: the gradient filter's threshold (unused without FILTER)
    active_ptr,      # [v_count] int8 in/out (zeroed by the caller): 1 = column in a kept tile (FILTER only)
    stats_ptr,       # [2] int32 in/out: += (tiles, kept tiles) (FILTER only)
    n, V, H, v_begin, v_count,
    stride_hn, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program: G for BLOCK_M rows x BLOCK_V columns of the chunk [v_begin, v_begin + v_count),
    recomputing the logits from hidden and weight and normalising with the saved lse."""
    pid_m, pid_v = _swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), tl.cdiv(v_count, BLOCK_V), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)   # column within the chunk
    cols = v_begin + local
    row_ok = rows < n
    col_ok = local < v_count
    s = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H,
                     stride_hn, stride_hk, stride_wv, stride_wk,
                     HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    _store_g_tile(s, rows, cols, local, row_ok, col_ok, v_count, labels_ptr, lse_ptr, gscale_ptr, inv_scale_ptr,
                  grad_ptr, dbias_ptr, filter_eps, active_ptr, stats_ptr, BIAS_GRAD, HAS_SCALE, FILTER)


@triton.autotune(configs=_gemm_configs(), key=["N"], restore_value=["c_ptr"],
                 prune_configs_by={"early_config_prune": _prune(("a_ptr", "b_ptr"), "BLOCK_N")})
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr,    # A [M, K], B [K, N], any strides
    c_ptr,           # C [M, N] out (in/out with ACCUMULATE): C = scale * A @ B (+ C)
    scale_ptr,       # [1] float32 (unused without HAS_SCALE)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program: one [BLOCK_M, BLOCK_N] tile of C, accumulated in float32 over all of K."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok)
