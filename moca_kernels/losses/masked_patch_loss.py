"""masked_patch_loss: the MAE reconstruction loss of MoCa's Stage 1, fused into one pass.

loss = sum over counted rows r and columns p of (pred[r, p] - t[r, p])^2 / (n_counted * P), where t is the
target, or with ``norm_pix`` its per-row normalisation (target - mean) / sqrt(var_unbiased + eps).

The fast backends (cuda, triton) read pred and target once and, when pred needs a gradient, write
d loss / d pred = 2 (pred - t) / (n_counted * P) in the same pass; rows not counted get a zero gradient
without being read. Backward then only scales the saved gradient by grad_output, and skips even that when
grad_output is 1 (a plain ``loss.backward()``), so forward + backward moves each byte once.

Kernel variants (environment variable ``MOCA_MPL_KERNEL``, read at every call; see :func:`kernel_variant`):
``v1`` (the default) is the original kernel of each backend; ``v2`` is persistent warps over rows with exact
per-lane pack counts (cuda) or a head + tail row tile in persistent programs (triton); ``v2p`` adds a next-row
prefetch to the cuda v2 (triton treats it as v2). The variants compute the same values; v1 stays the default
until a GPU run shows which is fastest (bench/bench_masked_patch_loss.py --quick times them side by side).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _alloc, _ext, reference
from .._checks import (KERNEL_DTYPES, check_bool, check_float, check_ndim, check_nonempty, check_real,
                       check_same_device, check_tensor)
from ..dispatch import Backend, Op, cuda_ext_reasons, env_variant, triton_reasons

_NAME = "masked_patch_loss"

# Kernel variants per backend (MOCA_MPL_KERNEL); cuda's values are the launcher's `variant` argument.
VARIANTS = {"cuda": {"v1": 1, "v2": 2, "v2p": 3}, "triton": {"v1": "v1", "v2": "v2", "v2p": "v2"}}
# What each backend runs when MOCA_MPL_KERNEL does not name a variant for it (flip after a GPU measurement).
DEFAULT_VARIANT = {"cuda": "v1", "triton": "v1"}


def kernel_variant(backend: str) -> str:
    """The kernel variant ("v1", "v2" or "v2p") that ``MOCA_MPL_KERNEL`` selects for ``backend`` ("cuda" or
    "triton"), read from the environment at each call.

    ``MOCA_MPL_KERNEL`` unset or empty: ``DEFAULT_VARIANT[backend]`` ("v1" for both until measured). One name
    ("v1", "v2", "v2p") applies to both backends; per backend, e.g. ``cuda=v2p,triton=v2`` (a backend not named
    gets its default). Raises ValueError on anything else.
    """
    return env_variant("MOCA_MPL_KERNEL", backend, sorted(VARIANTS[backend]), DEFAULT_VARIANT, _NAME)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      norm_pix: bool = False, eps: float = 1e-6, impl: Optional[str] = None) -> torch.Tensor:
    """Masked mean-squared reconstruction loss over patch rows (MAE).

    Args:
        pred: [N, P] float32 / float16 / bfloat16, the predicted pixel rows (N rows of P values; P = 1176 for
            Qwen2-VL patches, 4 * 1176 per merged image token).
        target: [N, P] float32 / float16 / bfloat16, the original pixel rows (may differ in dtype from pred
            on the triton and torch backends).
        mask: bool [N] or None. True = the row is reconstructed and counted; None counts every row. The cuda
            and triton kernels never read rows not counted; on the torch backend a NaN or inf there still
            makes the loss NaN.
        norm_pix: bool; compare with the per-row normalised target (target - mean) / sqrt(var + eps), var
            unbiased.
        eps: a finite real number >= 0 added to the variance under ``norm_pix`` (None, a bool, a string, inf or
            NaN raise). With eps > 0 a constant target row normalises to zeros; with eps = 0 it divides 0
            by 0 (NaN or inf).
        impl: "cuda", "triton", "torch" or None (automatic; see moca_kernels.dispatch). The cuda and triton
            kernel variant comes from the environment variable MOCA_MPL_KERNEL (see :func:`kernel_variant`).

    Returns:
        float32 scalar: the mean over counted rows and over P of the squared error (float64 on the torch
        backend for float64 inputs). With no counted row the loss is 0 and every gradient is 0.

    Gradients flow to ``pred`` (the cuda and triton backends differentiate pred only; a target that requires
    grad is sent to the torch backend). Backward may run once per forward: the fused gradient buffer is
    handed to autograd by the first backward, so a second backward through the same graph raises.
    """
    norm_pix, eps = _validate(pred, target, mask, norm_pix, eps)
    return _OP(impl, pred=pred, target=target, mask=mask, norm_pix=norm_pix, eps=eps)


def _validate(pred, target, mask, norm_pix, eps) -> Tuple[bool, float]:
    """Checks that need no look at the data; returns (norm_pix, eps) as a bool and a float."""
    norm_pix = check_bool("norm_pix", norm_pix, _NAME)
    eps = check_real("eps", eps, _NAME, finite=False)
    check_float("pred", pred, _NAME)
    check_float("target", target, _NAME)
    check_ndim("pred", pred, 2, _NAME, "[N, P]")
    if target.shape != pred.shape:
        raise ValueError(f"{_NAME}: target shape {tuple(target.shape)} differs from pred shape {tuple(pred.shape)}")
    check_nonempty(_NAME, pred=pred)
    if mask is not None:
        check_tensor("mask", mask, _NAME)
        if mask.dtype != torch.bool:
            raise TypeError(f"{_NAME}: mask must be a bool tensor [N] (True = counted row), got {mask.dtype}")
        if mask.shape != (pred.shape[0],):
            raise ValueError(f"{_NAME}: mask must have shape [{pred.shape[0]}] (one flag per row), got {tuple(mask.shape)}")
    check_same_device(_NAME, pred=pred, target=target, mask=mask)
    if norm_pix and pred.shape[1] < 2:
        raise ValueError(f"{_NAME}: norm_pix needs P >= 2 values per row (unbiased variance), got P = {pred.shape[1]}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{_NAME}: eps must be >= 0 and finite, got {eps}")
    return norm_pix, eps


# ---------------------------------------------------------------------------------------------------------
# Fused op (cuda / triton) as a torch.library custom op, so torch.compile sees through it.
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moca_kernels::masked_patch_loss_fused", mutates_args=())
def _fused(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], norm_pix: bool, eps: float,
           backend: str, write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss float32 [], grad [N, P] of pred's dtype, or an empty tensor without write_grad)."""
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    target = target if target.stride(-1) == 1 else target.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    count = mask.sum(dtype=torch.int32).reshape(1) if mask is not None else None
    variant = kernel_variant(backend)
    if backend == "triton":
        from . import masked_patch_loss_triton as kernels

        row_loss, grad = kernels.forward(pred, target, mask_u8, count, norm_pix, eps, write_grad,
                                         variant=VARIANTS["triton"][variant])
    else:
        row_loss, grad = _cuda_forward(pred, target, mask_u8, count, norm_pix, eps, write_grad,
                                       variant=VARIANTS["cuda"][variant])
    return row_loss.sum(), grad if grad is not None else pred.new_empty(0)


@_fused.register_fake
def _(pred, target, mask, norm_pix, eps, backend, write_grad):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape if write_grad else (0,))


@torch.library.custom_op("moca_kernels::masked_patch_loss_scale_grad", mutates_args=("grad",))
def _scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, mask: Optional[torch.Tensor], backend: str) -> None:
    """grad *= grad_output on counted rows, in place (nothing when grad_output == 1)."""
    g = grad_output.detach().to(torch.float32).reshape(1).contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    if backend == "triton":
        from . import masked_patch_loss_triton as kernels

        kernels.scale_grad(grad, g, mask_u8)
    else:
        N, P = grad.shape
        mod = _ext.module()
        status = mod.masked_patch_loss_scale_grad(
            grad.data_ptr(), g.data_ptr(), mask_u8.data_ptr() if mask_u8 is not None else 0, N, P, grad.stride(0),
            _ext.dtype_code(grad), _ext.stream_handle(grad.device))
        _ext.check_launch("masked_patch_loss_scale_grad", status)


@_scale_grad.register_fake
def _(grad, grad_output, mask, backend):
    return None


def _setup_context(ctx, inputs, output):
    _, _, mask, _, _, backend, write_grad = inputs
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])
    # Without this, autograd hands backward a zero-filled [N, P] "gradient" of the internal gradient output:
    # a whole extra buffer and a fill pass (seen on an H100 as +0.58 GiB and ~0.27 ms at N=262144, P=1176).
    ctx.set_materialize_grads(False)
    # The fused gradient is kept in a one-item list, not save_for_backward: backward hands the buffer itself to
    # autograd, and with no other reference left AccumulateGrad adopts it instead of copying it (a copy would
    # re-read and re-write the whole [N, P] buffer and double the memory).
    ctx.grad_box = [output[1]]
    ctx.save_for_backward(mask)


def _backward(ctx, grad_loss, _grad_of_grad):
    (mask,) = ctx.saved_tensors
    if not ctx.grad_box:
        raise RuntimeError(f"{_NAME}: backward ran twice through one forward; the fused gradient is consumed by the "
                           "first backward (compute the loss again, or use impl='torch' for retain_graph)")
    grad = ctx.grad_box.pop()
    if grad.numel() == 0:
        raise RuntimeError(f"{_NAME}: backward through a forward that ran without grad enabled for pred")
    if grad_loss is None:  # the loss took no part in what is differentiated
        return None, None, None, None, None, None, None
    _scale_grad(grad, grad_loss, mask, ctx.backend)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("moca_kernels::masked_patch_loss_fused", _backward, setup_context=_setup_context)


def _cuda_forward(pred, target, mask_u8, count, norm_pix, eps, write_grad, variant=1):
    N, P = pred.shape
    row_loss = _alloc.empty(N, dtype=torch.float32, device=pred.device)
    grad = _alloc.empty_like(pred) if write_grad else None
    status = _ext.module().masked_patch_loss_fwd(
        pred.data_ptr(), target.data_ptr(), mask_u8.data_ptr() if mask_u8 is not None else 0,
        count.data_ptr() if count is not None else 0, grad.data_ptr() if grad is not None else 0, row_loss.data_ptr(),
        N, P, pred.stride(0), target.stride(0), grad.stride(0) if grad is not None else 0,
        _ext.dtype_code(pred), eps, norm_pix, write_grad, _ext.stream_handle(pred.device), variant)
    _ext.check_launch("masked_patch_loss_fwd", status)
    return row_loss, grad


def _run_fused(backend):
    def run(pred, target, mask, norm_pix, eps):
        write_grad = torch.is_grad_enabled() and pred.requires_grad
        loss, _ = _fused(pred, target, mask, norm_pix, eps, backend, write_grad)
        return loss
    return run


def _kernel_reasons(pred, target):
    why = []
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in KERNEL_DTYPES:
            why.append(f"{name} is {t.dtype}; the fused kernels take float32, float16 and bfloat16")
    if target.requires_grad and torch.is_grad_enabled():
        why.append("target requires grad; the fused kernels differentiate pred only")
    return why


def _cuda_reasons(pred, target, mask, norm_pix, eps):
    why = cuda_ext_reasons(pred, target, mask) + _kernel_reasons(pred, target)
    if pred.dtype != target.dtype:
        why.append(f"pred ({pred.dtype}) and target ({target.dtype}) differ in dtype; the cuda kernel takes one")
    return why


def _triton_reasons(pred, target, mask, norm_pix, eps):
    return triton_reasons(pred, target, mask) + _kernel_reasons(pred, target)


_OP = Op(_NAME, [
    Backend("cuda", _cuda_reasons, _run_fused("cuda")),
    Backend("triton", _triton_reasons, _run_fused("triton")),
    Backend("torch", lambda **_: [], reference.masked_patch_loss),
])
