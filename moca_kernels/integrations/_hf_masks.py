"""Document masks from the packed-input conventions transformers uses (restarting position_ids, cu_seq_lens
keywords, ``moca_docs``) and the ``"moca"`` mask interface, for :mod:`moca_kernels.integrations.transformers`
(which re-exports the public names)."""

from __future__ import annotations
import weakref
from typing import List, Optional
import torch
import moca_kernels as mk

# --------------------------------------------------------------------------------------------------------
# Documents of a packed row, from each convention (cached, so one host sync per forward, not per layer)
# --------------------------------------------------------------------------------------------------------

_CACHE: List[tuple] = []     # (weakref to the source tensor, its version, causal, AttentionMask); last few sources
_CACHE_SIZE = 8


def _cached(source: torch.Tensor, causal: bool, build):
    """``build()`` once per (source tensor object and version, causal): every layer of a forward gets the same
    tensor, so the mask (and the per-tile metadata the kernels cache on it) is built once; a tensor changed in
    place since is read again."""
    version = getattr(source, "_version", None)
    for ref, ver, c, mask in _CACHE:
        if ref() is source and ver == version and c == causal:
            return mask
    mask = build()
    _CACHE.insert(0, (weakref.ref(source), version, causal, mask))
    del _CACHE[_CACHE_SIZE:]
    return mask


def _mask_from_starts(starts: torch.Tensor, causal: bool, device) -> mk.AttentionMask:
    """AttentionMask over the B * S tokens of a [B, S] grid whose documents begin where ``starts`` is True
    (starts[:, 0] must be True). One host sync (the document lengths)."""
    flat = starts.reshape(-1)
    begin = flat.nonzero().squeeze(1)
    lens = torch.diff(begin, append=begin.new_tensor([flat.numel()]))
    return mk.AttentionMask.from_seqlens(lens.tolist(), causal=causal, device=device)


def _docs_from_position_ids(pos: torch.Tensor, B: int, S: int, causal: bool, device) -> Optional[mk.AttentionMask]:
    """Documents of restarting position ids [B, S] or [1, S] (None when no row restarts)."""
    def build():
        p = pos.to(device).expand(B, S)
        starts = torch.ones(B, S, dtype=torch.bool, device=device)
        starts[:, 1:] = (p[:, 1:] - p[:, :-1]) != 1
        if not bool(starts[:, 1:].any()):
            return False
        return _mask_from_starts(starts, causal, device)

    mask = _cached(pos, causal, build)
    return mask if mask is not False else None


def _docs_from_sequence_ids(ids: torch.Tensor, causal: bool, device) -> mk.AttentionMask:
    """Documents of transformers' packed sequence ids [B, S] (equal ids = one document within a row)."""
    def build():
        i = ids.to(device)
        starts = torch.ones(i.shape, dtype=torch.bool, device=device)
        starts[:, 1:] = i[:, 1:] != i[:, :-1]
        return _mask_from_starts(starts, causal, device)

    return _cached(ids, causal, build)


def _docs_from_cu_seqlens(cu: torch.Tensor, causal: bool, device, name: str = "cu_seq_lens_q") -> mk.AttentionMask:
    """Documents of flash-attention's cumulative lengths (int [n_docs + 1], starting at 0)."""
    def build():
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
            raise ValueError(f"moca attention: {name} must be an integer tensor [n_docs + 1] of cumulative lengths")
        c = cu.to(torch.int64).cpu()
        if int(c[0]) != 0:
            raise ValueError(f"moca attention: {name} must start at 0, got {c[:4].tolist()}...")
        lens = torch.diff(c)
        if bool((lens < 0).any()):
            raise ValueError(f"moca attention: {name} must be non-decreasing, got {c.tolist()}")
        return mk.AttentionMask.from_seqlens(lens.tolist(), causal=causal, device=device)

    return _cached(cu, causal, build)


# --------------------------------------------------------------------------------------------------------
# The mask transformers hands to every layer
# --------------------------------------------------------------------------------------------------------


class MocaMask:
    """What the mask hook returns: causality, padding and transformers' packed-sequence ids.

    Attributes:
        causal: bool, whether the model asked for a causal mask (False = bidirectional).
        padding: bool [B, S] (True = real token) or None (no padding mask given).
        sequence_ids: int [B, S] or None: transformers' packed sequence ids (detected from restarting
            position_ids; equal ids = one document within a row).
        batch_size, seq_len: ints.
    """

    def __init__(self, causal: bool, padding: Optional[torch.Tensor], batch_size: int, seq_len: int,
                 sequence_ids: Optional[torch.Tensor] = None):
        self.causal = bool(causal)
        self.padding = padding
        self.sequence_ids = sequence_ids
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self._packed = None
        self._all_real = None

    def has_padding(self) -> bool:
        """Whether any position is padding (one host sync, once; an all-ones mask is no padding)."""
        if self._all_real is None:
            self._all_real = self.padding is None or bool(self.padding.all())
        return not self._all_real

    def packed(self, device: torch.device) -> mk.AttentionMask:
        """The AttentionMask with one document per row, built once and reused by every layer. Without padding
        its ``padding_index`` is None (no gather needed)."""
        if self._packed is None:
            B, S = self.batch_size, self.seq_len
            if not self.has_padding():
                self._packed = mk.AttentionMask.from_seqlens([S] * B, causal=self.causal, device=device)
            else:
                self._packed = mk.AttentionMask.from_padding_mask(self.padding.to(device), causal=self.causal)
        return self._packed

    def __repr__(self) -> str:
        return (f"MocaMask(causal={self.causal}, batch={self.batch_size}, seq={self.seq_len}, "
                f"padding={'yes' if self.padding is not None else 'no'}, "
                f"packed={'yes' if self.sequence_ids is not None else 'no'})")


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _describe_mask_function(mask_function):
    """(causal, packed sequence ids or None) for the mask functions transformers builds for plain causal /
    bidirectional attention, also combined for packed sequences (``and_masks(f, packed_sequence_mask_function(ids))``
    with f plain or wrapped by ``remap_positions_for_packed_sequence``); None for anything else."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is getattr(mu, "bidirectional_mask_function", None):
        return False, None
    qual = getattr(mask_function, "__qualname__", "")
    if qual.startswith("and_masks.") or qual.startswith("and_masks.<locals>"):
        parts = _closure(mask_function).get("mask_functions")
        if not parts or len(parts) != 2:
            return None
        base, ids = None, None
        for p in parts:
            q, c = getattr(p, "__qualname__", ""), _closure(p)
            if q.startswith("packed_sequence_mask_function.") and "packed_sequence_mask" in c:
                ids = c["packed_sequence_mask"]
            else:
                # some transformers versions remap positions inside the packed rows first, others pass the plain
                # causal / bidirectional function
                inner = c.get("mask_function") if q.startswith("remap_positions_for_packed_sequence.") else p
                if inner is mu.causal_mask_function:
                    base = True
                elif inner is getattr(mu, "bidirectional_mask_function", None):
                    base = False
        if base is not None and isinstance(ids, torch.Tensor):
            return base, ids
    return None


def moca_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> MocaMask:
    """Mask hook registered in ``transformers.masking_utils.AttentionMaskInterface`` under ``"moca"``.

    Called by ``create_causal_mask`` / ``create_bidirectional_mask`` once per forward. Returns a
    :class:`MocaMask` (no [B, 1, S, S] tensor is ever built). Raises for anything it cannot express.
    """
    described = _describe_mask_function(mask_function)
    if described is None:
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise NotImplementedError(
            f"moca attention: transformers asked for a mask built from {name!r}, which moca cannot express: "
            "only causal or bidirectional attention within documents (packed rows from restarting position_ids, "
            "cu_seq_lens_q/k or moca_docs, padding from a 2-D attention_mask). Sliding windows, chunked "
            "attention and mask overlays (e.g. image-token masks) need another attention implementation.")
    causal, ids = described
    if q_offset != 0 or kv_offset != 0 or q_length != kv_length:
        raise NotImplementedError(f"moca attention: no KV cache support (q_length={q_length}, kv_length={kv_length}, "
                                  f"offsets {q_offset}/{kv_offset}); call the model with use_cache=False")
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, kv_length):
            raise ValueError(f"moca attention: expected a 2-D padding mask [{batch_size}, {kv_length}], "
                             f"got {tuple(attention_mask.shape)}")
        padding = attention_mask.to(torch.bool)
    return MocaMask(causal, padding, batch_size, q_length, sequence_ids=ids)
