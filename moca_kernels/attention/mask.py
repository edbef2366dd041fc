"""AttentionMask: which key each query of a packed sequence may attend to, without a [T, T] tensor.

A packed sequence of T tokens holds several documents back to back (``seqlens``). A token attends only to
tokens of its own document, and within it:

* ``causal=False`` (MoCa): to every token of the document::

      doc A  doc B            q\\k  a a a b b
      a a a  b b               a   x x x . .
                               a   x x x . .
                               a   x x x . .
                               b   . . . x x
                               b   . . . x x

* ``causal=True``: to key j when j <= i, or when both tokens share a block id >= 0 (``block_ids``): text is
  causal and each image block is bidirectional (the mixed mask of VLMs)::

      tokens  t t i i t       q\\k  t t i i t
      blocks -1-1 5 5-1        t   x . . . .
                               t   x x . . .
                               i   x x x x .     <- image tokens see the whole image
                               i   x x x x .
                               t   x x x x x

  Each block must be one contiguous run of tokens of one document (an image), checked at construction.

Only O(T) data is held: cumulative document lengths, optional block ids, and the per-token key spans the
kernels use (``spans``, see ``metadata.py``), built once at construction on the mask's device. Per-tile
tables are built on first use for each tile size and cached on the mask, so every layer, forward and
backward, reuses them; no attention call synchronises with the host.

Padded batches: :meth:`AttentionMask.from_padding_mask` turns an HF-style ``attention_mask [B, S]`` into a
mask with one document per row, and :func:`pack` / :func:`unpack` move tensors between [B, S, ...] and the
packed [T, ...] layout.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .._checks import as_int_list, check_bool
from . import metadata

_OP = "AttentionMask.from_seqlens"


class AttentionMask:
    """Mask description of a packed sequence (see the module docstring for the semantics).

    Attributes:
        seqlens: tuple of the n_docs document lengths (host ints).
        cu_seqlens: int32 [n_docs + 1], cumulative document lengths starting at 0 (on ``device``).
        block_ids: int32 [T] or None; tokens of one document sharing an id >= 0 form a bidirectional block.
        causal: bool.
        total_len: T = sum(seqlens).
        device: where the tensors live.
        spans: int32 [2, T]; query i attends to keys [spans[0, i], spans[1, i]).
        padding_shape: (B, S) when built by :meth:`from_padding_mask`, else None.
        padding_index: int64 [T] flat indices of the real tokens in the [B * S] grid (from_padding_mask only).
    """

    def __init__(self, seqlens: Sequence[int], block_ids: Optional[torch.Tensor], causal: bool,
                 device: Optional[torch.device] = None, *, spans: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None):
        self.seqlens = tuple(int(s) for s in seqlens)
        self.total_len = sum(self.seqlens)
        self.causal = bool(causal)
        device = torch.device(device) if device is not None else (
            block_ids.device if block_ids is not None else torch.device("cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if cu_seqlens is None:
            cu = [0]
            for s in self.seqlens:
                cu.append(cu[-1] + s)
            cu_seqlens = _to_device(torch.tensor(cu, dtype=torch.int32), device)
        self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        self.block_ids = None if block_ids is None else block_ids.to(device=device, dtype=torch.int32).contiguous()
        if spans is None:
            spans = metadata.row_spans(self.cu_seqlens, self.block_ids, self.total_len, self.causal)
        self.spans = spans.to(device)
        self.padding_shape: Optional[Tuple[int, int]] = None
        self.padding_index: Optional[torch.Tensor] = None
        self._tables = {}
        self._copies = {}
        self._doc_ids = None

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_seqlens(cls, seqlens: Union[Sequence[int], torch.Tensor], block_ids: Optional[torch.Tensor] = None,
                     causal: bool = False, device: Optional[Union[str, torch.device]] = None,
                     check_blocks: bool = True) -> "AttentionMask":
        """Describe a packed sequence.

        Args:
            seqlens: lengths of the packed documents, ints or a 1-D integer tensor (a GPU tensor costs one host
                sync: the lengths are kept on the host too); each >= 1, sum = T <= 2**31 - 1. Cumulative offsets
                ``[0, 5, 12, 16]`` are refused (a document of length 0): see ``AttentionMask.from_cu_seqlens``.
            block_ids: optional integer tensor [T]; within a document, tokens with the same id >= 0 form a
                block that attends bidirectionally (only read with ``causal=True``). Each block must be one
                contiguous run of tokens inside one document (give each image its own id).
            causal: False = bidirectional within each document; True = causal within each document, plus blocks.
            device: where the O(T) metadata lives (default: seqlens' device when it is a tensor, else
                block_ids' device, else CPU).
                Build masks on the device of q/k/v: a mask on another device is copied once, then cached.
            check_blocks: verify that blocks are contiguous runs inside one document (two host syncs when
                ``causal`` and block_ids are given); pass False only for block ids known to be right.

        Arguments of the wrong type (None, a string, floats for lengths, a non-bool ``causal``) raise TypeError,
        values out of range ValueError, each naming the argument.
        """
        causal = check_bool("causal", causal, _OP)
        check_blocks = check_bool("check_blocks", check_blocks, _OP)
        device = _device_arg(device, _OP)
        if device is None and isinstance(seqlens, torch.Tensor):
            device = seqlens.device
        lens = as_int_list(seqlens, "seqlens", _OP)
        if not lens:
            raise ValueError(f"{_OP}: seqlens is empty; give at least one document length")
        if any(s < 0 for s in lens):
            raise ValueError(f"{_OP}: seqlens must be document lengths >= 1, got {_short(lens)}")
        if sum(lens) == 0:
            raise ValueError(f"{_OP}: the documents hold no token (sum(seqlens) = 0)")
        if 0 in lens:
            why = (f"{_OP}: seqlens[{lens.index(0)}] is 0; every document needs at least one token "
                   f"(seqlens = {_short(lens)})")
            if lens[0] == 0 and all(a <= b for a, b in zip(lens, lens[1:])):
                diffs = [b - a for a, b in zip(lens, lens[1:])]
                why += (". It starts with 0 and never decreases, so it looks like cumulative offsets (cu_seqlens); "
                        "seqlens are the document lengths: use AttentionMask.from_cu_seqlens(cu_seqlens), or pass "
                        f"the differences {_short(diffs)}")
            raise ValueError(why)
        return cls._from_lengths(lens, block_ids, causal, device, check_blocks, _OP, what="seqlens")

    @classmethod
    def _from_lengths(cls, lens: list, block_ids: Optional[torch.Tensor], causal: bool,
                      device: Optional[torch.device], check_blocks: bool, op: str,
                      what: str = "the documents") -> "AttentionMask":
        """The mask of checked host lengths ``lens`` (documents of length 0 allowed: the empty rows of a padded
        batch); checks ``block_ids`` and the total length (``what`` names the lengths' argument in the error)."""
        total = sum(lens)
        if total > _MAX_TOKENS:
            raise ValueError(f"{op}: {what} hold{'' if what == 'the documents' else 's'} {total} tokens in all; at "
                             f"most 2**31 - 1 = {_MAX_TOKENS} fit the int32 offsets the kernels use")
        if block_ids is not None:
            if not isinstance(block_ids, torch.Tensor) or block_ids.is_floating_point() or block_ids.is_complex() \
                    or block_ids.dtype == torch.bool:
                got = block_ids.dtype if isinstance(block_ids, torch.Tensor) else type(block_ids).__name__
                raise TypeError(f"{op}: block_ids must be an integer tensor [T], got {got}")
            if block_ids.dim() != 1 or block_ids.numel() != total:
                raise ValueError(f"{op}: block_ids must have shape [{total}] (= sum(seqlens)), got {tuple(block_ids.shape)}")
        if causal and block_ids is not None and check_blocks:
            why = metadata.check_blocks(block_ids, lens) or _block_across_documents(block_ids, lens)
            if why:
                raise ValueError(f"{op}: {why}")
        return cls(lens, block_ids, causal, device)

    @classmethod
    def from_padding_mask(cls, attention_mask: torch.Tensor, block_ids: Optional[torch.Tensor] = None,
                          causal: bool = False, device: Optional[Union[str, torch.device]] = None) -> "AttentionMask":
        """One document per row of an HF-style padded batch (one host sync for the row lengths).

        Args:
            attention_mask: [B, S] bool or integer, nonzero = real token. Real tokens need not be contiguous
                (left or right padding both work): each row's real tokens, in order, form its document.
            block_ids: optional integer [B, S] (image blocks, see :meth:`from_seqlens`); padding is dropped.
            causal: as in :meth:`from_seqlens`.
            device: default attention_mask's device.

        Use :func:`pack` / :func:`unpack` with the returned mask to move [B, S, ...] tensors to the packed
        [T, ...] layout of ``masked_attention`` and back.
        """
        op = "AttentionMask.from_padding_mask"
        causal = check_bool("causal", causal, op)
        device = _device_arg(device, op)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(f"{op}: attention_mask must be a [B, S] tensor, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"{op}: attention_mask must be bool or integer (1 = real token), got {attention_mask.dtype}")
        device = device if device is not None else attention_mask.device
        real = attention_mask.to(device) != 0
        B, S = real.shape
        lens = real.sum(1).tolist()
        if sum(lens) == 0:
            raise ValueError(f"{op}: every position is padding; there is no token to attend")
        index = real.reshape(-1).nonzero().squeeze(1)
        packed_blocks = None
        if block_ids is not None:
            if not isinstance(block_ids, torch.Tensor) or block_ids.shape != (B, S):
                raise ValueError(f"{op}: block_ids must be a [{B}, {S}] tensor like attention_mask")
            packed_blocks = block_ids.to(device).reshape(-1)[index]
        mask = cls._from_lengths(lens, packed_blocks, causal, device, True, op)  # rows of padding only: length 0
        mask.padding_shape = (B, S)
        mask.padding_index = index
        return mask

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Union[Sequence[int], torch.Tensor],
                        block_ids: Optional[torch.Tensor] = None, causal: bool = False,
                        device: Optional[Union[str, torch.device]] = None) -> "AttentionMask":
        """Describe a packed sequence by cumulative document offsets, flash-attn's ``cu_seqlens`` convention.

        Args:
            cu_seqlens: [n_docs + 1] integer tensor (any integer dtype; flash-attn's is int32) or a sequence of
                ints: 0, then the running sum of the document lengths, so document d is tokens
                [cu_seqlens[d], cu_seqlens[d + 1]) and T = cu_seqlens[-1]. It must start with 0 and increase
                strictly (a repeated offset would be a zero-length document, which is refused). A GPU tensor
                costs one host sync.
            block_ids, causal: as in :meth:`from_seqlens`.
            device: where the metadata lives (default: cu_seqlens' device when it is a tensor, else
                block_ids' device, else CPU).

        ``AttentionMask.from_cu_seqlens(cu)`` equals ``AttentionMask.from_seqlens(cu[1:] - cu[:-1])``.
        """
        op = "AttentionMask.from_cu_seqlens"
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
                raise TypeError(f"{op}: cu_seqlens must be an integer tensor (flash-attn uses int32), "
                                f"got {cu_seqlens.dtype}")
            if device is None:
                device = cu_seqlens.device
        elif not isinstance(cu_seqlens, (list, tuple)):
            raise TypeError(f"{op}: cu_seqlens must be a 1-D integer tensor or a list of ints, "
                            f"got {type(cu_seqlens).__name__}")
        cu = as_int_list(cu_seqlens, "cu_seqlens", op)
        if len(cu) < 2:
            raise ValueError(f"{op}: cu_seqlens must hold at least 2 offsets (0 and T), got {cu}")
        if cu[0] != 0:
            raise ValueError(f"{op}: cu_seqlens must start with 0, got {_short(cu)}; for document lengths use "
                             f"AttentionMask.from_seqlens")
        for d in range(len(cu) - 1):
            if cu[d + 1] < cu[d]:
                raise ValueError(f"{op}: cu_seqlens must be nondecreasing, but cu_seqlens[{d}] = {cu[d]} > "
                                 f"cu_seqlens[{d + 1}] = {cu[d + 1]} (looks like document lengths? use "
                                 f"AttentionMask.from_seqlens)")
            if cu[d + 1] == cu[d]:
                raise ValueError(f"{op}: document {d} has zero length (cu_seqlens[{d}] = cu_seqlens[{d + 1}] = "
                                 f"{cu[d]}); drop empty documents from cu_seqlens")
        lens = [cu[d + 1] - cu[d] for d in range(len(cu) - 1)]
        return cls.from_seqlens(lens, block_ids=block_ids, causal=causal, device=device)

    @classmethod
    def from_xformers(cls, attn_bias, device: Optional[Union[str, torch.device]] = None) -> "AttentionMask":
        """The mask of an xformers block-diagonal attention bias (``xformers.ops.fmha.attn_bias``).

        Args:
            attn_bias: a ``BlockDiagonalMask`` (bidirectional within each block, as ``causal=False``) or a
                ``BlockDiagonalCausalMask`` (causal within each block, ``causal=True``) with the same query
                and key lengths. Every other bias (padded or gappy keys, local windows, bottom-right causal,
                different query and key lengths, tensors) raises, naming it. Blocks of length 0 are refused.
            device: where the metadata lives (default: the device of the bias' offsets).

        The bias applies to xformers' [1, T, H, K] layout; ``masked_attention`` takes the same tokens as
        [T, H, K] (drop the batch dimension). xformers itself is not imported here: the bias is recognised by
        its class name and module.
        """
        op = "AttentionMask.from_xformers"
        kind = _xformers_kind(attn_bias)
        name = type(attn_bias).__name__
        if kind is None:
            raise TypeError(f"{op}: attn_bias must be an xformers BlockDiagonalMask or BlockDiagonalCausalMask, "
                            f"got {type(attn_bias).__module__}.{name}")
        if kind not in _XFORMERS_ACCEPTED:
            raise ValueError(f"{op}: xformers {name} is not supported; only BlockDiagonalMask and "
                             f"BlockDiagonalCausalMask (equal query and key lengths) are")
        q_info = getattr(attn_bias, "q_seqinfo", None)
        k_info = getattr(attn_bias, "k_seqinfo", None)
        if q_info is None or k_info is None:
            raise ValueError(f"{op}: {name} has no q_seqinfo / k_seqinfo; unsupported xformers version")
        q_start, k_start = _xformers_starts(q_info), _xformers_starts(k_info)
        if q_start != k_start:
            raise ValueError(f"{op}: {name} has query offsets {_short(q_start)} and key offsets {_short(k_start)}; "
                             f"moca needs the same documents for queries and keys")
        if device is None:
            seqstart = getattr(q_info, "seqstart", None)
            device = seqstart.device if isinstance(seqstart, torch.Tensor) else None
        try:
            return cls.from_cu_seqlens(q_start, causal=_XFORMERS_ACCEPTED[kind], device=device)
        except ValueError as exc:
            raise ValueError(f"{op}: {name}: {exc}") from None

    # -- metadata ----------------------------------------------------------------------------------------------

    def tile_metadata(self, q_tile: int, k_tile: int) -> torch.Tensor:
        """int32 flat per-tile tables for query tiles of ``q_tile`` and key tiles of ``k_tile`` tokens, built
        on first use (no host sync) and cached on this mask (see ``metadata.py`` for the layout)."""
        key = (int(q_tile), int(k_tile))
        tables = self._tables.get(key)
        if tables is None:
            tables = metadata.tile_tables_op(self.spans, key[0], key[1])
            self._tables[key] = tables
        return tables

    def tiles(self, q_tile: int, k_tile: int) -> metadata.TileTables:
        """The cached tables of :meth:`tile_metadata` as named views (q_table, q_order, k_table, k_order)."""
        return metadata.split_tables(self.tile_metadata(q_tile, k_tile), self.total_len, q_tile, k_tile)

    def to(self, device: Union[str, torch.device]) -> "AttentionMask":
        """This mask on ``device`` (itself when already there; copies are made once and cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        copy = self._copies.get(device)
        if copy is None:
            copy = AttentionMask(self.seqlens, self.block_ids, self.causal, device,
                                 spans=_to_device(self.spans, device), cu_seqlens=_to_device(self.cu_seqlens, device))
            copy.padding_shape = self.padding_shape
            copy.padding_index = None if self.padding_index is None else self.padding_index.to(device)
            self._copies[device] = copy
        return copy

    def document_ids(self) -> torch.Tensor:
        """int32 [T]: the index of each token's document."""
        if self._doc_ids is None:
            lens = torch.tensor(self.seqlens, device=self.device)
            self._doc_ids = torch.repeat_interleave(torch.arange(len(lens), device=self.device, dtype=torch.int32), lens)
        return self._doc_ids

    def to_dense(self, rows: Optional[slice] = None) -> torch.Tensor:
        """bool [T, T] (or [rows, T]): True where query i may attend key j, from the definition (not from the
        spans). For tests and references only."""
        T = self.total_len
        qi = torch.arange(T, device=self.device)[rows if rows is not None else slice(None)]
        kj = torch.arange(T, device=self.device)
        doc = self.document_ids()
        allowed = doc[qi][:, None] == doc[None, :]
        if self.causal:
            within = kj[None, :] <= qi[:, None]
            if self.block_ids is not None:
                b = self.block_ids
                within = within | ((b[qi][:, None] == b[None, :]) & (b[qi][:, None] >= 0))
            allowed = allowed & within
        return allowed

    def __repr__(self) -> str:
        n = len(self.seqlens)
        shown = list(self.seqlens[:8]) + (["..."] if n > 8 else [])
        return (f"AttentionMask(T={self.total_len}, docs={n} {shown}, causal={self.causal}, "
                f"blocks={'yes' if self.block_ids is not None else 'no'}, device={self.device})")


_XFORMERS_ACCEPTED = {"BlockDiagonalMask": False, "BlockDiagonalCausalMask": True}   # class name -> causal


def _xformers_kind(obj) -> Optional[str]:
    """The class name of an xformers attention bias (by duck-typing: xformers is not imported), else None."""
    cls = type(obj)
    if (cls.__module__ or "").split(".")[0] != "xformers":
        return None
    return cls.__name__


def _xformers_starts(seqinfo) -> list:
    starts = getattr(seqinfo, "seqstart_py", None)
    if starts is None:
        starts = seqinfo.seqstart.tolist()
    return [int(x) for x in starts]


def _short(xs: Sequence[int], n: int = 8) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= n else str(xs[:n])[:-1] + ", ...]"


class _IdentityCache:
    """Masks built from one object (a cu_seqlens tensor, an xformers bias), reused while that object lives and
    is unchanged (a tensor's in-place version counter), so a model whose every layer passes the same object
    builds the mask and its per-tile tables once, not once per layer. Holds weak references only."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, obj, extra: tuple, build: Callable[[], "AttentionMask"]) -> "AttentionMask":
        version = obj._version if isinstance(obj, torch.Tensor) else None
        key = (id(obj),) + tuple(extra)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is obj and hit[1] == version:
            self._entries.move_to_end(key)
            return hit[2]
        mask = build()
        entries = self._entries
        try:
            ref = weakref.ref(obj, lambda _, key=key: entries.pop(key, None))
        except TypeError:   # not weak-referenceable: no caching
            return mask
        entries[key] = (ref, version, mask)
        while len(entries) > self.size:
            entries.popitem(last=False)
        return mask


_MASK_CACHE = _IdentityCache()


def mask_of_xformers_bias(attn_bias, device: torch.device) -> "AttentionMask":
    """:meth:`AttentionMask.from_xformers` on ``device``, cached per bias object (see ``_IdentityCache``)."""
    device = torch.device(device)
    return _MASK_CACHE.get(attn_bias, ("xformers", str(device)),
                           lambda: AttentionMask.from_xformers(attn_bias, device=device))


_MAX_TOKENS = 2**31 - 1


def _device_arg(device, op: str) -> Optional[torch.device]:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{op}: device must be a str, an int or a torch.device, got {type(device).__name__} "
                        f"{device!r}"[:300])
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{op}: device {device!r} is not a device ({exc})") from None


def _block_across_documents(block_ids: torch.Tensor, lens: list) -> Optional[str]:
    """A sentence when a block id >= 0 runs on across the boundary between two documents (an image split by
    the document lengths), else None (one host sync)."""
    starts, at = [], 0
    for n in lens[:-1]:
        at += n
        if 0 < at < len(block_ids):
            starts.append(at)
    if not starts:
        return None
    pos = torch.tensor(starts, device=block_ids.device)
    here, before = block_ids[pos].to(torch.int64), block_ids[pos - 1].to(torch.int64)
    bad = ((here == before) & (here >= 0)).nonzero()
    if bad.numel() == 0:
        return None
    i = int(bad[0, 0])
    return (f"block id {int(here[i])} runs across the boundary between two documents (tokens {starts[i] - 1} and "
            f"{starts[i]}); each block (image) must lie inside one document: check seqlens, and give each image "
            "its own id")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU copies from pinned memory without blocking the host."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _packing(mask: AttentionMask, op: str) -> Tuple[int, int, torch.Tensor]:
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"{op}: mask must be an AttentionMask, got {type(mask).__name__}")
    if mask.padding_shape is None or mask.padding_index is None:
        raise ValueError(f"{op}: the mask was not built by AttentionMask.from_padding_mask, so it knows no [B, S] layout")
    B, S = mask.padding_shape
    return B, S, mask.padding_index


def pack(x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """[B, S, ...] -> [T, ...]: the real tokens of a padded batch, row by row (differentiable).

    Args:
        x: [B, S, ...] any dtype, on the mask's device (the batch layout of ``mask.padding_shape``).
        mask: built by :meth:`AttentionMask.from_padding_mask`.
    """
    B, S, index = _packing(mask, "pack")
    if x.dim() < 2 or tuple(x.shape[:2]) != (B, S):
        raise ValueError(f"pack: x must be [B={B}, S={S}, ...] like the padding mask, got {tuple(x.shape)}")
    if x.device != index.device:
        raise ValueError(f"pack: x is on {x.device} but the mask is on {index.device}")
    return x.reshape(B * S, *x.shape[2:]).index_select(0, index)


def unpack(packed: torch.Tensor, mask: AttentionMask, fill: float = 0.0) -> torch.Tensor:
    """[T, ...] -> [B, S, ...]: the inverse of :func:`pack`, padding positions set to ``fill`` (differentiable
    with respect to ``packed``).

    Args:
        packed: [T, ...] any dtype, T = mask.total_len.
        mask: built by :meth:`AttentionMask.from_padding_mask`.
        fill: value of the padding positions.
    """
    B, S, index = _packing(mask, "unpack")
    if packed.dim() < 1 or packed.shape[0] != index.numel():
        raise ValueError(f"unpack: packed must be [T={index.numel()}, ...], got {tuple(packed.shape)}")
    if packed.device != index.device:
        raise ValueError(f"unpack: packed is on {packed.device} but the mask is on {index.device}")
    out = packed.new_full((B * S, *packed.shape[1:]), fill)
    return out.index_copy(0, index, packed).reshape(B, S, *packed.shape[1:])
