"""Triton kernels of masked_patch_loss: the forward with fused gradient, and the backward's scaling.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed.

Two forward variants (``forward(..., variant=)``: backends "triton" and "triton:v2" of masked_patch_loss.py):
- "v1": ROWS rows per program, the row held as one tile of next_power_of_2(P) columns (P = 1176 -> 2048,
  43% of the tile masked off); rows longer than MAX_SINGLE_TILE loop over column blocks.
- "v2": the row held as a head tile of the largest power of two <= P plus a tail tile of
  next_power_of_2(P - head) (1176 -> 1024 + 256 = 1280 lanes, 8% masked off), in a persistent grid of
  about SMs x k programs that loop over row blocks (or one program per row block, per candidate). Rows longer
  than MAX_SINGLE_TILE are v1's only (:func:`v2_fits`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc, tuning
from ..tuning import interpret as triton_interpret

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
    weight,            # float: scales the loss and the gradient (masked_patch_loss's weight=)
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
    inv = weight / (count * P)
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
def _masked_patch_loss_fwd_v2_kernel(
    pred_ptr,          # [N, P] pred, contiguous
    target_ptr,        # [N, P] target, contiguous
    mask_ptr,          # [N] uint8, 1 = counted (unused without HAS_MASK)
    count_ptr,         # [1] int32 number of counted rows (unused without HAS_MASK)
    grad_ptr,          # [N, P] out, contiguous: d loss / d pred (unused without WRITE_GRAD)
    row_loss_ptr,      # [N] out float32: sum_p (pred - t)^2 / (count * P)
    N,
    eps,
    weight,            # float: scales the loss and the gradient (masked_patch_loss's weight=)
    P: tl.constexpr,
    HEAD: tl.constexpr,  # largest power of two <= P: columns [0, HEAD), all inside the row
    TAIL: tl.constexpr,  # next_power_of_2(P - HEAD), 0 when P == HEAD: columns [HEAD, HEAD + TAIL), masked at P
    HAS_MASK: tl.constexpr, NORM_PIX: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ROWS: tl.constexpr,        # rows per block of work
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop over row blocks (1: none)
):
    """Program i handles row blocks i, i + num_programs, ... (a persistent grid when num_programs is small).
    Rows not counted load nothing and write zeros."""
    if HAS_MASK:
        count = tl.maximum(tl.load(count_ptr), 1).to(tl.float32)
    else:
        count = N * 1.0
    inv = weight / (count * P)
    ch = tl.arange(0, HEAD)
    n_blocks = tl.cdiv(N, ROWS)
    for blk in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = (blk * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # int64: row * P can pass 2^31
        row_ok = rows < N
        if HAS_MASK:
            counted = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
        else:
            counted = row_ok
        p_rows = pred_ptr + rows[:, None] * P
        t_rows = target_ptr + rows[:, None] * P
        g_rows = grad_ptr + rows[:, None] * P
        ld_h = counted[:, None] & (ch[None, :] < HEAD)
        th = tl.load(t_rows + ch[None, :], mask=ld_h, other=0.0).to(tl.float32)
        ph = tl.load(p_rows + ch[None, :], mask=ld_h, other=0.0).to(tl.float32)
        if TAIL > 0:
            ct = HEAD + tl.arange(0, TAIL)
            col_ok_t = ct[None, :] < P
            ld_t = counted[:, None] & col_ok_t
            tt = tl.load(t_rows + ct[None, :], mask=ld_t, other=0.0).to(tl.float32)
            pt = tl.load(p_rows + ct[None, :], mask=ld_t, other=0.0).to(tl.float32)
        if NORM_PIX:
            s = tl.sum(th, axis=1)
            if TAIL > 0:
                s += tl.sum(tt, axis=1)
            mean = s / P
            dev_h = tl.where(ld_h, th - mean[:, None], 0.0)
            s2 = tl.sum(dev_h * dev_h, axis=1)
            if TAIL > 0:
                dev_t = tl.where(ld_t, tt - mean[:, None], 0.0)
                s2 += tl.sum(dev_t * dev_t, axis=1)
            rstd = 1.0 / tl.sqrt(s2 / (P - 1) + eps)  # unbiased, as MAE
            th = dev_h * rstd[:, None]
            if TAIL > 0:
                tt = dev_t * rstd[:, None]
        diff_h = tl.where(ld_h, ph - th, 0.0)
        acc = tl.sum(diff_h * diff_h, axis=1)
        if WRITE_GRAD:
            # d/dpred (pred - t)^2 / (count * P) = 2 (pred - t) / (count * P); zero on uncounted rows
            tl.store(g_rows + ch[None, :], (2.0 * inv * diff_h).to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (ch[None, :] < HEAD))
        if TAIL > 0:
            diff_t = tl.where(ld_t, pt - tt, 0.0)
            acc += tl.sum(diff_t * diff_t, axis=1)
            if WRITE_GRAD:
                tl.store(g_rows + ct[None, :], (2.0 * inv * diff_t).to(grad_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & col_ok_t)
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


def head_tail(P: int):
    """(HEAD, TAIL) of the v2 row tile: the largest power of two <= P and next_power_of_2(P - HEAD) (0 when P
    is a power of two). 1176 -> (1024, 256): 1280 lanes for 1176 values."""
    head = 1 << (P.bit_length() - 1)
    return head, (triton.next_power_of_2(P - head) if P > head else 0)


def _configs_v2(P: int):
    """Candidate (ROWS, num_warps, programs per SM (0: one program per row block), NUM_STAGES) of the v2 kernel
    for rows of P <= MAX_SINGLE_TILE elements; the first is the default (MOCA_KERNELS_AUTOTUNE=0, interpreter)."""
    head, tail = head_tail(P)
    width = head + tail
    rows = 1 << (max(1, min(16, 6144 // width)).bit_length() - 1)  # 1280 lanes -> 4 rows (5120 values a tile)
    warps = 8 if rows * width >= 4096 else 4
    # sm_90a, P = 1176 bf16 (triton 3.9): 64 registers at (4 rows, 8 warps) -> 4 programs resident per SM; the
    # pipelined loop (cp.async through shared memory) takes 80 -> 3.
    out = [(rows, warps, 4, 1), (rows, warps, 0, 1), (max(1, rows // 2), 4, 8, 1), (rows, warps, 3, 2)]
    if 2 * rows * width <= 2 * MAX_SINGLE_TILE:
        out.append((2 * rows, 8, 2, 1))
    return list(dict.fromkeys(out))


_SMS = {}


def _sm_count(device: torch.device) -> int:
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def _launch_fwd(cfg, pred, target, mask, count, grad, row_loss, norm_pix, eps, write_grad, weight=1.0):
    rows, block, single, warps = cfg
    N, P = pred.shape
    _masked_patch_loss_fwd_kernel[(triton.cdiv(N, rows),)](
        pred, target, mask if mask is not None else row_loss, count if count is not None else row_loss,
        grad if grad is not None else row_loss, row_loss, N, eps, weight,
        P=P, HAS_MASK=mask is not None, NORM_PIX=norm_pix, WRITE_GRAD=write_grad,
        ROWS=rows, BLOCK_P=block, SINGLE_TILE=single, num_warps=warps,
    )


def _launch_fwd_v2(cfg, pred, target, mask, count, grad, row_loss, norm_pix, eps, write_grad, weight=1.0):
    rows, warps, per_sm, stages = cfg
    N, P = pred.shape
    head, tail = head_tail(P)
    n_blocks = triton.cdiv(N, rows)
    if triton_interpret():
        grid = min(n_blocks, 2)  # few programs, so the loop over row blocks wraps in small tests
    else:
        grid = n_blocks if per_sm == 0 else min(n_blocks, per_sm * _sm_count(pred.device))
    _masked_patch_loss_fwd_v2_kernel[(grid,)](
        pred, target, mask if mask is not None else row_loss, count if count is not None else row_loss,
        grad if grad is not None else row_loss, row_loss, N, eps, weight,
        P=P, HEAD=head, TAIL=tail, HAS_MASK=mask is not None, NORM_PIX=norm_pix, WRITE_GRAD=write_grad,
        ROWS=rows, NUM_STAGES=stages, num_warps=warps,
    )


def v2_fits(P: int) -> bool:
    """Whether the v2 kernel takes rows of P values (held whole in registers)."""
    return triton.next_power_of_2(P) <= MAX_SINGLE_TILE


def forward(pred: torch.Tensor, target: torch.Tensor, mask, count, norm_pix: bool, eps: float,
            write_grad: bool, variant: str = "v1", weight: float = 1.0):
    """Returns (row_loss float32 [N], grad [N, P] or None), both scaled by weight. pred and target are made
    contiguous.
    variant: "v1" or "v2" (see the module docstring; v2 only where :func:`v2_fits`)."""
    if variant not in ("v1", "v2"):
        raise ValueError(f"masked_patch_loss triton: unknown kernel variant {variant!r}; expected 'v1' or 'v2'")
    if variant == "v2" and not v2_fits(pred.shape[1]):
        raise ValueError(f"masked_patch_loss triton: the v2 kernel takes rows of at most {MAX_SINGLE_TILE} values, "
                         f"got P = {pred.shape[1]}")
    pred, target = pred.contiguous(), target.contiguous()
    N, P = pred.shape
    row_loss = _alloc.empty(N, dtype=torch.float32, device=pred.device)
    grad = _alloc.empty_like(pred) if write_grad else None
    if variant == "v2":
        candidates, launch_fn = _configs_v2(P), _launch_fwd_v2
        if triton_interpret():
            rows, warps, per_sm, stages = candidates[0]
            candidates = [(min(rows, 4), warps, per_sm, stages)]
    else:
        candidates, launch_fn = _configs(P), _launch_fwd
        if triton_interpret():
            rows, block, single, warps = candidates[0]
            candidates = [(min(rows, 4), block, single, warps)]  # the interpreter's cost grows with the tile
    key = ("masked_patch_loss", "fwd", variant, P, pred.dtype, target.dtype, mask is not None, norm_pix, write_grad,
           pred.device.index)
    def launch(cfg):
        launch_fn(cfg, pred, target, mask, count, grad, row_loss, norm_pix, eps, write_grad, weight)
    launch(tuning.pick(key, candidates, launch, warmup=5, rep=20))
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
