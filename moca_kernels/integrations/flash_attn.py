"""flash-attn's varlen entry point on moca_kernels' masked attention: switching is one import line::

    # from flash_attn import flash_attn_varlen_func
    from moca_kernels.integrations.flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)

What is kept from flash-attn (``flash_attn.flash_attn_varlen_func``, flash-attn 2.x): the signature and
argument order, the packed layout (q [total, Hq, D], k / v [total, Hkv, D], sequences back to back as given
by ``cu_seqlens``), grouped-query attention by head count (query head h reads key/value head
h // (Hq // Hkv)), ``softmax_scale`` defaulting to D ** -0.5, ``causal`` (causal within each sequence), and
``deterministic`` (a backward without atomics). What it cannot do raises ``NotImplementedError`` naming the
argument: query and key sequences that differ (``cu_seqlens_k`` != ``cu_seqlens_q``, or k with another
length), ``dropout_p`` > 0, a sliding ``window_size``, ``softcap``, ``alibi_slopes``, ``return_attn_probs``
and a paged ``block_table``.

Beyond flash-attn: float32 inputs, and (torch backend) float64. flash-attn kernels need fp16 / bf16 on CUDA.
Zero-length sequences in ``cu_seqlens`` (repeated offsets) are dropped: they hold no token, so the output is
unchanged. The mask built from ``cu_seqlens_q`` (one host sync to read the offsets) is cached for that tensor
while it lives unmodified, so a model whose layers share one ``cu_seqlens`` builds it once.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..attention.mask import _MASK_CACHE, AttentionMask
from ..attention.op import masked_attention

_NAME = "flash_attn_varlen_func"

__all__ = ["flash_attn_varlen_func"]


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[torch.Tensor] = None, *,
                           impl: Optional[str] = None) -> torch.Tensor:
    """Attention within each packed sequence, flash-attn's ``flash_attn_varlen_func`` conventions.

    Args:
        q: [total, Hq, D] float32 / float16 / bfloat16 (float64 with impl="torch").
        k, v: [total, Hkv, D], same dtype and device as q, Hq % Hkv == 0 (GQA / MQA).
        cu_seqlens_q: [batch + 1] integer tensor (flash-attn's int32), 0 then the running sum of the sequence
            lengths; cu_seqlens_q[-1] must equal total.
        cu_seqlens_k: the same offsets (the same tensor or equal values); moca attends within shared sequences.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence (flash-attn's launch bound; only checked here).
        dropout_p: must be 0.0 (no attention dropout; pass ``0.0`` at evaluation as flash-attn asks too).
        softmax_scale: scale of q k^T (default D ** -0.5).
        causal: False = every token of a sequence attends to the whole sequence; True = to itself and the tokens
            before it in its sequence (flash-attn's bottom-right alignment is the same thing when query and key
            lengths are equal, the only case taken).
        window_size: (-1, -1) (no window), or (-1, 0), which is causal attention.
        softcap, alibi_slopes, return_attn_probs, block_table: their off values only (0.0, None, False, None).
        deterministic: backward without atomics (bitwise reproducible).
        impl: moca backend ("triton", "torch" or None = automatic), see ``masked_attention``.

    Returns:
        out [total, Hq, D] in q's dtype (differentiable with respect to q, k and v).
    """
    _refuse(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table)
    causal = bool(causal) or tuple(window_size) == (-1, 0)
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"{_NAME}: q and k must be [total, heads, D], got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise NotImplementedError(
            f"{_NAME}: k has {k.shape[0]} tokens but q has {q.shape[0]}: query and key sequences of different "
            f"lengths are not supported (moca attends within shared documents)")
    mask = _MASK_CACHE.get(cu_seqlens_q, ("flash_attn", causal, str(q.device)),
                           lambda: _mask_from_cu(cu_seqlens_q, causal, q.device))
    if mask.total_len != q.shape[0]:
        raise ValueError(f"{_NAME}: cu_seqlens_q ends at {mask.total_len} but q holds {q.shape[0]} tokens")
    if cu_seqlens_k is not cu_seqlens_q:
        _check_same_offsets(cu_seqlens_q, cu_seqlens_k)
    longest = max(mask.seqlens)
    for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(bound, torch.Tensor) and bound.numel() == 1:
            bound = int(bound.item())
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(f"{_NAME}: {name} must be an int, got {type(bound).__name__}")
        if bound < longest:
            raise ValueError(f"{_NAME}: {name}={bound} is smaller than the longest sequence ({longest} tokens); "
                             f"flash-attn would give wrong results, so this is refused")
    return masked_attention(q, k, v, mask, scale=softmax_scale, impl=impl, deterministic=bool(deterministic))


def _refuse(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table) -> None:
    """NotImplementedError naming the first flash-attn option moca cannot honour."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p != 0:
        raise NotImplementedError(f"{_NAME}: dropout_p={dropout_p!r}: attention dropout is not supported; pass "
                                  f"dropout_p=0.0 (set the model's attention dropout to 0)")
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{_NAME}: window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if (left, right) not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"{_NAME}: window_size={tuple(window_size)!r}: sliding-window attention is not "
                                  f"supported; only (-1, -1) (no window) and (-1, 0) (= causal)")
    if softcap != 0:
        raise NotImplementedError(f"{_NAME}: softcap={softcap!r}: score soft-capping is not supported; pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{_NAME}: alibi_slopes: ALiBi biases are not supported; pass None")
    if return_attn_probs:
        raise NotImplementedError(f"{_NAME}: return_attn_probs=True is not supported (for the log-sum-exp "
                                  f"use moca_kernels.masked_attention(..., return_lse=True))")
    if block_table is not None:
        raise NotImplementedError(f"{_NAME}: block_table: a paged KV cache is not supported; pass None")


def _mask_from_cu(cu_seqlens: torch.Tensor, causal: bool, device: torch.device) -> AttentionMask:
    """AttentionMask of flash-attn offsets; zero-length sequences (repeated offsets) are dropped."""
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{_NAME}: cu_seqlens_q must be a 1-D integer tensor [batch + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    kept = offsets[:1] + [b for a, b in zip(offsets, offsets[1:]) if b != a]
    try:
        return AttentionMask.from_cu_seqlens(kept, causal=causal, device=device)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{_NAME}: cu_seqlens_q = {_short(offsets)}: {exc}") from None


def _check_same_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    same = cu_k.shape == cu_q.shape and bool(torch.equal(cu_k.to(cu_q.device, cu_q.dtype), cu_q))
    if not same:
        raise NotImplementedError(
            f"{_NAME}: cu_seqlens_k = {_short(cu_k.tolist())} differs from cu_seqlens_q = {_short(cu_q.tolist())}: "
            f"query and key sequences of different lengths are not supported; pass the same offsets")


def _short(xs: Sequence[int], n: int = 8) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= n else str(xs[:n])[:-1] + ", ...]"
