"""Triton kernels of masked_token_loss: fused LM head + cross-entropy, the [n, V] logits never stored whole.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed.

Notation: n counted rows (labels != ignore_index, compacted first), H hidden size, V vocabulary.
S = h @ W^T (+ b) are the logits, lse[r] = logsumexp_v S[r, v], loss[r] = lse[r] - S[r, y_r].
The gradient of sum_r g_r loss[r] is G = g_r (softmax(S) - onehot(y)), and
    dHidden = G @ W      [n, H]      dWeight = G^T @ h      [V, H]      dBias = sum_r G[r, :]   [V]

Passes over the logit tiles (each pass is 2 n H V FLOP on tensor cores):

1. Forward (``_lse_fwd_kernel``): one program owns BLOCK_M rows x one vocabulary split of SPLIT_V columns and
   walks its split tile by tile, each tile S = h @ W^T accumulated in float32 over H, keeping a running max
   and sum of exponentials per row (online log-sum-exp) and picking the label's logit when the label falls in
   the tile. It writes one partial log-sum-exp per (row, split) and the label logit; the splits are combined
   on the host side with a logsumexp over [n, n_splits]. Work 2nHV.
2. Backward, per vocabulary chunk of ``cv`` columns:
   a. ``_grad_logits_kernel`` recomputes S for [n, cv] from the saved lse and writes G (input dtype) into a
      chunk buffer [n, cv]; dBias comes from the float32 tile by atomics. Work 2nHcv.
   b. dWeight[chunk] = G^T @ h : one GEMM with the full reduction over n, written once, no accumulator.
   c. dHidden += G @ W[chunk] : one GEMM into a float32 accumulator [n, H] (fp32 across chunks).
   Work 4nHcv. Total forward + backward: 8 nHV (the "effective" 6 nHV counts one logit pass).

Why this split: dHidden needs every vocabulary column of a row and dWeight every row of a column, while G
needs the row's lse, known only after the whole vocabulary. Keeping G for all of [n, V] costs n V bytes x 2
(2.3 GiB at n = 8192); a float32 dWeight accumulator costs 1.16 GiB. Chunking the vocabulary keeps dWeight's
reduction inside one GEMM and accumulates only dHidden (n H x 4 bytes = 64 MiB at n = 8192) across chunks.
The G chunk is sized to the tuning setting ``mtl_g_chunk_bytes`` (48 MiB; at least MIN_CHUNK_V columns so the
accumulator's read-modify-write stays a small fraction of each GEMM).

The two backward GEMMs run on cuBLAS (``torch.mm`` / ``torch.addmm`` with float32 output) for bfloat16 and
float32 when available, otherwise on the Triton GEMM below (``_gemm_kernel``). float16 always takes the Triton
GEMM: its G is stored pre-scaled by 2^14 / max|g| (p * 2^14 stays a normal float16 number down to p ~ 4e-9,
where (p - y) / n_counted unscaled would flush to zero below p ~ 5e-4 at n = 8192) and the GEMM epilogue undoes
the scale in float32 before rounding.

Kernel variants of the two tile kernels, parts "fwd" (the log-sum-exp forward) and "grad" (the backward's G
kernel) of the triton backend's variants in masked_token_loss.py (``impl="triton:v3"``: both kernels,
``"triton:fwd.v3+grad.v2"``: per kernel). They compute the same values; v1 stays the default until a GPU run
shows which is faster (``bench/bench_masked_token_loss.py --quick --profile`` times them side by side):

- ``v1``: the kernels above; operand tiles come through pointer loads (cp.async on sm_80+), one G tile per program.
- ``v2``: the same work per program, operand tiles through tensor descriptors (TMA on sm_90: one bulk copy per
  tile, out-of-range rows / columns / K zero-filled by the copy engine instead of masks), and candidates with
  automatic warp specialisation of the K loop (``tl.range(..., warp_specialize=True)``: a producer warp issues
  the copies while the consumer warps run the tensor-core dots).
- ``v3``: tensor descriptors, and the tile loop flattened with the K loop (``tl.range(..., flatten=True)``) so
  the next tile's first copies are issued while the current tile's epilogue runs: the forward's walk over its
  vocabulary split, and the G kernel as persistent programs (one per SM) looping over the chunk's tiles.

The descriptor variants need what the copy engine needs: unit stride along H and 16-byte aligned row strides
and base addresses of hidden and weight (:func:`descriptor_reasons`; the op refuses a forced variant without
it, never running another kernel; ``last_kernels`` says which ran).
"""


from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc, tuning
from ..tuning import autotune_enabled
from ..tuning import interpret as triton_interpret

# The smallest backward G chunk (columns) whatever the budget (tuning setting mtl_g_chunk_bytes) says. The
# chunk width (mtl_vocab_chunk), the GEMM engine (mtl_bwd_gemm, MOCA_MTL_BWD_GEMM) and the descriptor
# kernels' forced config (mtl_desc_config) are tuning settings too.
MIN_CHUNK_V = 2048
# Last backward's GEMM engine, for benchmarks and tests to report.
last_bwd_gemm: Optional[str] = None

# Last call's kernel variant per tile kernel ("fwd", "grad"), for benchmarks and tests to report.
last_kernels: Dict[str, str] = {}

VARIANTS = ("v1", "v2", "v3")
# What each tile kernel runs by default (flip after a GPU measurement).
DEFAULT_VARIANT = {"fwd": "v1", "grad": "v1"}

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
                  grad_ptr, dbias_ptr, BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr):
    """G = (softmax(S) - onehot(label)) * gscale of one logit tile S, stored at column ``local`` of the chunk
    (row stride v_count); with BIAS_GRAD its column sums go to dbias by float32 atomics."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(gscale_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # d loss_r / d S[r, v] = softmax(S)[r, v] - [v == y_r], times d out / d loss_r
    p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    grad = (p - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)) * g[:, None]
    ok = row_ok[:, None] & col_ok[None, :]
    grad = tl.where(ok, grad, 0.0)
    tl.store(grad_ptr + rows[:, None] * v_count + local[None, :], grad.to(grad_ptr.dtype.element_ty), mask=ok)
    if BIAS_GRAD:
        col_sum = tl.sum(grad, axis=0)
        if HAS_SCALE:
            col_sum = col_sum * tl.load(inv_scale_ptr)
        tl.atomic_add(dbias_ptr + cols, col_sum, mask=col_ok)


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


@triton.autotune(configs=_tile_configs(), key=["H", "V"], restore_value=["dbias_ptr"],
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
    n, V, H, v_begin, v_count,
    stride_hn, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
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
                  grad_ptr, dbias_ptr, BIAS_GRAD, HAS_SCALE)


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


# ---------------------------------------------------------------------------------------------------------
# Variants v2 / v3: operand tiles through tensor descriptors (TMA on sm_90), warp-specialised or flattened loops.
# ---------------------------------------------------------------------------------------------------------


# Warp-specialised K loops compile for sm_90 under triton 3.6 (the GPU machine's); triton 3.9 stops with "descriptor
# block and tensor must have the same number of elements" in its sm_90 warp specialisation, so there v2 leaves them out.
_WS_COMPILES = tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


def _desc_configs(variant: str):
    """Candidates of the descriptor kernels: (BLOCK_M, BLOCK_V, BLOCK_K, GROUP_M) plus WS (warp-specialised K
    loop) and FLATTEN (tile loop flattened with the K loop; Triton does not combine it with WS on sm_90).
    Checked for sm_90 with triton 3.6 and 3.9 (registers, spills, shared memory, whether the warp
    specialisation happened: on sm_90 it does with 4 warps, one consumer warp group, and not with 8; NOTES.md).
    The last candidate has 128-byte K slices in float32 (the only one ``_prune_desc`` keeps for float32)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_V": 16, "BLOCK_K": 16, "GROUP_M": 2, "WS": variant == "v2",
                               "FLATTEN": variant == "v3"}, num_warps=1, num_stages=1, pre_hook=_set_block_shapes)]
    if variant == "v2":
        shapes = [(128, 128, 64, 8, 4, False)]
        if _WS_COMPILES:
            shapes += [(128, 128, 64, 4, 4, True), (128, 128, 64, 4, 3, True)]
        shapes += [(128, 256, 64, 8, 3, False), (64, 128, 32, 4, 3, False)]
    else:
        shapes = [(128, 128, 64, 8, 4, False), (128, 256, 64, 8, 3, False), (64, 128, 32, 4, 3, False)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_M": 16, "WS": ws,
                           "FLATTEN": variant == "v3"}, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)
            for bm, bv, bk, warps, stages, ws in shapes]


def _set_block_shapes(nargs):
    """Config pre-hook: the descriptors' block shapes follow the config's tile."""
    nargs["h_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_K"]]


def _prune_desc(configs, named_args, **kwargs):
    """Candidates whose pipelined operand tiles fit in shared memory and whose K slice is 128 bytes (BLOCK_K 64
    for 16-bit types, 32 for float32); with autotuning off the first of them; tuning setting mtl_desc_config
    (tests on a GPU): that index of the variant's candidates alone."""
    forced = tuning.get("mtl_desc_config")
    if forced is not None:
        return [configs[forced]]
    esize = named_args["ESIZE"]
    fit = [c for c in configs
           if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_V"]) * c.kwargs["BLOCK_K"] * esize <= _SMEM_LIMIT
           and c.kwargs["BLOCK_K"] * esize == 128]
    fit = fit or [min(configs, key=lambda c: c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_V"]) * c.kwargs["BLOCK_K"])]
    return fit if autotune_enabled() else fit[:1]


@triton.jit
def _logits_tile_desc(h_desc, w_desc, bias_ptr, row0, col0, cols, col_ok, H,
                      HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, WS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """S[row0:row0+BLOCK_M, col0:col0+BLOCK_V] (+ bias[cols]) in float32 from descriptor tiles; rows past n,
    columns past V and K past H come zero-filled from the copy (no masks in the loop)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in tl.range(0, H, BLOCK_K, warp_specialize=WS):
        a = h_desc.load([row0, k0])    # [BLOCK_M, BLOCK_K]
        b = w_desc.load([col0, k0])    # [BLOCK_V, BLOCK_K]
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


def _lse_fwd_desc_kernel(
    h_desc,          # descriptor of hidden [n, H], block [BLOCK_M, BLOCK_K]
    w_desc,          # descriptor of weight [V, H], block [BLOCK_V, BLOCK_K]
    bias_ptr, labels_ptr, part_lse_ptr, target_ptr,   # as in _lse_fwd_kernel
    n, V, H, n_splits, ESIZE,                         # ESIZE: element size (autotune key and pruning only)
    SPLIT_V: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WS: tl.constexpr, FLATTEN: tl.constexpr,
):
    """_lse_fwd_kernel's work (BLOCK_M rows x one vocabulary split) on descriptor tiles; FLATTEN fuses the walk
    over the split's tiles with the K loop so one tile's epilogue overlaps the next tile's first copies."""
    pid_m, pid_s = _swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), n_splits, GROUP_M)
    row0 = pid_m * BLOCK_M
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_start = pid_s * SPLIT_V
    v_end = tl.minimum(v_start + SPLIT_V, V)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in tl.range(v_start, v_end, BLOCK_V, flatten=FLATTEN):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        s = _logits_tile_desc(h_desc, w_desc, bias_ptr, row0, v0, cols, col_ok, H,
                              HAS_BIAS, DOT_PRECISION, WS, BLOCK_M, BLOCK_V, BLOCK_K)
        m_i, l_i, target = _lse_step(s, cols, col_ok, label, m_i, l_i, target)
    tl.store(part_lse_ptr + rows * n_splits + pid_s, m_i + tl.log(l_i), mask=row_ok)
    hit = row_ok & (label >= v_start) & (label < v_end)
    tl.store(target_ptr + rows, target, mask=hit)


def _grad_logits_desc_kernel(
    h_desc, w_desc,  # descriptors of hidden [n, H] and weight [V, H]
    bias_ptr, labels_ptr, lse_ptr, gscale_ptr, inv_scale_ptr, grad_ptr, dbias_ptr,   # as in _grad_logits_kernel
    n, V, H, v_begin, v_count, ESIZE,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WS: tl.constexpr, FLATTEN: tl.constexpr,
):
    """_grad_logits_kernel's G tiles on descriptor tiles. Each program walks tiles pid, pid + programs, ...;
    v2 launches one program per tile (one trip), v3 one per SM with FLATTEN (persistent, the next tile's copies
    overlap this tile's epilogue)."""
    num_m = tl.cdiv(n, BLOCK_M)
    num_v = tl.cdiv(v_count, BLOCK_V)
    for tile in tl.range(tl.program_id(0), num_m * num_v, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_v = _swizzle(tile, num_m, num_v, GROUP_M)
        row0 = pid_m * BLOCK_M
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)   # column within the chunk
        cols = v_begin + local
        row_ok = rows < n
        col_ok = local < v_count
        s = _logits_tile_desc(h_desc, w_desc, bias_ptr, row0, v_begin + pid_v * BLOCK_V, cols, col_ok, H,
                              HAS_BIAS, DOT_PRECISION, WS, BLOCK_M, BLOCK_V, BLOCK_K)
        _store_g_tile(s, rows, cols, local, row_ok, col_ok, v_count, labels_ptr, lse_ptr, gscale_ptr, inv_scale_ptr,
                      grad_ptr, dbias_ptr, BIAS_GRAD, HAS_SCALE)


def _desc_kernel(fn, variant: str, **extra):
    return triton.autotune(configs=_desc_configs(variant), key=["H", "V", "ESIZE"],
                           prune_configs_by={"early_config_prune": _prune_desc}, **extra)(triton.jit(fn))


# One autotuned kernel per (variant, kernel): each variant keeps its own candidates and its own tuned choice.
_FWD_DESC = {v: _desc_kernel(_lse_fwd_desc_kernel, v) for v in ("v2", "v3")}
_GRAD_DESC = {v: _desc_kernel(_grad_logits_desc_kernel, v, restore_value=["dbias_ptr"]) for v in ("v2", "v3")}


@tuning.on_clear
def reset_tuning() -> None:
    """Forget every descriptor kernel's tuned choice (``tuning.clear()`` calls it)."""
    for kernel in (*_FWD_DESC.values(), *_GRAD_DESC.values()):
        kernel.cache.clear()


def descriptor_reasons(hidden: torch.Tensor, weight: torch.Tensor) -> List[str]:
    """Why the descriptor kernels (v2, v3) cannot read hidden [N, H] and weight [V, H] through the copy engine:
    a stride along H other than 1, a row stride or base address not 16-byte aligned. Checked on the caller's
    tensors: the counted rows of hidden, when compacted, are a copy with rows of H values, so H itself must
    give 16-byte rows too."""
    why = []
    for name, t in (("hidden", hidden), ("weight", weight)):
        esize = t.element_size()
        if t.stride(1) != 1:
            why.append(f"{name} has stride {t.stride(1)} along H; the descriptor kernels need 1")
        elif (t.stride(0) * esize) % 16 or t.data_ptr() % 16:
            why.append(f"{name}'s rows or base address are not 16-byte aligned (TMA)")
    if (hidden.shape[1] * hidden.element_size()) % 16:
        why.append(f"rows of H = {hidden.shape[1]} values are not a multiple of 16 bytes (TMA)")
    return why


def _descriptor(t: torch.Tensor):
    """A tensor descriptor of the 2-D ``t`` (block shape set per config), or None where the copy engine cannot
    read it: a stride along H other than 1, a row stride or base address not 16-byte aligned."""
    esize = t.element_size()
    if t.stride(1) != 1 or (t.stride(0) * esize) % 16 or t.data_ptr() % 16 or t.shape[0] == 0:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1])


def _descriptors(variant: str, hidden: torch.Tensor, weight: torch.Tensor):
    """(hidden descriptor, weight descriptor) for a descriptor variant, (None, None) for v1. A tensor the copy
    engine cannot read raises (the op's reasons refuse such inputs before any kernel runs)."""
    if variant not in VARIANTS:
        raise ValueError(f"masked_token_loss: unknown kernel variant {variant!r}; expected one of {VARIANTS}")
    if variant == "v1":
        return None, None
    hd, wd = _descriptor(hidden), _descriptor(weight)
    if hd is None or wd is None:
        raise RuntimeError(f"masked_token_loss: kernel variant {variant} cannot read these tensors: "
                           + "; ".join(descriptor_reasons(hidden, weight)))
    return hd, wd


# ---------------------------------------------------------------------------------------------------------
# Host launchers.
# ---------------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision products, as torch.matmul does by default (tf32 would lose 13 bits)
    return "ieee" if dtype == torch.float32 else "tf32"


def split_v() -> int:
    """Vocabulary columns per forward split (a multiple of every config's BLOCK_V)."""
    return 32 if _INTERPRET else 4096


def lse_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, variant: str = "v1") -> Tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, H] (counted rows) and weight [V, H] of one dtype (float32 / float16 / bfloat16, any strides),
    bias [V] float (any stride) or None, labels int32 [n] in [0, V); variant: the forward kernel's.

    Returns (lse float32 [n], label logit float32 [n])."""
    bias = bias.contiguous() if bias is not None else None  # the kernels read bias[cols] at unit stride
    n, H = hidden.shape
    V = weight.shape[0]
    sv = split_v()
    n_splits = triton.cdiv(V, sv)
    part = _alloc.empty(n, n_splits, dtype=torch.float32, device=hidden.device)
    target = _alloc.empty(n, dtype=torch.float32, device=hidden.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * n_splits,)

    hd, wd = _descriptors(variant, hidden, weight)
    last_kernels["fwd"] = variant
    if variant == "v1":
        _lse_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else part, labels, part, target,
            n, V, H, n_splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            SPLIT_V=sv, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        )
    else:
        _FWD_DESC[variant][grid](
            hd, wd, bias if bias is not None else part, labels, part, target,
            n, V, H, n_splits, hidden.element_size(),
            SPLIT_V=sv, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        )
    lse = part[:, 0] if n_splits == 1 else torch.logsumexp(part, dim=1)
    return lse, target


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent (v3) G kernel: one per SM (3 under the interpreter, so tests take several
    tiles per program)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def vocab_chunk(n: int, V: int, esize: int) -> int:
    """Columns of G per backward chunk: the mtl_g_chunk_bytes budget (48 MiB), at least MIN_CHUNK_V, a multiple of 256."""
    forced = tuning.get("mtl_vocab_chunk")
    if forced is not None:
        return max(1, min(forced, V))
    cv = tuning.get("mtl_g_chunk_bytes") // max(1, n * esize)
    cv = max(MIN_CHUNK_V, cv // 256 * 256)
    return min(cv, V)


_CUBLAS_FP32_OUT: Dict[Tuple[torch.dtype, int], bool] = {}


def cublas_fp32_accumulate_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take ``out_dtype=torch.float32`` for ``dtype`` inputs with a float32
    ``out`` that is also the added matrix (torch >= 2.8 on CUDA; the aliasing form was fixed later).
    Checked once per dtype and device on tiny deterministic matrices."""
    key = (dtype, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _CUBLAS_FP32_OUT:
        ok = False
        try:
            a = (torch.arange(64 * 48, device=device, dtype=torch.float32).reshape(64, 48) * 0.37).sin().to(dtype)
            b = (torch.arange(48 * 40, device=device, dtype=torch.float32).reshape(48, 40) * 0.23).cos().to(dtype)
            exact = a.float() @ b.float()
            c = torch.empty(64, 40, device=device, dtype=torch.float32)
            torch.mm(a, b, out_dtype=torch.float32, out=c)
            first = torch.allclose(c, exact, rtol=1e-4, atol=1e-4)
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            ok = bool(first and torch.allclose(c, 2 * exact, rtol=1e-4, atol=1e-4))
        except Exception:  # TypeError / RuntimeError on torch without the float32-output overloads
            ok = False
        _CUBLAS_FP32_OUT[key] = ok
    return _CUBLAS_FP32_OUT[key]


def _bwd_engine(dtype: torch.dtype, device: torch.device) -> str:
    """"torch" (cuBLAS) or "triton" for the two backward GEMMs."""
    if dtype == torch.float16 or device.type != "cuda" or tuning.get("mtl_bwd_gemm") == "triton":
        return "triton"   # float16: G is pre-scaled and only the Triton epilogue undoes it in float32
    if dtype == torch.float32:
        return "torch"
    return "torch" if cublas_fp32_accumulate_ok(dtype, device) else "triton"


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, scale: Optional[torch.Tensor]):
    """c (=|+=) scale * a @ b on the Triton GEMM, float32 accumulation."""
    M, K = a.shape
    N = b.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _gemm_kernel[grid](
        a, b, c, scale if scale is not None else c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, HAS_SCALE=scale is not None, DOT_PRECISION=_dot_precision(a.dtype),
    )


def backward(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             labels: torch.Tensor, lse: torch.Tensor, need_hidden: bool, need_weight: bool, need_bias: bool,
             variant: str = "v1"):
    """Gradients of sum_r grad_rows[r] * loss[r] over the counted rows.

    hidden [n, H] counted rows and weight [V, H] of one dtype (float32 / float16 / bfloat16, any strides),
    bias [V] float (any stride) or None, labels int32 [n], lse float32 [n], grad_rows float32 [n] (contiguous).
    variant: the G kernel's. Returns (d hidden [n, H] input dtype, d weight [V, H] weight dtype, d bias [V]
    float32), each None when not asked for.
    """
    global last_bwd_gemm
    bias = bias.contiguous() if bias is not None else None  # the kernels read bias[cols] at unit stride
    n, H = hidden.shape
    V = weight.shape[0]
    dtype = hidden.dtype
    device = hidden.device
    engine = _bwd_engine(dtype, device)
    last_bwd_gemm = engine
    if engine == "torch" and hidden.stride(1) != 1:
        hidden = hidden.contiguous()  # one copy instead of one inside every chunk's GEMM

    scaled = dtype == torch.float16
    inv_scale = None
    gscale = grad_rows
    if scaled:
        # G in float16 would flush softmax values below 6e-8 to zero; store it scaled by R = 2^14 / max|g|
        gmax = grad_rows.abs().amax()
        r = _FP16_G_RANGE / gmax
        r = torch.where(torch.isfinite(r) & (r > 0), r, torch.ones_like(r))
        gscale = grad_rows * r
        inv_scale = (1.0 / r).reshape(1).to(torch.float32)

    dweight = _alloc.empty(V, H, dtype=weight.dtype, device=device) if need_weight else None
    dbias = torch.zeros(V, dtype=torch.float32, device=device) if need_bias else None
    acc = None
    if need_hidden:
        acc = _alloc.empty(n, H, dtype=torch.float32, device=device)  # written whole by the first chunk
    if not (need_hidden or need_weight or need_bias):
        return None, None, None

    cv = vocab_chunk(n, V, hidden.element_size())
    g_buf = _alloc.empty(n * cv, dtype=dtype, device=device)
    precision = _dot_precision(dtype)
    hd, wd = _descriptors(variant, hidden, weight)
    last_kernels["grad"] = variant
    programs = _persistent_programs(device) if variant == "v3" else None
    first = True
    for v0 in range(0, V, cv):
        width = min(cv, V - v0)
        g = g_buf[: n * width].view(n, width)

        def grid(meta):
            tiles = triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_V"])
            return (tiles if programs is None else min(tiles, programs),)

        if variant == "v1":
            _grad_logits_kernel[grid](
                hidden, weight, bias if bias is not None else lse, labels, lse, gscale,
                inv_scale if inv_scale is not None else lse, g, dbias if dbias is not None else lse,
                n, V, H, v0, width,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                HAS_BIAS=bias is not None, BIAS_GRAD=need_bias, HAS_SCALE=scaled, DOT_PRECISION=precision,
            )
        else:
            _GRAD_DESC[variant][grid](
                hd, wd, bias if bias is not None else lse, labels, lse, gscale,
                inv_scale if inv_scale is not None else lse, g, dbias if dbias is not None else lse,
                n, V, H, v0, width, hidden.element_size(),
                HAS_BIAS=bias is not None, BIAS_GRAD=need_bias, HAS_SCALE=scaled, DOT_PRECISION=precision,
            )
        w_chunk = weight[v0:v0 + width]
        if need_weight:
            out = dweight[v0:v0 + width]
            if engine == "torch":
                torch.mm(g.t(), hidden, out=out)
            else:
                _gemm(g.t(), hidden, out, accumulate=False, scale=inv_scale)
        if need_hidden:
            if engine == "torch":
                if dtype == torch.float32 and first:
                    torch.mm(g, w_chunk, out=acc)
                elif dtype == torch.float32:
                    torch.addmm(acc, g, w_chunk, out=acc)
                elif first:
                    torch.mm(g, w_chunk, out_dtype=torch.float32, out=acc)
                else:
                    torch.addmm(acc, g, w_chunk, out_dtype=torch.float32, out=acc)
            else:
                _gemm(g, w_chunk, acc, accumulate=not first, scale=inv_scale)
        first = False
    del g_buf, g
    dhidden = None
    if need_hidden:
        dhidden = acc if dtype == torch.float32 else acc.to(dtype)
    return dhidden, dweight, dbias
