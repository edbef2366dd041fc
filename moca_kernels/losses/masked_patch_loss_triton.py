"""Triton kernels of masked_patch_loss: the forward with fused gradient, and the backward's scaling.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..dispatch import autotune_enabled, triton_interpret

# Rows up to this many elements are held whole in registers (one read of pred and target).
MAX_SINGLE_TILE = 8192


@triton.jit
def _masked_patch_loss_fwd_kernel(
    pred_ptr,          # [N, P] pred, contiguous
    target_ptr,        # [N, P] target, contiguous
    mask_ptr,          # [N] uint8, 1 = counted (unused without HAS_MASK)
    count_ptr,         # [1] int32 number of counted rows (unused without HAS_MASK)
    grad_ptr,          # [N, P] out, contiguous: d loss / d pred (unused without WRITE_GRAD)
    row_loss_ptr,      # [N] out float32: sum_p (pred - t)^2 / (count * P)
    N,
    eps,
    P: tl.constexpr,   # a compile-time row length lets Triton prove 16-byte accesses (P = 1176 is 8 * 147)
    HAS_MASK: tl.constexpr, NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ROWS: tl.constexpr,     # rows per program
    BLOCK_P: tl.constexpr,  # columns per tile (>= P when SINGLE_TILE)
    SINGLE_TILE: tl.constexpr,
):
    """Each program owns ROWS rows: their row_loss and, with WRITE_GRAD, their gradient rows.
    Rows not counted load nothing (their loads are masked off) and write zeros."""
    pid = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 for large N * P
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    if HAS_MASK:
        counted = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
        count = tl.maximum(tl.load(count_ptr), 1).to(tl.float32)
    else:
        counted = row_ok
        count = N * 1.0
    inv = 1.0 / (count * P)
    cols = tl.arange(0, BLOCK_P)
    p_rows = pred_ptr + rows[:, None] * P
    t_rows = target_ptr + rows[:, None] * P
    g_rows = grad_ptr + rows[:, None] * P
    if SINGLE_TILE:
        col_ok = cols[None, :] < P
        ld = counted[:, None] & col_ok
        t = tl.load(t_rows + cols[None, :], mask=ld, other=0.0).to(tl.float32)
        p = tl.load(p_rows + cols[None, :], mask=ld, other=0.0).to(tl.float32)
        if NORM_PIX:
            mean = tl.sum(t, axis=1) / P
            dev = tl.where(ld, t - mean[:, None], 0.0)
            var = tl.sum(dev * dev, axis=1) / (P - 1)  # unbiased, as MAE
            t = dev / tl.sqrt(var + eps)[:, None]
        diff = tl.where(ld, p - t, 0.0)
        tl.store(row_loss_ptr + rows, tl.sum(diff * diff, axis=1) * inv, mask=row_ok)
        if WRITE_GRAD:
            # d/dpred (pred - t)^2 / (count * P) = 2 (pred - t) / (count * P); zero on uncounted rows
            tl.store(g_rows + cols[None, :], (2.0 * inv * diff).to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok)
    else:
        mean = tl.zeros([ROWS], dtype=tl.float32)
        rstd = tl.full([ROWS], 1.0, dtype=tl.float32)
        if NORM_PIX:
            s = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, P, BLOCK_P):
                ld = counted[:, None] & (start + cols[None, :] < P)
                s += tl.sum(tl.load(t_rows + start + cols[None, :], mask=ld, other=0.0).to(tl.float32), axis=1)
            mean = s / P
            s2 = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, P, BLOCK_P):
                ld = counted[:, None] & (start + cols[None, :] < P)
                t = tl.load(t_rows + start + cols[None, :], mask=ld, other=0.0).to(tl.float32)
                dev = tl.where(ld, t - mean[:, None], 0.0)
                s2 += tl.sum(dev * dev, axis=1)
            rstd = 1.0 / tl.sqrt(s2 / (P - 1) + eps)
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, P, BLOCK_P):
            col_ok = start + cols[None, :] < P
            ld = counted[:, None] & col_ok
            t = tl.load(t_rows + start + cols[None, :], mask=ld, other=0.0).to(tl.float32)
            p = tl.load(p_rows + start + cols[None, :], mask=ld, other=0.0).to(tl.float32)
            if NORM_PIX:
                t = (t - mean[:, None]) * rstd[:, None]
            diff = tl.where(ld, p - t, 0.0)
            acc += tl.sum(diff * diff, axis=1)
            if WRITE_GRAD:
                tl.store(g_rows + start + cols[None, :], (2.0 * inv * diff).to(grad_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok)
        tl.store(row_loss_ptr + rows, acc * inv, mask=row_ok)


@triton.jit
def _masked_patch_loss_scale_grad_kernel(
    grad_ptr,         # [N, P] in/out: the gradient saved by the forward
    grad_output_ptr,  # [1] float32: d out / d loss
    mask_ptr,         # [N] uint8 (unused without HAS_MASK)
    N,
    P: tl.constexpr,
    HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad *= grad_output on this program's ROWS rows. grad_output == 1 touches nothing; rows not counted
    hold zeros and are skipped unless grad_output is not finite (then 0 * g gives NaN, as unfused)."""
    g = tl.load(grad_output_ptr)
    if g != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        live = rows < N
        if HAS_MASK:
            not_finite = ((g - g) != 0.0).to(tl.int32)  # inf - inf and NaN - NaN are NaN
            counted = tl.load(mask_ptr + rows, mask=rows < N, other=0).to(tl.int32)
            live = live & (counted + not_finite > 0)
        cols = tl.arange(0, BLOCK_P)
        ptrs = grad_ptr + rows[:, None] * P
        for start in range(0, P, BLOCK_P):
            m = live[:, None] & (start + cols[None, :] < P)
            x = tl.load(ptrs + start + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(ptrs + start + cols[None, :], (x * g).to(grad_ptr.dtype.element_ty), mask=m)


def _configs(P: int):
    """Candidate (ROWS, BLOCK_P, SINGLE_TILE, num_warps) for rows of P elements; the first is the default."""
    block = triton.next_power_of_2(P)
    if block <= MAX_SINGLE_TILE:
        base = max(1, min(16, 2048 // block))
        out = []
        for rows in dict.fromkeys((base, max(1, base // 2), base * 2)):
            for warps in (8, 4):
                if rows * block <= 2 * MAX_SINGLE_TILE and (warps == 8 or rows * block <= 4096):
                    out.append((rows, block, True, warps))
        return out
    return [(1, 2048, False, 8), (1, 4096, False, 8)]


# Tuned choice per (P, dtypes, flags), found on the first call on a GPU by timing the candidates.
_TUNED = {}


def _launch_fwd(cfg, pred, target, mask, count, grad, row_loss, norm_pix, eps, write_grad):
    rows, block, single, warps = cfg
    N, P = pred.shape
    _masked_patch_loss_fwd_kernel[(triton.cdiv(N, rows),)](
        pred, target, mask if mask is not None else row_loss, count if count is not None else row_loss,
        grad if grad is not None else row_loss, row_loss, N, eps,
        P=P, HAS_MASK=mask is not None, NORM_PIX=norm_pix, WRITE_GRAD=write_grad,
        ROWS=rows, BLOCK_P=block, SINGLE_TILE=single, num_warps=warps,
    )


def _pick(key, candidates, launch):
    """The fastest candidate for ``key`` (timed once with triton.testing.do_bench; the first one when
    interpreted or when there is one)."""
    if key not in _TUNED:
        if triton_interpret() or len(candidates) == 1 or not autotune_enabled():
            _TUNED[key] = candidates[0]
        else:
            from triton.testing import do_bench

            times = [do_bench(lambda c=c: launch(c), warmup=5, rep=20) for c in candidates]
            _TUNED[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _TUNED[key]


def forward(pred: torch.Tensor, target: torch.Tensor, mask, count, norm_pix: bool, eps: float,
            write_grad: bool):
    """Returns (row_loss float32 [N], grad [N, P] or None). pred and target are made contiguous."""
    pred, target = pred.contiguous(), target.contiguous()
    N, P = pred.shape
    row_loss = _alloc.empty(N, dtype=torch.float32, device=pred.device)
    grad = _alloc.empty_like(pred) if write_grad else None
    candidates = _configs(P)
    if triton_interpret():
        rows, block, single, warps = candidates[0]
        candidates = [(min(rows, 4), block, single, warps)]  # the interpreter's cost grows with the tile
    key = ("fwd", P, pred.dtype, target.dtype, mask is not None, norm_pix, write_grad, pred.device.index)
    launch = lambda cfg: _launch_fwd(cfg, pred, target, mask, count, grad, row_loss, norm_pix, eps, write_grad)  # noqa: E731
    launch(_pick(key, candidates, launch))
    return row_loss, grad


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, mask) -> None:
    """grad (contiguous [N, P]) *= grad_output on counted rows, in place."""
    N, P = grad.shape
    block = min(triton.next_power_of_2(P), 1024)
    rows = 4 if triton_interpret() else 8  # 8 rows a program: few programs when grad_output == 1 (all return)
    _masked_patch_loss_scale_grad_kernel[(triton.cdiv(N, rows),)](
        grad, grad_output, mask if mask is not None else grad_output, N,
        P=P, HAS_MASK=mask is not None, ROWS=rows, BLOCK_P=block, num_warps=8 if rows * block >= 4096 else 4,
    )
