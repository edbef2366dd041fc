"""masked_token_loss: cross-entropy of hidden @ weight.T (+ bias) over the vocabulary at masked positions.

MoCa's Stage 1 predicts each masked token at its own position through the LM head (V = 151936 for Qwen2.5-VL).
The fused backend never materialises the [N, V] logits: rows whose label is ``ignore_index`` are dropped
first (they cost nothing), a Triton forward keeps an online log-sum-exp per row over vocabulary tiles, and
the backward recomputes the logit tiles from the saved log-sum-exp, one vocabulary chunk at a time
(``masked_token_loss_triton`` explains the passes and the memory). The torch backend is
``reference.masked_token_loss`` (chunked and checkpointed, so also O(chunk x V) memory).

The fused op is a ``torch.library.custom_op`` (forward and backward each), so ``torch.compile`` traces
through it; the reduction is plain torch on its per-row output.

Kernel variants of the triton backend, each a backend of the op (``moca_kernels.dispatch``): parts "fwd" (the
log-sum-exp forward) and "grad" (the backward's G kernel), each ``v1`` (default) | ``v2`` | ``v3``
(``masked_token_loss_triton`` describes them): ``impl="triton:v3"`` runs v3 for both, ``"triton:fwd.v3+grad.v2"``
one per kernel, ``"triton:grad.v3"`` the default forward with the v3 G kernel. The backward's variant is fixed
when the forward runs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .. import reference
from .._checks import KERNEL_DTYPES, check_float, check_int, check_int_value, check_ndim, check_same_device
from ..dispatch import Backend, Op, triton_import_error, triton_reasons, variant_backends

_NAME = "masked_token_loss"
_REDUCTIONS = ("mean", "sum", "none")


def masked_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                      impl: Optional[str] = None, shift: Union[bool, int] = False,
                      filter_eps: Union[None, float, str] = None) -> torch.Tensor:
    """Cross-entropy of the LM head's logits at rows whose label is not ``ignore_index``.

    loss[r] = logsumexp_v(logits[r, v]) - logits[r, labels[r]],  logits = hidden @ weight.T (+ bias),
    for every counted row r (labels[r] != ignore_index); the [N, V] logits are never held whole.

    Args:
        hidden: [N, H] (or [..., H], see below) float32 / float16 / bfloat16 (float64 on the torch backend),
            final hidden states (any strides).
        weight: [V, H], same dtype as hidden on the triton backend, the LM head. It may be tied to the input
            embedding (its gradient adds to the embedding's through autograd) and may be a view with any
            strides (e.g. the transpose of an [H, V] tensor).
        labels: [N] (or [...]) int64 / int32 / int16 / int8 / uint8, the token to predict at each row, or
            ``ignore_index``.
            Any other value outside [0, V) raises ValueError; a float or bool tensor raises TypeError.
        bias: [V] float32 / float16 / bfloat16 (need not match hidden's dtype; any stride) or None.
        ignore_index: int, the label value of rows that are skipped (not counted, zero gradient). None, a bool
            or a float (1.5 would be truncated) raises TypeError.
        reduction: "mean" over counted rows, "sum", or "none" ([N], 0 at ignored rows).
        impl: "triton", "torch" or None (automatic: triton where it can run, i.e. CUDA tensors, or CPU tensors
            under TRITON_INTERPRET=1; torch otherwise), or a triton kernel variant such as "triton:v3" or
            "triton:fwd.v3+grad.v2" (module docstring).
        shift: next-token prediction on unshifted labels (Cut Cross-Entropy's ``shift``): True or an int s >= 1
            makes hidden[..., t, :] predict labels[..., t + s] along the last label axis (the sequence), so
            the last s positions of each sequence predict nothing; False / 0 (default) predicts labels[..., t].
        filter_eps: None (default): exact gradients. A float > 0, or "auto" (Cut Cross-Entropy's rule:
            ``torch.finfo(hidden.dtype).eps / 32``, 2^-12 for bfloat16, 2^-15 for float16, 2^-28 for float32):
            the backward drops every logit tile (the kernel's BLOCK_M counted rows x BLOCK_V columns; 128 x 128
            on the torch backend) whose |softmax - onehot| stays below it, with the vocabulary taken in Cut
            Cross-Entropy's order (sorted by average logit), as its gradient filter does, and multiplies only
            the vocabulary columns of kept tiles in its GEMMs (one host synchronisation per vocabulary chunk).
            The loss is unchanged; each dropped gradient entry is below filter_eps times the row's d out / d loss
            (bench/NOTES.md, "Gradient filter", has the measured error).

    Leading dimensions (Cut Cross-Entropy's and torch's ``linear_cross_entropy`` conventions): hidden may be
    [..., H] with labels [...] (e.g. [B, S, H] and [B, S]); the rows are flattened (a view where the strides
    allow) and ``reduction="none"`` returns labels' shape, [..., S - s] with a shift of s. Positional order
    matches ``cut_cross_entropy.linear_cross_entropy(e, c, targets)`` and
    ``torch.nn.functional.linear_cross_entropy(input, linear_weight, target)``; the module form is
    :class:`MaskedTokenLoss`.

    Returns:
        float32 scalar, or float32 [N] (labels' shape, see above) with reduction="none" (float64 on the torch
        backend for float64 inputs). With every label ignored the loss is 0 (also for "mean") and every
        gradient is 0, never NaN.

    Gradients flow to hidden, weight and bias (each in its input's dtype), accumulated in float32. Shapes that
    disagree (H of hidden and weight, hidden's leading shape and labels', bias not [V]), a weight that is not
    2-D, a shift < 0 or >= the sequence length, empty inputs, tensors on different devices and an unknown
    reduction raise ValueError before any backend runs; non-float hidden / weight / bias, non-integer labels
    and a shift that is not a bool or int raise TypeError. The triton backend needs one host
    synchronisation per forward and per backward (to count the rows and check the labels).
    """
    ignore_index = _check_ignore_index(ignore_index)
    hidden, labels, out_shape = _rows(hidden, labels, shift, ignore_index)
    _validate(hidden, weight, labels, bias, reduction)
    eps = _filter_eps(filter_eps, hidden.dtype)
    if labels.dtype in (torch.uint8, torch.int8, torch.int16):
        labels = labels.long()  # labels != ignore_index in uint8 would wrap -100 to 156 and drop those rows
    loss = _OP(impl, hidden=hidden, weight=weight, labels=labels, bias=bias, ignore_index=ignore_index,
               reduction=reduction, filter_eps=eps)
    if out_shape is not None and reduction == "none":
        shape, s = out_shape
        loss = loss.reshape(shape)
        if s:
            loss = loss[..., :shape[-1] - s]
    return loss


def _rows(hidden, labels, shift, ignore_index):
    """hidden [..., H], labels [...] -> (hidden [N, H], labels [N], None or (labels' shape, shift)).

    With a shift s, labels[..., t] becomes labels[..., t + s] and the last s positions ignore_index. 2-D
    hidden with 1-D labels and no shift pass through untouched (their checks are ``_validate``'s)."""
    if isinstance(shift, bool):
        s = int(shift)
    elif isinstance(shift, int):
        s = shift
    else:
        raise TypeError(f"{_NAME}: shift must be a bool or an int >= 0, got {type(shift).__name__}")
    if s < 0:
        raise ValueError(f"{_NAME}: shift must be >= 0, got {s}")
    if not (isinstance(hidden, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return hidden, labels, None   # _validate names the culprit
    if s == 0 and hidden.dim() == 2 and labels.dim() == 1:
        return hidden, labels, None
    check_int("labels", labels, _NAME)
    if hidden.dim() < 1 or tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"{_NAME}: hidden [..., H] = {tuple(hidden.shape)} and labels [...] = "
                         f"{tuple(labels.shape)} must share their leading shape")
    shape = tuple(labels.shape)
    if s:
        if labels.dim() == 0 or shape[-1] <= s:
            raise ValueError(f"{_NAME}: shift={shift!r} needs labels [..., S] with S > {s}, got labels "
                             f"{shape}")
        pad = torch.full(shape[:-1] + (s,), int(ignore_index), dtype=torch.int64, device=labels.device)
        labels = torch.cat([labels[..., s:].long(), pad], dim=-1)
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), (shape, s)


class MaskedTokenLoss(torch.nn.Module):
    """Module form of :func:`masked_token_loss`, holding its options, to swap in where a model computes its LM
    loss (as ``cut_cross_entropy.LinearCrossEntropy`` or Liger's ``LigerFusedLinearCrossEntropyLoss`` are)::

        loss_fn = MaskedTokenLoss(shift=True)              # causal LM: hidden[t] predicts labels[t + 1]
        loss = loss_fn(hidden, model.lm_head, labels)      # hidden [B, S, H], labels [B, S]

    Args:
        ignore_index, reduction, shift, impl, filter_eps: as in :func:`masked_token_loss`, checked here.

    ``forward(hidden, lm_head, labels, bias=None)``: hidden [..., H] float; lm_head an ``nn.Linear`` (its
    weight [V, H] and bias) or a weight tensor [V, H]; labels [...] integer; bias [V] or None (not both a
    Linear with a bias and ``bias``). Returns what :func:`masked_token_loss` returns. Note the argument order:
    Liger's module takes ``(lin_weight, _input, target)``, weight first; this one takes hidden first, as Cut
    Cross-Entropy's ``LinearCrossEntropy`` does.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", shift: Union[bool, int] = False,
                 impl: Optional[str] = None, filter_eps: Union[None, float, str] = None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"MaskedTokenLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"MaskedTokenLoss: ignore_index must be an int, got {ignore_index!r}")
        if not isinstance(shift, (bool, int)) or (not isinstance(shift, bool) and shift < 0):
            raise ValueError(f"MaskedTokenLoss: shift must be a bool or an int >= 0, got {shift!r}")
        _filter_eps(filter_eps, torch.float32)   # checked here; "auto" resolves per call from hidden's dtype
        self.ignore_index, self.reduction, self.shift, self.impl = ignore_index, reduction, shift, impl
        self.filter_eps = filter_eps

    def forward(self, hidden: torch.Tensor, lm_head, labels: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(lm_head, torch.nn.Linear):
            if lm_head.bias is not None and bias is not None:
                raise ValueError("MaskedTokenLoss: lm_head is an nn.Linear with a bias and bias= was given too; "
                                 "pass one")
            weight, bias = lm_head.weight, lm_head.bias if bias is None else bias
        elif isinstance(lm_head, torch.Tensor):
            weight = lm_head
        else:
            raise TypeError(f"MaskedTokenLoss: lm_head must be an nn.Linear or a weight tensor [V, H], "
                            f"got {type(lm_head).__name__}")
        return masked_token_loss(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                 reduction=self.reduction, impl=self.impl, shift=self.shift,
                                 filter_eps=self.filter_eps)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, shift={self.shift!r}, "
                f"impl={self.impl!r}")


def _filter_eps(filter_eps, dtype: torch.dtype) -> float:
    """The gradient filter's threshold as a float (0.0 = exact) from the public argument."""
    if filter_eps is None:
        return 0.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"{_NAME}: filter_eps must be None, a float > 0 or 'auto', got {filter_eps!r}")
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"{_NAME}: filter_eps must be None, a float > 0 or 'auto', got {type(filter_eps).__name__}")
    if not (math.isfinite(filter_eps) and filter_eps > 0):
        raise ValueError(f"{_NAME}: filter_eps must be a finite float > 0 (None for exact gradients), got {filter_eps}")
    return float(filter_eps)


def _validate(hidden, weight, labels, bias, reduction) -> None:
    """Checks that need no look at the data (the label range is checked where the labels are read)."""
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
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{_NAME}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(_NAME, hidden=hidden, weight=weight, labels=labels, bias=bias)


def _check_ignore_index(ignore_index) -> int:
    """ignore_index as an int: an integer (not a bool, not 1.5, which would be truncated) within int64."""
    value = check_int_value("ignore_index", ignore_index, _NAME)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{_NAME}: ignore_index must fit in int64, got {value}")
    return value


def _check_label_range(counted_labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """ValueError naming the first counted label outside [0, V) (one host synchronisation)."""
    bad = (counted_labels < 0) | (counted_labels >= V)
    if bool(bad.any()):
        first = counted_labels[bad][0].item()
        raise ValueError(f"{_NAME}: label {first} is outside the vocabulary [0, {V}) and is not "
                         f"ignore_index={ignore_index}")


def _reduce(row_loss: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# Fused op (triton) as torch.library custom ops, so torch.compile sees through it.
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moca_kernels::masked_token_loss_fwd", mutates_args=())
def _fused_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
               ignore_index: int, fwd_variant: str, grad_variant: str,
               filter_eps: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss per row float32 [N], 0 at ignored rows; lse per row float32 [N], 0 at ignored rows)."""
    from . import masked_token_loss_triton as kernels

    N = hidden.shape[0]
    V = weight.shape[0]
    keep = (labels != ignore_index).nonzero().squeeze(1)  # host sync: the grid depends on the count
    n = keep.numel()
    row_loss = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse_rows = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return row_loss, lse_rows
    every_row = n == N
    counted_labels = labels if every_row else labels.index_select(0, keep)
    _check_label_range(counted_labels, V, ignore_index)
    h = hidden if every_row else hidden.index_select(0, keep)
    lse, target = kernels.lse_forward(h, weight, bias, counted_labels.to(torch.int32).contiguous(), fwd_variant)
    if every_row:
        return lse - target, lse.contiguous()
    row_loss.index_copy_(0, keep, lse - target)
    lse_rows.index_copy_(0, keep, lse)
    return row_loss, lse_rows


@_fused_fwd.register_fake
def _(hidden, weight, labels, bias, ignore_index, fwd_variant, grad_variant, filter_eps=0.0):
    N = hidden.shape[0]
    return hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("moca_kernels::masked_token_loss_bwd", mutates_args=())
def _fused_bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               bias: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int, need_hidden: bool,
               need_weight: bool, need_bias: bool, grad_variant: str,
               filter_eps: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d hidden [N, H], d weight [V, H], d bias [V]); an empty tensor for each one not asked for."""
    from . import masked_token_loss_triton as kernels

    N, H = hidden.shape
    V = weight.shape[0]
    keep = (labels != ignore_index).nonzero().squeeze(1)  # host sync
    n = keep.numel()
    need_bias = need_bias and bias is not None
    if n == 0:  # nothing counted: zero gradients
        dh = torch.zeros(N, H, dtype=hidden.dtype, device=hidden.device) if need_hidden else hidden.new_empty(0)
        dw = torch.zeros(V, H, dtype=weight.dtype, device=weight.device) if need_weight else weight.new_empty(0)
        db = torch.zeros(V, dtype=bias.dtype, device=bias.device) if need_bias else hidden.new_empty(0)
        return dh, dw, db
    every_row = n == N

    def counted(t):
        return t if every_row else t.index_select(0, keep)

    dh_c, dw, db = kernels.backward(
        counted(grad_rows).to(torch.float32).contiguous(), counted(hidden), weight, bias,
        counted(labels).to(torch.int32).contiguous(), counted(lse).contiguous(), need_hidden, need_weight, need_bias,
        grad_variant, filter_eps)
    if not need_hidden:
        dh = hidden.new_empty(0)
    elif every_row:
        dh = dh_c
    else:
        dh = torch.zeros(N, H, dtype=hidden.dtype, device=hidden.device)
        dh.index_copy_(0, keep, dh_c)
    dw = dw if need_weight else weight.new_empty(0)
    db = db.to(bias.dtype) if need_bias else hidden.new_empty(0)
    return dh, dw, db


@_fused_bwd.register_fake
def _(grad_rows, hidden, weight, labels, bias, lse, ignore_index, need_hidden, need_weight, need_bias, grad_variant,
      filter_eps=0.0):
    dh = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    db = bias.new_empty(bias.shape) if (need_bias and bias is not None) else hidden.new_empty(0)
    return dh, dw, db


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, _, grad_variant, filter_eps = inputs
    ctx.ignore_index, ctx.grad_variant, ctx.filter_eps = ignore_index, grad_variant, filter_eps
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])


def _backward(ctx, grad_rows, _grad_lse):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    dh, dw, db = _fused_bwd(grad_rows, hidden, weight, labels, bias, lse, ctx.ignore_index,
                            bool(need_hidden), bool(need_weight), bool(need_bias and bias is not None),
                            ctx.grad_variant, ctx.filter_eps)
    return (dh if need_hidden else None, dw if need_weight else None, None,
            db if (need_bias and bias is not None) else None, None, None, None, None)


torch.library.register_autograd("moca_kernels::masked_token_loss_fwd", _backward, setup_context=_setup_context)


def _run_triton(variant):
    def run(hidden, weight, labels, bias, ignore_index, reduction, filter_eps=0.0):
        row_loss, _ = _fused_fwd(hidden, weight, labels, bias, ignore_index, variant["fwd"], variant["grad"],
                                 filter_eps)
        return _reduce(row_loss, labels, ignore_index, reduction)
    return run


def _triton_reasons(hidden, weight, labels, bias, ignore_index, reduction, filter_eps=0.0):
    why = triton_reasons(hidden, weight, labels, bias)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            why.append(f"{name} is {t.dtype}; the fused kernels take float32, float16 and bfloat16")
    if hidden.dtype != weight.dtype:
        why.append(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) differ in dtype; the fused kernels take one")
    return why


def _run_torch(hidden, weight, labels, bias, ignore_index, reduction, filter_eps=0.0):
    if not torch.compiler.is_compiling():
        _check_label_range(labels[labels != ignore_index], weight.shape[0], ignore_index)
    if filter_eps > 0:
        return reference.masked_token_loss_filtered(hidden, weight, labels, filter_eps, bias=bias,
                                                    ignore_index=ignore_index, reduction=reduction)
    return reference.masked_token_loss(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                       reduction=reduction)


def _descriptor_reasons(hidden, weight, **_):
    if triton_import_error():   # the backend's own reasons say so
        return []
    from . import masked_token_loss_triton as kernels

    return kernels.descriptor_reasons(hidden, weight)


_PARTS = {part: {"v1": None, "v2": _descriptor_reasons, "v3": _descriptor_reasons} for part in ("fwd", "grad")}

_OP = Op(_NAME, [
    *variant_backends("triton", _PARTS, {"fwd": "v1", "grad": "v1"}, _triton_reasons, _run_triton),
    Backend("torch", lambda **_: [], _run_torch),
])
