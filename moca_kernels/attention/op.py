"""masked_attention: the public op. The torch backend is ``reference.masked_attention``; fast backends: see
its issue."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._checks import check_float, check_ndim, check_same_device, check_same_dtype
from ..dispatch import Backend, Op
from .mask import AttentionMask

_NAME = "masked_attention"


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                     scale: Optional[float] = None, return_lse: bool = False, impl: Optional[str] = None):
    """Attention over a packed sequence under ``mask``.

    Args:
        q: [T, Hq, D] float32 / float16 / bfloat16.
        k, v: [T, Hkv, D], same dtype; Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)).
        mask: an AttentionMask with total length T.
        scale: softmax scale (default D ** -0.5).
        return_lse: also return the log-sum-exp of the scaled scores, [Hq, T] float32.
        impl: "cuda", "triton", "torch" or None (automatic).

    Returns:
        out [T, Hq, D] in q's dtype, or (out, lse).
    """
    _validate(q, k, v, mask)
    return _OP(impl, q=q, k=k, v=v, mask=mask.to(q.device), scale=scale, return_lse=return_lse)


def _validate(q, k, v, mask) -> None:
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
    if Hq % k.shape[1] != 0:
        raise ValueError(f"{_NAME}: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if mask.total_len != T:
        raise ValueError(f"{_NAME}: the mask covers {mask.total_len} tokens (sum of seqlens) but q has T = {T}")


_OP = Op(_NAME, [
    Backend("torch", lambda **_: [], reference.masked_attention),
])
