"""xformers' ``memory_efficient_attention`` calling convention on moca_kernels' masked attention::

    # from xformers.ops import memory_efficient_attention
    from moca_kernels.integrations.xformers import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    bias = BlockDiagonalMask.from_seqlens([5, 7, 4])
    out = memory_efficient_attention(q, k, v, attn_bias=bias)      # q, k, v [1, 16, H, K]

Kept from xformers (``xformers.ops.memory_efficient_attention``): the [B, M, H, K] layout (and [B, M, G, H, K]
for grouped keys / values, k and v expanded over H), ``scale`` defaulting to K ** -0.5, and these biases:
``None`` (full attention within each batch row), ``LowerTriangularMask`` (causal within each row), and the
block-diagonal ``BlockDiagonalMask`` / ``BlockDiagonalCausalMask`` (documents packed in one row, B = 1, as
xformers requires). Any other bias (tensor biases, padded / gappy keys, windows, bottom-right causal with
different query and key lengths), dropout ``p`` > 0 and an ``op`` choice raise ``NotImplementedError`` naming
the argument. Query and key sequence lengths must be equal.

xformers is never imported here: biases are recognised by class name and module, so this module works (and
``moca_kernels.masked_attention`` takes a block-diagonal bias as its ``mask``) even where xformers' own
kernels do not load. Masks built from a block-diagonal bias are cached per bias object.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention.mask import AttentionMask, _xformers_kind, mask_of_xformers_bias
from ..attention.op import masked_attention

_NAME = "memory_efficient_attention"

__all__ = ["memory_efficient_attention", "AttentionMask"]


def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias=None,
                               p: float = 0.0, scale: Optional[float] = None, *, op=None,
                               output_dtype: Optional[torch.dtype] = None, impl: Optional[str] = None,
                               deterministic: bool = False) -> torch.Tensor:
    """Attention in xformers' layout and bias conventions.

    Args:
        query: [B, M, H, K] (or [B, M, G, H, K]) float32 / float16 / bfloat16 (float64 with impl="torch").
        key, value: [B, M, Hkv, K] with H % Hkv == 0 (moca's GQA; xformers itself wants Hkv == H), or
            [B, M, G, H, K] expanded over H (stride 0, as xformers' GQA examples build them), same dtype.
        attn_bias: None, an xformers ``LowerTriangularMask``, or (B must be 1) a ``BlockDiagonalMask`` /
            ``BlockDiagonalCausalMask`` covering the M tokens.
        p: dropout probability, must be 0.0.
        scale: softmax scale (default K ** -0.5).
        op: must be None (xformers' kernel choice; moca picks its own backend, see ``impl``).
        output_dtype: dtype of the result (default query's).
        impl, deterministic: see ``moca_kernels.masked_attention``.

    Returns:
        [B, M, H, K] (or [B, M, G, H, K]) in ``output_dtype`` or query's dtype.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or p != 0:
        raise NotImplementedError(f"{_NAME}: p={p!r}: attention dropout is not supported; pass p=0.0")
    if op is not None:
        raise NotImplementedError(f"{_NAME}: op={op!r} selects an xformers kernel; moca runs its own (pass op=None, "
                                  f"and impl= to force a moca backend)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (4, 5):
            raise ValueError(f"{_NAME}: {name} must be [B, M, H, K] or [B, M, G, H, K], got {tuple(t.shape)}")
    if key.dim() != query.dim() or value.shape != key.shape:
        raise ValueError(f"{_NAME}: key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape and "
                         f"query's rank ({tuple(query.shape)})")
    B, M = query.shape[:2]
    if key.shape[0] != B or key.shape[1] != M:
        raise NotImplementedError(f"{_NAME}: key is [B, M] = {tuple(key.shape[:2])} but query is [{B}, {M}]: "
                                  f"query and key sequences of different lengths are not supported")
    mask = _mask(attn_bias, B, M, query.device)
    q = query.reshape(B * M, -1, query.shape[-1])
    k, v = (_heads(t, B * M) for t in (key, value))
    out = masked_attention(q, k, v, mask, scale=scale, impl=impl, deterministic=deterministic)
    out = out.reshape(query.shape)
    return out if output_dtype is None else out.to(output_dtype)


def _heads(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, M, (G,) H, K] -> [B * M, heads, K]; a 5-D tensor expanded over H keeps its G groups only (GQA)."""
    if t.dim() == 5 and t.shape[3] > 1 and t.stride(3) == 0:
        t = t[:, :, :, 0]
    return t.reshape(rows, -1, t.shape[-1])


def _mask(attn_bias, B: int, M: int, device: torch.device) -> AttentionMask:
    if attn_bias is None:
        return AttentionMask.from_seqlens([M] * B, device=device)
    if isinstance(attn_bias, torch.Tensor):
        raise NotImplementedError(f"{_NAME}: attn_bias: a tensor bias is not supported; pass None or an xformers "
                                  f"BlockDiagonalMask / BlockDiagonalCausalMask / LowerTriangularMask")
    kind = _xformers_kind(attn_bias)
    if kind == "LowerTriangularMask":
        return AttentionMask.from_seqlens([M] * B, causal=True, device=device)
    if kind in ("BlockDiagonalMask", "BlockDiagonalCausalMask"):
        if B != 1:
            raise ValueError(f"{_NAME}: attn_bias is a {kind}, which packs documents in one row; query must have "
                             f"B = 1, got B = {B}")
        return mask_of_xformers_bias(attn_bias, device)
    name = type(attn_bias).__name__ if kind is None else kind
    raise NotImplementedError(f"{_NAME}: attn_bias of type {name} is not supported; pass None, "
                              f"LowerTriangularMask, BlockDiagonalMask or BlockDiagonalCausalMask")
