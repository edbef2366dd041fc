"""masked_patch_loss: the MAE reconstruction loss of MoCa's Stage 1, fused into one pass.

loss = sum over counted rows r and columns p of (pred[r, p] - t[r, p])^2 / (n_counted * P), where t is the
target, or with ``norm_pix`` its per-row normalisation (target - mean) / sqrt(var_unbiased + eps).

The fast backends (cuda, triton) read pred and target once and, when pred needs a gradient, write
d loss / d pred = 2 (pred - t) / (n_counted * P) in the same pass; rows not counted get a zero gradient
without being read. Backward then only scales the saved gradient by grad_output, and skips even that when
grad_output is 1 (a plain ``loss.backward()``), so forward + backward moves each byte once.

Kernel variants, each a backend of the op (``moca_kernels.dispatch``): ``v1`` (the default, what ``"cuda"`` and
``"triton"`` run) is the original kernel of each backend; ``"cuda:v2"`` is persistent warps over rows with exact
per-lane pack counts, ``"cuda:v2p"`` the same with a next-row prefetch; ``"triton:v2"`` a head + tail row tile
in persistent programs (rows of at most ``masked_patch_loss_triton.MAX_SINGLE_TILE`` values). The variants
compute the same values; v1 stays the default until a GPU run shows which is fastest
(bench/bench_masked_patch_loss.py --quick times them side by side). The CUDA launchers are in
``masked_patch_loss_cuda.py``, the Triton kernels in ``masked_patch_loss_triton.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import reference
from .._checks import (KERNEL_DTYPES, check_bool, check_float, check_ndim, check_nonempty, check_real,
                       check_same_device, check_tensor)
from ..dispatch import Backend, Op, cuda_ext_reasons, triton_import_error, triton_reasons, variant_backends

_NAME = "masked_patch_loss"

# Kernel variants per backend; the first is the default (flip after a GPU measurement).
VARIANTS = {"cuda": ("v1", "v2", "v2p"), "triton": ("v1", "v2")}


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      norm_pix: bool = False, eps: float = 1e-6, impl: Optional[str] = None,
                      weight: float = 1.0) -> torch.Tensor:
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
        impl: "cuda", "triton", "torch" or None (automatic; see moca_kernels.dispatch), or a kernel variant:
            "cuda:v2", "cuda:v2p", "triton:v2" (module docstring).
        weight: a finite float (default 1.0) multiplied into the loss and, inside the same pass, into the fused
            gradient: ``masked_patch_loss(..., weight=0.1)`` equals ``0.1 * masked_patch_loss(...)`` without the
            extra pass over the [N, P] gradient that the product costs in backward.

    Returns:
        float32 scalar: weight times the mean over counted rows and over P of the squared error (float64 on the
        torch backend for float64 inputs). With no counted row the loss is 0 and every gradient is 0.

    Gradients flow to ``pred`` (the cuda and triton backends differentiate pred only; a target that requires
    grad is sent to the torch backend). Backward may run once per forward: the fused gradient buffer is
    handed to autograd by the first backward, so a second backward through the same graph raises.
    """
    norm_pix, eps = _validate(pred, target, mask, norm_pix, eps)
    _check_weight(weight)
    return _OP(impl, pred=pred, target=target, mask=mask, norm_pix=norm_pix, eps=eps, weight=float(weight))


def _check_weight(weight) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{_NAME}: weight must be a float (the loss's scale factor), got {type(weight).__name__}")
    if not math.isfinite(weight):
        raise ValueError(f"{_NAME}: weight must be finite, got {weight}")


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
           weight: float, backend: str, variant: str, write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight * loss float32 [], its grad [N, P] of pred's dtype, or an empty tensor without write_grad)."""
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    target = target if target.stride(-1) == 1 else target.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    count = mask.sum(dtype=torch.int32).reshape(1) if mask is not None else None
    if backend == "triton":
        from . import masked_patch_loss_triton as kernels
    else:
        from . import masked_patch_loss_cuda as kernels
    row_loss, grad = kernels.forward(pred, target, mask_u8, count, norm_pix, eps, write_grad, variant=variant,
                                     weight=weight)
    return row_loss.sum(), grad if grad is not None else pred.new_empty(0)


@_fused.register_fake
def _(pred, target, mask, norm_pix, eps, weight, backend, variant, write_grad):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape if write_grad else (0,))


@torch.library.custom_op("moca_kernels::masked_patch_loss_scale_grad", mutates_args=("grad",))
def _scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, mask: Optional[torch.Tensor], backend: str) -> None:
    """grad *= grad_output on counted rows, in place (nothing when grad_output == 1)."""
    g = grad_output.detach().to(torch.float32).reshape(1).contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    if backend == "triton":
        from . import masked_patch_loss_triton as kernels
    else:
        from . import masked_patch_loss_cuda as kernels
    kernels.scale_grad(grad, g, mask_u8)


@_scale_grad.register_fake
def _(grad, grad_output, mask, backend):
    return None


def _setup_context(ctx, inputs, output):
    _, _, mask, _, _, _, backend, _, write_grad = inputs
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
        return None, None, None, None, None, None, None, None, None
    _scale_grad(grad, grad_loss, mask, ctx.backend)
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("moca_kernels::masked_patch_loss_fused", _backward, setup_context=_setup_context)


def _run_fused(backend):
    def make(variant):
        def run(pred, target, mask, norm_pix, eps, weight=1.0):
            write_grad = torch.is_grad_enabled() and pred.requires_grad
            loss, _ = _fused(pred, target, mask, norm_pix, eps, weight, backend, variant["fwd"], write_grad)
            return loss
        return run
    return make


def _kernel_reasons(pred, target):
    why = []
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in KERNEL_DTYPES:
            why.append(f"{name} is {t.dtype}; the fused kernels take float32, float16 and bfloat16")
    if target.requires_grad and torch.is_grad_enabled():
        why.append("target requires grad; the fused kernels differentiate pred only")
    return why


def _cuda_reasons(pred, target, mask, norm_pix, eps, weight=1.0):
    why = cuda_ext_reasons(pred, target, mask) + _kernel_reasons(pred, target)
    if pred.dtype != target.dtype:
        why.append(f"pred ({pred.dtype}) and target ({target.dtype}) differ in dtype; the cuda kernel takes one")
    return why


def _triton_reasons(pred, target, mask, norm_pix, eps, weight=1.0):
    return triton_reasons(pred, target, mask) + _kernel_reasons(pred, target)


def _triton_v2_reasons(pred, **_):
    if triton_import_error():   # the backend's own reasons say so
        return []
    from . import masked_patch_loss_triton as kernels

    if not kernels.v2_fits(pred.shape[1]):
        return [f"rows of P = {pred.shape[1]} values are longer than the v2 kernel's single tile "
                f"({kernels.MAX_SINGLE_TILE}); v1 loops over column blocks"]
    return []


_OP = Op(_NAME, [
    *variant_backends("cuda", {"fwd": {v: None for v in VARIANTS["cuda"]}}, {"fwd": "v1"}, _cuda_reasons,
                      _run_fused("cuda")),
    *variant_backends("triton", {"fwd": {"v1": None, "v2": _triton_v2_reasons}}, {"fwd": "v1"}, _triton_reasons,
                      _run_fused("triton")),
    Backend("torch", lambda **_: [], reference.masked_patch_loss),
])
