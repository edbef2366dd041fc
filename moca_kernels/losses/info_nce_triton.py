"""Triton kernels of info_nce: a tiled log-sum-exp forward and a gradient backward on tensor cores.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed.

Notation (one "direction" of the loss; see ``info_nce.py`` for how the public options map onto it):
rows x [R, D] (queries), columns y [C, D] (documents), logits s_ij = x_i . y_j / t over the *dense* columns
j < n_dense, plus, with ``own_k`` > 0, each row's own k extra columns (MoCa's per-query hard negatives) at
rows n_dense + (own_offset + i) * k + r of y. A column j != target_i whose key equals row i's key is left out.

Forward, one pass over the tiles (``_fwd_kernel``): each program owns BLOCK_R rows and one contiguous range of
columns (a "split"), runs the [BLOCK_R, BLOCK_C] logit tiles through tl.dot with fp32 accumulation and keeps,
per row, the online max m, sum l = sum exp(s - m), weighted sum w = sum exp(s - m) s (for the temperature
gradient) and the positive's logit, in base-2 units. Splits are merged on the host (a few [NSPLIT, R] ops).
The [R, C] logits exist only one tile at a time, in registers.

Backward, one more pass over the tiles (``_grad_kernel``) for a chunk of rows at a time: recompute the tile,
write G = softmax - onehot(target) (0 on masked columns) in the input dtype, then two cuBLAS GEMMs
dX_chunk = G @ y and dY += G^T @ x_chunk with fp32 outputs. The logits are thus formed twice in all (the
floor for O(B) memory: an LSE must be known before any probability is), and the four GEMMs do 8 R C D FLOPs.
The d x / d y products cannot live in the tile kernel: their output rows are D = 2048 wide, far more than a
program's registers, so G makes one round trip through HBM (2 bytes per logit written, 4 read), bounded by
chunking the rows.

fp32 inputs: tl.dot and the backward GEMMs use exact fp32 products by default, tf32 tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set (the same switch torch.matmul obeys). bf16 / fp16 inputs use
tensor cores with fp32 accumulation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..tuning import autotune_enabled
from ..tuning import interpret as triton_interpret

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # kernels may only read constexpr globals

# Backward row chunk: G = [rows, C] is written then read by two GEMMs. At least this many rows (GEMM efficiency,
# and fewer fp32 accumulations of dY), and more while G stays under G_CHUNK_BYTES. Tests shrink it.
G_CHUNK_MIN_ROWS = 4096
G_CHUNK_BYTES = 256 << 20
G_CHUNK_ROWS: Optional[int] = None  # force (tests)
# Forward column splits are multiples of this many columns (a multiple of every BLOCK_C below).
SPLIT_ALIGN = 256
SPLIT_COLS: Optional[int] = None  # force (tests)
TARGET_PROGRAMS = 8 * 132  # forward programs to aim for at least: a few waves on an H100
MIN_SPLITS = 16


def _configs():
    """Tensor-core tiles (16-bit inputs, tf32), then CUDA-core tiles for exact fp32 ('ieee' products), which
    spill registers at the larger sizes (ptxas, sm_90). ``_prune`` keeps the kind the launch needs."""
    if triton_interpret():
        return [triton.Config({"BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_D": 16, "GROUP_R": 2},
                              num_warps=1, num_stages=1)]
    # bf16 shared memory per stage: (BLOCK_R + BLOCK_C) x 64 x 2 B. The 4-warp configs fit two programs per SM
    # (<= 96 KB shared, <= 255 registers x 128 threads), hiding one's epilogue behind the other's main loop.
    return [
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_D": 64, "GROUP_R": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 256, "BLOCK_D": 64, "GROUP_R": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 128, "BLOCK_D": 64, "GROUP_R": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 128, "BLOCK_D": 64, "GROUP_R": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_D": 32, "GROUP_R": 8, "FMA": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 64, "BLOCK_D": 16, "GROUP_R": 8, "FMA": 1}, num_warps=8, num_stages=3),
    ]


def _prune(configs, named_args, **kwargs):
    """Exact fp32 products run on CUDA cores: keep the FMA tiles for them, the tensor-core tiles otherwise."""
    fma = kwargs.get("DOT_PRECISION") == "ieee"
    kept = [c for c in configs if bool(c.kwargs.get("FMA")) == fma] or configs
    return kept if autotune_enabled() else kept[:1]


_TUNE_KEY = ["R_KEY", "C_KEY", "D", "HAS_KEYS", "DOT_PRECISION"]
_EVEN_D = {"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0}


@triton.jit
def _round_to_tf32(x):
    """fp32 -> the nearest tf32 value (10 mantissa bits, ties away from zero). Operands rounded here make the
    tensor cores multiply exactly these values, whether the hardware rounds or truncates fp32 inputs: unbiased
    tf32 products (truncation biases every product toward zero; seen on an H100 as a loss error ~35x that of
    round-to-nearest tf32 inputs)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def _logit_tile(x_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y,
                EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[BLOCK_R, BLOCK_C] = x[rows_c] . y[cols_c]^T in fp32 (rows_c / cols_c already clamped in bounds)."""
    d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + rows_c.to(tl.int64)[:, None] * stride_x + d[None, :]
    y_ptrs = y_ptr + cols_c.to(tl.int64)[:, None] * stride_y + d[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        if EVEN_D:
            a = tl.load(x_ptrs)
            b = tl.load(y_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(k + d)[None, :] < D, other=0.0)
            b = tl.load(y_ptrs, mask=(k + d)[None, :] < D, other=0.0)
        if DOT_PRECISION == "tf32":
            if x_ptr.dtype.element_ty == tl.float32:
                a = _round_to_tf32(a)
                b = _round_to_tf32(b)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_D
        y_ptrs += BLOCK_D
    return acc


@triton.jit
def _not_same_key(row_key, col_key_ptr, cols_c):
    """bool [BLOCK_R, BLOCK_C]: column key differs from the row's key (its positive's id)."""
    ck = tl.load(col_key_ptr + cols_c)
    return ck[None, :] != row_key[:, None]


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_EVEN_D)
@triton.jit
def _fwd_kernel(
    x_ptr,            # [R, D] rows (queries), unit stride along D
    y_ptr,            # [>= C, D] columns (documents); only the first C are read
    temp_ptr,         # [] float32 temperature t
    target_ptr,       # [R] int64: column of each row's positive (< C)
    row_key_ptr,      # [R] int32 key of each row: its positive's id, as a dense rank (HAS_KEYS)
    col_key_ptr,      # [C] int32 key of each column (HAS_KEYS)
    part_ptr,         # [4, NSPLIT, R] float32 out: m, l, w, positive logit (base-2 units), per split
    R, C, D, stride_x, stride_y,
    cols_per_split,   # columns per split, a multiple of BLOCK_C
    NSPLIT,
    R_KEY, C_KEY,     # size buckets (autotuning key only)
    HAS_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_R: tl.constexpr,
    FMA: tl.constexpr = 0,  # config tag only (CUDA-core tiles for exact fp32)
):
    """Each program owns BLOCK_R rows x one column split; it writes its rows' four partial statistics."""
    pid = tl.program_id(0)
    n_rblocks = tl.cdiv(R, BLOCK_R)
    # Grouped order: GROUP_R row blocks x all splits run together, so their x and y tiles stay in L2.
    per_group = GROUP_R * NSPLIT
    first = (pid // per_group) * GROUP_R
    gsize = tl.minimum(n_rblocks - first, GROUP_R)
    rblock = first + (pid % per_group) % gsize
    split = (pid % per_group) // gsize

    rows = rblock * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows_c = tl.minimum(rows, R - 1)
    tgt = tl.load(target_ptr + rows_c).to(tl.int32)  # < C < 2^31; 32-bit compares per logit
    row_key = tgt
    if HAS_KEYS:
        row_key = tl.load(row_key_ptr + rows_c)
    scale2 = _LOG2E / tl.load(temp_ptr)  # logits in base-2 units: s2 = x.y / t * log2(e)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    w = tl.zeros([BLOCK_R], dtype=tl.float32)
    pos = tl.zeros([BLOCK_R], dtype=tl.float32)
    c_begin = split * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cols_c = tl.minimum(cols, C - 1)
        s_raw = _logit_tile(x_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y, EVEN_D, DOT_PRECISION,
                            BLOCK_R, BLOCK_C, BLOCK_D) * scale2
        # the positive's logit, read only in the tile holding it (a [BLOCK_R, BLOCK_C] select costs registers)
        in_tile = (tgt >= c0) & (tgt < tl.minimum(c0 + BLOCK_C, c_end))
        if tl.max(in_tile.to(tl.int32), axis=0) > 0:
            pos += tl.sum(tl.where(cols[None, :] == tgt[:, None], s_raw, 0.0), axis=1)
        ok = (cols < c_end)[None, :]
        if HAS_KEYS:  # every column sharing the row's key is left out here, the positive included (added below)
            ok = ok & _not_same_key(row_key, col_key_ptr, cols_c)
        s = tl.where(ok, s_raw, float("-inf"))
        # online max / sum; a fully masked tile keeps m = -inf, so subtract a finite reference instead
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])                  # 0 on masked columns, where s_raw stays finite
        l = l * alpha + tl.sum(p, axis=1)
        w = w * alpha + tl.sum(p * s_raw, axis=1)
        m = m_new
    if HAS_KEYS:  # the positive, in the split that holds it: one more term of the online sum
        here = (tgt >= c_begin) & (tgt < c_end)
        m_new = tl.where(here, tl.maximum(m, pos), m)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        beta = tl.where(here, tl.exp2(pos - m_ref), 0.0)
        l = l * alpha + beta
        w = w * alpha + beta * pos
        m = m_new
    out = part_ptr + split * R + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + NSPLIT * R, l, mask=row_ok)
    tl.store(out + 2 * NSPLIT * R, w, mask=row_ok)
    tl.store(out + 3 * NSPLIT * R, pos, mask=row_ok)


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_EVEN_D)
@triton.jit
def _grad_kernel(
    x_ptr,            # [R, D] rows of this chunk
    y_ptr,            # [>= C, D] columns
    temp_ptr,         # [] float32 temperature
    target_ptr,       # [R] int64 positive column per row
    row_key_ptr,      # [R] int32 (HAS_KEYS)
    col_key_ptr,      # [C] int32 (HAS_KEYS)
    lse2_ptr,         # [R] float32 log-sum-exp of each row over all its columns, base-2 units
    g_ptr,            # [R, C] out, input dtype: G = softmax(s) - onehot(target), 0 on masked columns
    R, C, D, stride_x, stride_y, stride_g,
    R_KEY, C_KEY,
    HAS_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_R: tl.constexpr,
    FMA: tl.constexpr = 0,  # config tag only (CUDA-core tiles for exact fp32)
):
    """Each program owns one [BLOCK_R, BLOCK_C] tile of G: it recomputes the logits and writes the tile."""
    pid = tl.program_id(0)
    n_rblocks = tl.cdiv(R, BLOCK_R)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    per_group = GROUP_R * n_cblocks
    first = (pid // per_group) * GROUP_R
    gsize = tl.minimum(n_rblocks - first, GROUP_R)
    rblock = first + (pid % per_group) % gsize
    cblock = (pid % per_group) // gsize

    rows = rblock * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    rows_c = tl.minimum(rows, R - 1)
    cols_c = tl.minimum(cols, C - 1)
    tgt = tl.load(target_ptr + rows_c).to(tl.int32)  # < C < 2^31; 32-bit compares per logit
    row_key = tgt
    if HAS_KEYS:
        row_key = tl.load(row_key_ptr + rows_c)
    scale2 = _LOG2E / tl.load(temp_ptr)
    lse2 = tl.load(lse2_ptr + rows_c)

    s = _logit_tile(x_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y, EVEN_D, DOT_PRECISION,
                    BLOCK_R, BLOCK_C, BLOCK_D) * scale2
    is_tgt = cols[None, :] == tgt[:, None]
    ok = col_ok[None, :]
    if HAS_KEYS:
        ok = ok & (_not_same_key(row_key, col_key_ptr, cols_c) | is_tgt)
    # d loss_i / d s_ij = softmax_ij - [j == target_i]   (the caller scales by grad_output * weight / t)
    g = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0) - tl.where(is_tgt, 1.0, 0.0)
    g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _own_logits_kernel(
    x_ptr,            # [R, D] rows
    y_ptr,            # [*, D] columns
    out_ptr,          # [R, K] float32 out: x_i . y[first + i * K + r] (no temperature)
    R, D, K, first, stride_x, stride_y,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Each program owns BLOCK_R rows: the dot products with their own K extra columns, fp32 products."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    for r in range(0, K):
        ycol = first + rows * K + r
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            dm = row_ok[:, None] & ((k + d)[None, :] < D)
            a = tl.load(x_ptr + rows[:, None] * stride_x + (k + d)[None, :], mask=dm, other=0.0).to(tl.float32)
            b = tl.load(y_ptr + ycol[:, None] * stride_y + (k + d)[None, :], mask=dm, other=0.0).to(tl.float32)
            acc += tl.sum(a * b, axis=1)
        tl.store(out_ptr + rows * K + r, acc, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision. It only matters for fp32 inputs: 'ieee' (exact fp32 products) unless torch
    allows tf32 matmuls (then 'tf32' tensor cores, as torch.matmul); 16-bit inputs keep Triton's default."""
    if dtype == torch.float32 and (triton_interpret() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(n), 1 << 16)


def _split_cols(R: int, C: int) -> int:
    """Columns per forward split. At least MIN_SPLITS splits (C permitting): the grouped launch order then runs
    GROUP_R (8) row blocks x MIN_SPLITS splits together, about one wave, so the x blocks (8 x 512 KB at
    D = 2048) and the y tiles in flight stay in L2 instead of 132 different x blocks streaming from HBM.
    More splits when there are too few row blocks to fill the GPU; each split keeps >= 1024 columns."""
    if SPLIT_COLS is not None:
        return SPLIT_COLS
    row_blocks = triton.cdiv(R, 128)
    nsplit = max(MIN_SPLITS, triton.cdiv(TARGET_PROGRAMS, row_blocks))
    nsplit = max(1, min(nsplit, triton.cdiv(C, 4 * SPLIT_ALIGN), 64))
    return triton.cdiv(triton.cdiv(C, nsplit), SPLIT_ALIGN) * SPLIT_ALIGN


def forward(x: torch.Tensor, y: torch.Tensor, temperature: torch.Tensor, target: torch.Tensor,
            row_key: Optional[torch.Tensor], col_key: Optional[torch.Tensor], n_dense: int, own_k: int,
            own_offset: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per row, float32, in base-2 units (natural-log quantities times log2(e)), logits divided by t:
    (lse2 [R], positive logit [R], expected logit under the row's softmax [R], extra logits [R, k] or None).

    Base 2 throughout, so that a row whose only counted column is its positive gets lse2 == positive exactly
    (no ln 2 round trip) and the backward's exp2(s2 - lse2) is exactly 1 there. Masked extra logits are -inf.
    """
    R, D = x.shape
    C = n_dense
    cols_per_split = _split_cols(R, C)
    nsplit = triton.cdiv(C, cols_per_split)
    part = _alloc.empty(4, nsplit, R, dtype=torch.float32, device=x.device)
    has_keys = row_key is not None
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]) * nsplit,)  # noqa: E731
    _fwd_kernel[grid](
        x, y, temperature, target, row_key if has_keys else target, col_key if has_keys else target, part,
        R, C, D, x.stride(0), y.stride(0), cols_per_split, nsplit, _bucket(R), _bucket(C),
        HAS_KEYS=has_keys, DOT_PRECISION=dot_precision(x.dtype),
    )
    m2, l, w2, pos2 = part.unbind(0)
    top = m2.amax(0)                                      # finite: the positive is always counted
    weight = torch.exp2(m2 - top)                         # splits with nothing counted: exp2(-inf) = 0
    total = (l * weight).sum(0)
    lse2 = top + torch.log2(total)
    expected2 = (w2 * weight).sum(0) / total
    positive2 = pos2.sum(0)
    extra2 = None
    if own_k:
        extra2 = own_logits(x, y, n_dense + own_offset * own_k, own_k) * (LOG2E / temperature)
        if has_keys:
            hard_keys = col_key[n_dense + own_offset * own_k:][: R * own_k].view(R, own_k)
            extra2 = extra2.masked_fill(hard_keys == row_key[:, None], float("-inf"))
        lse2_all = lse2
        for r in range(own_k):
            lse2_all = torch.logaddexp2(lse2_all, extra2[:, r])
        p_extra = torch.exp2(extra2 - lse2_all[:, None])
        expected2 = torch.exp2(lse2 - lse2_all) * expected2 + (p_extra * extra2.nan_to_num(neginf=0.0)).sum(1)
        lse2 = lse2_all
    return lse2, positive2, expected2, extra2


def own_logits(x: torch.Tensor, y: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """[R, k] float32: x_i . y[first + i k + r]."""
    R, D = x.shape
    out = _alloc.empty(R, k, dtype=torch.float32, device=x.device)
    block_r = 16 if triton_interpret() else 32
    block_d = min(triton.next_power_of_2(D), 16 if triton_interpret() else 256)
    _own_logits_kernel[(triton.cdiv(R, block_r),)](x, y, out, R, D, k, first, x.stride(0), y.stride(0),
                                                     BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


def chunk_rows(R: int, C: int, itemsize: int) -> int:
    if G_CHUNK_ROWS is not None:
        return max(1, min(R, G_CHUNK_ROWS))
    rows = max(G_CHUNK_MIN_ROWS, G_CHUNK_BYTES // max(1, C * itemsize))
    return min(R, max(128, rows // 128 * 128))


def backward(x: torch.Tensor, y: torch.Tensor, temperature: torch.Tensor, target: torch.Tensor,
             row_key: Optional[torch.Tensor], col_key: Optional[torch.Tensor], n_dense: int, own_k: int,
             own_offset: int, lse2: torch.Tensor, extra2: Optional[torch.Tensor], coef: torch.Tensor,
             need_dx: bool, need_dy: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx [R, D], dy [Cy, D]) of coef * sum_i loss_i, in the inputs' dtype (None where not needed).

    lse2, extra2: from ``forward`` (base 2). coef: [] float32 = grad_output * weight / t (d s / d(x.y) = 1 / t).
    """
    R, D = x.shape
    C = n_dense
    dtype = x.dtype
    has_keys = row_key is not None
    lse2 = lse2.contiguous()
    dx = _alloc.empty_like(x) if need_dx else None
    dy_dense = None
    rows = chunk_rows(R, C, x.element_size())
    g_buf = torch.empty(rows, C, dtype=dtype, device=x.device)
    p_extra = torch.exp2(extra2 - lse2[:, None]) if own_k else None   # [R, k], 0 where masked
    hard = y[n_dense:].view(-1, own_k, D)[own_offset:own_offset + R] if own_k else None
    dot_prec = dot_precision(dtype)
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        n = r1 - r0
        g = g_buf[:n]
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]) * triton.cdiv(C, meta["BLOCK_C"]),)  # noqa: E731
        _grad_kernel[grid](
            x[r0:], y, temperature, target[r0:], row_key[r0:] if has_keys else target,
            col_key if has_keys else target, lse2[r0:], g,
            n, C, D, x.stride(0), y.stride(0), g.stride(0), _bucket(R), _bucket(C),
            HAS_KEYS=has_keys, DOT_PRECISION=dot_prec,
        )
        if need_dx:
            acc = mm_f32(g, y[:C])                                          # [n, D] fp32
            if own_k:
                acc += torch.bmm(p_extra[r0:r1, None, :], hard[r0:r1].float())[:, 0]
            dx[r0:r1].copy_(acc.mul_(coef))
            acc = None
        if need_dy:
            dy_dense = mm_f32(g.T, x[r0:r1], acc=dy_dense)                 # [C, D] fp32
    g_buf = g = None
    dy = None
    if need_dy:
        dy = _alloc.empty_like(y)
        dy[:C].copy_(dy_dense.mul_(coef))
        if own_k:
            dy[C:].zero_()
            first = C + own_offset * own_k
            dy[first:first + R * own_k] = (
                (p_extra * coef)[:, :, None] * x.float()[:, None, :]).reshape(R * own_k, D).to(dtype)
    return dx, dy


# ---------------------------------------------------------------------------------------------------------
# GEMMs with fp32 outputs (cuBLAS accumulates half inputs in fp32 already; this keeps the result in fp32).
# ---------------------------------------------------------------------------------------------------------

_MM_OUT_DTYPE: dict = {}  # dtype -> (mm, addmm, addmm in place) support, checked once on the GPU


def _check_out_dtype(device, dtype) -> Tuple[bool, bool, bool]:
    """Whether torch.mm / torch.addmm (new output, or out= its own input) take out_dtype=float32 for ``dtype``
    inputs on this torch, and give right answers (a few small GEMMs, once per dtype)."""
    if dtype not in _MM_OUT_DTYPE:
        a = torch.randn(48, 64, device=device).to(dtype).T    # transposed, as G^T in the dDoc GEMM
        b = torch.randn(48, 40, device=device).to(dtype)
        c = torch.randn(64, 40, device=device)
        want = a.float() @ b.float()

        def ok(fn, expect):
            try:
                got = fn()
                return got.dtype == torch.float32 and bool(torch.allclose(got, expect, rtol=1e-4, atol=1e-4))
            except Exception:
                return False

        mm_ok = (ok(lambda: torch.mm(a, b, out_dtype=torch.float32), want)
                 and ok(lambda: torch.mm(a.contiguous(), b, out_dtype=torch.float32), want))
        addmm_ok = mm_ok and ok(lambda: torch.addmm(c, a, b, out_dtype=torch.float32), c + want)
        acc = c.clone()
        inplace_ok = addmm_ok and ok(lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc), c + want)
        _MM_OUT_DTYPE[dtype] = (mm_ok, addmm_ok, inplace_ok)
    return _MM_OUT_DTYPE[dtype]


def mm_f32(a: torch.Tensor, b: torch.Tensor, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b (+ acc, in place when possible) as float32, for float32 / float16 / bfloat16 a and b of one dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if a.is_cuda:
        mm_ok, addmm_ok, inplace_ok = _check_out_dtype(a.device, a.dtype)
        if mm_ok:
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            if inplace_ok:
                return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            if addmm_ok:
                return torch.addmm(acc, a, b, out_dtype=torch.float32)
            return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    out = a.float() @ b.float()
    return out if acc is None else acc.add_(out)


def workspace_bytes(R: int, C: int, D: int, itemsize: int) -> int:
    """Upper bound of the backward workspace beyond inputs and gradients: G chunk + fp32 dY + its GEMM
    temporary (when torch cannot accumulate in place) + one fp32 dX chunk."""
    rows = chunk_rows(R, C, itemsize)
    return rows * C * itemsize + 2 * C * D * 4 + rows * D * 4


