"""CUDA C++ launchers of masked_patch_loss (``csrc/masked_patch_loss.cu``, through ``moca_kernels._C``).

The extension takes raw pointers, sizes, strides and a stream (``moca_kernels._ext``); tensors are checked and
laid out by ``masked_patch_loss.py`` before they get here. Kernel variants: the launcher's ``variant`` code
(``VARIANT_CODES``).
"""

from __future__ import annotations

import torch

from .. import _alloc, _ext

VARIANT_CODES = {"v1": 1, "v2": 2, "v2p": 3}


def forward(pred: torch.Tensor, target: torch.Tensor, mask_u8, count, norm_pix: bool, eps: float, write_grad: bool,
            variant: str = "v1", weight: float = 1.0):
    """Returns (row_loss float32 [N], grad [N, P] or None), both scaled by weight. pred and target: [N, P] of one
    dtype, unit stride along P; mask_u8: uint8 [N] or None; count: int32 [1] (counted rows) or None."""
    if variant not in VARIANT_CODES:
        raise ValueError(f"masked_patch_loss cuda: unknown kernel variant {variant!r}; expected one of "
                         f"{list(VARIANT_CODES)}")
    N, P = pred.shape
    row_loss = _alloc.empty(N, dtype=torch.float32, device=pred.device)
    grad = _alloc.empty_like(pred) if write_grad else None
    status = _ext.module().masked_patch_loss_fwd(
        pred.data_ptr(), target.data_ptr(), mask_u8.data_ptr() if mask_u8 is not None else 0,
        count.data_ptr() if count is not None else 0, grad.data_ptr() if grad is not None else 0, row_loss.data_ptr(),
        N, P, pred.stride(0), target.stride(0), grad.stride(0) if grad is not None else 0,
        _ext.dtype_code(pred), eps, norm_pix, write_grad, _ext.stream_handle(pred.device), VARIANT_CODES[variant],
        weight)
    _ext.check_launch("masked_patch_loss_fwd", status)
    return row_loss, grad


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, mask_u8) -> None:
    """grad ([N, P]) *= grad_output (float32 [1]) on counted rows, in place."""
    N, P = grad.shape
    status = _ext.module().masked_patch_loss_scale_grad(
        grad.data_ptr(), grad_output.data_ptr(), mask_u8.data_ptr() if mask_u8 is not None else 0, N, P,
        grad.stride(0), _ext.dtype_code(grad), _ext.stream_handle(grad.device))
    _ext.check_launch("masked_patch_loss_scale_grad", status)
