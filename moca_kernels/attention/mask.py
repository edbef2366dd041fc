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

Only O(T) data is held: cumulative document lengths, per-token document ids and optional block ids.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .._checks import as_int_list

_OP = "AttentionMask.from_seqlens"


class AttentionMask:
    """Mask description of a packed sequence (see the module docstring for the semantics).

    Attributes:
        cu_seqlens: int32 [n_docs + 1], cumulative document lengths starting at 0 (on ``device``).
        seqlens: tuple of the n_docs document lengths (host ints).
        block_ids: int32 [T] or None; tokens of one document sharing an id >= 0 form a bidirectional block.
        causal: bool.
        total_len: T = sum(seqlens).
    """

    def __init__(self, seqlens: Sequence[int], block_ids: Optional[torch.Tensor], causal: bool,
                 device: Optional[torch.device] = None):
        self.seqlens = tuple(int(s) for s in seqlens)
        self.total_len = sum(self.seqlens)
        self.causal = bool(causal)
        device = torch.device(device) if device is not None else (
            block_ids.device if block_ids is not None else torch.device("cpu"))
        self.device = device
        cu = [0]
        for s in self.seqlens:
            cu.append(cu[-1] + s)
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        self.block_ids = None if block_ids is None else block_ids.to(device=device, dtype=torch.int32).contiguous()
        self._doc_ids = None

    @classmethod
    def from_seqlens(cls, seqlens: Union[Sequence[int], torch.Tensor], block_ids: Optional[torch.Tensor] = None,
                     causal: bool = False, device: Optional[Union[str, torch.device]] = None) -> "AttentionMask":
        """Describe a packed sequence.

        Args:
            seqlens: lengths of the packed documents, ints or a 1-D integer tensor; each >= 0, sum = T > 0.
            block_ids: optional integer tensor [T]; within a document, tokens with the same id >= 0 form a
                block that attends bidirectionally (only meaningful with ``causal=True``).
            causal: False = bidirectional within each document; True = causal within each document, plus blocks.
            device: where the O(T) metadata lives (default: block_ids' device, else seqlens' device, else CPU).
        """
        if device is None and isinstance(seqlens, torch.Tensor):
            device = seqlens.device
        lens = as_int_list(seqlens, "seqlens", _OP)
        if not lens:
            raise ValueError(f"{_OP}: seqlens is empty; give at least one document length")
        if any(s < 0 for s in lens):
            raise ValueError(f"{_OP}: seqlens must be >= 0, got {lens}")
        total = sum(lens)
        if total == 0:
            raise ValueError(f"{_OP}: the documents hold no token (sum(seqlens) = 0)")
        if block_ids is not None:
            if not isinstance(block_ids, torch.Tensor) or block_ids.is_floating_point() or block_ids.dtype == torch.bool:
                raise TypeError(f"{_OP}: block_ids must be an integer tensor [T]")
            if block_ids.dim() != 1 or block_ids.numel() != total:
                raise ValueError(f"{_OP}: block_ids must have shape [{total}] (= sum(seqlens)), got {tuple(block_ids.shape)}")
        return cls(lens, block_ids, causal, device)

    def to(self, device: Union[str, torch.device]) -> "AttentionMask":
        device = torch.device(device)
        if device == self.device:
            return self
        return AttentionMask(self.seqlens, self.block_ids, self.causal, device)

    def document_ids(self) -> torch.Tensor:
        """int32 [T]: the index of each token's document."""
        if self._doc_ids is None:
            lens = torch.tensor(self.seqlens, device=self.device)
            self._doc_ids = torch.repeat_interleave(torch.arange(len(lens), device=self.device, dtype=torch.int32), lens)
        return self._doc_ids

    def to_dense(self, rows: Optional[slice] = None) -> torch.Tensor:
        """bool [T, T] (or [rows, T]): True where query i may attend key j. For tests and references only."""
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
