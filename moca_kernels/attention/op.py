"""masked_attention: the public op. Backends: "triton" (FlashAttention-2-style kernels over the mask's per-tile
tables: ``kernels_fwd.py``, ``kernels_bwd.py``, configurations in ``tiles.py``, launchers in ``launch.py``) and
"torch" (``reference.masked_attention``, a per-document loop; also the only one taking float64).

The triton backend comes in kernel variants, one per (forward, backward) pair, each a backend of the op
(``moca_kernels.dispatch``): forward ("fwd") ``base`` | ``ws`` | ``tma``, backward ("bwd") ``base`` | ``even``
| ``fused`` (``launch.py`` describes them). ``impl="triton"`` is base + base (the measured default, the only
one automatic dispatch takes); ``impl="triton:ws"`` the ws forward with the base backward;
``impl="triton:ws+fused"`` both; ``MOCA_KERNELS_IMPL=masked_attention=triton:fused`` the same from the
environment. The backward variant is fixed when the forward runs (it travels with the autograd graph).

The triton backend is a ``torch.library`` custom op with a fake implementation and registered autograd, so
``torch.compile`` keeps it in one graph. Its inputs are the mask's O(T) tensors (``spans`` [2, T] and the
tables, whose sizes depend on T only): document lengths and counts never become guards, so new masks of the
same T reuse the compiled graph.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from .._checks import (KERNEL_DTYPES, check_bool, check_float, check_ndim, check_real, check_same_device,
                       check_same_dtype)
from ..dispatch import Backend, Op, triton_import_error, triton_reasons, variant_backends
from .mask import AttentionMask, _xformers_kind, mask_of_xformers_bias

_NAME = "masked_attention"
MAX_TRITON_HEAD_DIM = 128
# Largest softmax scale the triton backend takes. Its backward recomputes the softmax from the stored float32
# log-sum-exp, so gradients carry a relative error of about 1e-7 * max|scale * q . k| (measured: dV off by 3e-3
# at scale 1e3 and 3e-2 at 1e4 with |q . k| <= 29; NaN or inf once the softmax saturates, e.g. scale 1e8, where
# the torch backend is exact). Larger scales go to the torch backend; forcing triton raises.
MAX_TRITON_SCALE = 1e3


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                     scale: Optional[float] = None, return_lse: bool = False, impl: Optional[str] = None,
                     deterministic: bool = False):
    """Attention over a packed sequence under ``mask``: out_i = sum_j softmax_j(scale * q_i . k_j) v_j over the
    keys j that query i may attend to (see ``AttentionMask``).

    Args:
        q: [T, Hq, D] float32 / float16 / bfloat16 (float64 on the torch backend); any strides (a last-dim
            stride other than 1 costs a copy).
        k, v: [T, Hkv, D], same dtype and device; Hq % Hkv == 0 (query head h reads key/value head
            h // (Hq // Hkv), no repeat in memory).
        mask: an AttentionMask with total length T (moved to q's device once and cached if elsewhere), or an
            xformers ``BlockDiagonalMask`` / ``BlockDiagonalCausalMask`` (converted by
            ``AttentionMask.from_xformers``, once per bias object).
        scale: finite positive softmax scale (default D ** -0.5), a real number (not a bool or a string). The
            triton backend takes scale <= MAX_TRITON_SCALE (1e3; see its comment); larger ones run on torch.
        return_lse: bool; also return the log-sum-exp of the scaled scores, [Hq, T] float32 (float64 for float64
            inputs; differentiable).
        impl: "triton", "torch" or None (automatic: triton for float32/16-bit CUDA tensors, or float32/float16
            CPU tensors under TRITON_INTERPRET=1, with D <= 128; torch otherwise), or a triton kernel variant such
            as "triton:ws", "triton:fused" or "triton:ws+fused" (module docstring). A forced backend or variant
            that cannot take the inputs raises BackendUnavailable with its reasons.
        deterministic: bool; triton backward without atomics (dQ by its own kernel: bitwise reproducible, one more
            pass over the scores). Otherwise dQ is accumulated with float32 atomics in the dK/dV kernel, or
            computed as in the deterministic mode when that was faster on this GPU (timed once per shape family;
            MOCA_ATTENTION_DQ=atomic|separate forces one).

    Returns:
        out [T, Hq, D] in q's dtype, or (out, lse).
    """
    if _xformers_kind(mask) is not None:   # an xformers block-diagonal bias (AttentionMask.from_xformers)
        mask = mask_of_xformers_bias(mask, q.device if isinstance(q, torch.Tensor) else "cpu")
    scale = _validate(q, k, v, mask, scale)
    return _OP(impl, q=q, k=k, v=v, mask=mask.to(q.device), scale=scale,
               return_lse=check_bool("return_lse", return_lse, _NAME),
               deterministic=check_bool("deterministic", deterministic, _NAME))


def _validate(q, k, v, mask, scale) -> Optional[float]:
    """The checks that need no look at the data; returns ``scale`` as a float (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, _NAME)
        check_ndim(name, t, 3, _NAME, "[T, heads, D]")
    check_same_dtype(_NAME, q=q, k=k, v=v)
    check_same_device(_NAME, q=q, k=k, v=v)
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"{_NAME}: mask must be an AttentionMask, got {type(mask).__name__}")
    T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_NAME}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"{_NAME}: k/v must be [T={T}, Hkv, D={D}], got {tuple(k.shape)}")
    if Hq == 0 or D == 0 or k.shape[1] == 0:
        raise ValueError(f"{_NAME}: empty input (q {tuple(q.shape)}, k {tuple(k.shape)}): need heads >= 1 and D >= 1")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"{_NAME}: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if mask.total_len != T:
        raise ValueError(f"{_NAME}: the mask covers {mask.total_len} tokens (sum of seqlens) but q has T = {T}")
    if scale is None:
        return None
    value = check_real("scale", scale, _NAME)
    if not value > 0:
        raise ValueError(f"{_NAME}: scale must be a finite positive number or None, got {scale!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Fused op (triton) as torch.library custom ops.
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moca_kernels::masked_attention_fwd", mutates_args=())
def _fused_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, tables: torch.Tensor,
               scale: float, q_tile: int, k_tile: int, deterministic: bool, fwd_variant: str, bwd_variant: str
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [T, Hq, D], lse float32 [Hq, T]). k_tile, deterministic and bwd_variant are kept for the backward."""
    from . import launch

    return launch.forward(q, k, v, spans, tables, scale, q_tile, fwd_variant)


@_fused_fwd.register_fake
def _(q, k, v, spans, tables, scale, q_tile, k_tile, deterministic, fwd_variant, bwd_variant):
    T, Hq, D = q.shape
    return q.new_empty(T, Hq, D), q.new_empty(Hq, T, dtype=torch.float32)


@torch.library.custom_op("moca_kernels::masked_attention_bwd", mutates_args=())
def _fused_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, grad_lse: Optional[torch.Tensor], spans: torch.Tensor, tables: torch.Tensor,
               scale: float, q_tile: int, k_tile: int, deterministic: bool, bwd_variant: str
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import launch

    return launch.backward(grad_out, q, k, v, out, lse, grad_lse, spans, tables, scale, q_tile, k_tile, deterministic,
                           bwd_variant)


@_fused_bwd.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, spans, tables, scale, q_tile, k_tile, deterministic, bwd_variant):
    # contiguous, as the kernels return them (empty_like would keep a permuted input's stride order)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, spans, tables, scale, q_tile, k_tile, deterministic, _, bwd_variant = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, spans, tables)
    ctx.scale, ctx.q_tile, ctx.k_tile, ctx.deterministic = scale, q_tile, k_tile, deterministic
    ctx.bwd_variant = bwd_variant
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, spans, tables = ctx.saved_tensors
    if grad_out is None:   # only lse was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _fused_bwd(grad_out, q, k, v, out, lse, grad_lse, spans, tables, ctx.scale, ctx.q_tile,
                            ctx.k_tile, ctx.deterministic, ctx.bwd_variant)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("moca_kernels::masked_attention_fwd", _backward, setup_context=_setup_context)


def _run_triton(variant):
    def run(q, k, v, mask, scale, return_lse, deterministic):
        from . import tiles

        D = q.shape[2]
        q_tile, k_tile = tiles.plan(q.device, q.dtype, D)
        tables = mask.tile_metadata(q_tile, k_tile)
        scale = float(D ** -0.5 if scale is None else scale)
        out, lse = _fused_fwd(q, k, v, mask.spans, tables, scale, q_tile, k_tile, deterministic, variant["fwd"],
                              variant["bwd"])
        return (out, lse) if return_lse else out
    return run


def _run_torch(q, k, v, mask, scale, return_lse, deterministic):
    return reference.masked_attention(q, k, v, mask, scale=scale, return_lse=return_lse)


def _triton_reasons(q, k, v, mask, scale, return_lse, deterministic):
    why = triton_reasons(q, k, v)
    if q.dtype not in KERNEL_DTYPES:
        why.append(f"inputs are {q.dtype}; the triton kernels take float32, float16 and bfloat16")
    if q.shape[2] > MAX_TRITON_HEAD_DIM:
        why.append(f"head dim {q.shape[2]} > {MAX_TRITON_HEAD_DIM} is not supported by the triton kernels")
    if scale is not None and scale > MAX_TRITON_SCALE:
        why.append(f"scale {scale:g} > {MAX_TRITON_SCALE:g}: the triton backward loses precision in proportion to "
                   "|scale * q . k| (the torch backend takes any finite scale)")
    return why


def _descriptor_reasons(q, k, v, mask, **_):
    if triton_import_error():   # the backend's own reasons say so
        return []
    from . import launch

    return launch.descriptor_reasons(q, k, v, mask.spans)


_OP = Op(_NAME, [
    *variant_backends("triton", {"fwd": {"base": None, "ws": _descriptor_reasons, "tma": _descriptor_reasons},
                                 "bwd": {"base": None, "even": None, "fused": None}},
                      {"fwd": "base", "bwd": "base"}, _triton_reasons, _run_triton),
    Backend("torch", lambda **_: [], _run_torch),
])
