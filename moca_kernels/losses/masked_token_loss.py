"""masked_token_loss: cross-entropy of hidden @ weight.T (+ bias) over the vocabulary at masked positions.

The torch backend is ``reference.masked_token_loss`` (chunked, checkpointed). Fast backends: see its issue.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import check_float, check_int, check_ndim, check_same_device, check_tensor
from ..dispatch import Backend, Op

_NAME = "masked_token_loss"
_REDUCTIONS = ("mean", "sum", "none")


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                      impl: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of the LM head's logits at rows whose label is not ``ignore_index``.

    Args:
        hidden: [N, H] float32 / float16 / bfloat16, final hidden states.
        weight: [V, H], same dtype, the LM head (may be tied to the input embedding).
        labels: [N] integer, the token to predict per row, or ``ignore_index``.
        bias: [V] or None.
        reduction: "mean" over counted rows (0 when none), "sum", or "none" ([N] float32, 0 at ignored rows).
        impl: "cuda", "triton", "torch" or None (automatic).

    Returns:
        float32 scalar (or [N] with reduction="none"); with every label ignored the loss is 0 and gradients 0.
    """
    _validate(hidden, weight, labels, bias, ignore_index, reduction)
    return _OP(impl, hidden=hidden, weight=weight, labels=labels, bias=bias, ignore_index=int(ignore_index),
               reduction=reduction)


def _validate(hidden, weight, labels, bias, ignore_index, reduction) -> None:
    check_float("hidden", hidden, _NAME)
    check_float("weight", weight, _NAME)
    check_int("labels", labels, _NAME)
    check_ndim("hidden", hidden, 2, _NAME, "[N, H]")
    check_ndim("weight", weight, 2, _NAME, "[V, H]")
    check_ndim("labels", labels, 1, _NAME, "[N]")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{_NAME}: weight is [V, H] = {tuple(weight.shape)} but hidden has H = {hidden.shape[1]}")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{_NAME}: labels has {labels.shape[0]} rows, hidden has {hidden.shape[0]}")
    if hidden.shape[0] == 0 or hidden.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"{_NAME}: empty input (hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})")
    if bias is not None:
        check_float("bias", bias, _NAME)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{_NAME}: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_NAME}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(_NAME, hidden=hidden, weight=weight, labels=labels, bias=bias)
    V = weight.shape[0]
    counted = labels[labels != ignore_index]
    if counted.numel() and bool(((counted < 0) | (counted >= V)).any()):  # one host sync
        bad = counted[(counted < 0) | (counted >= V)][0].item()
        raise ValueError(f"{_NAME}: label {bad} is outside the vocabulary [0, {V}) and is not ignore_index={ignore_index}")


_OP = Op(_NAME, [
    Backend("torch", lambda **_: [], reference.masked_token_loss),
])
