"""O(T) mask metadata for the attention kernels: per-token key spans and per-tile tables.

Every mask ``AttentionMask`` describes (bidirectional documents, causal documents, causal text with
bidirectional image blocks) has one property the kernels rely on: **each query i attends to one contiguous
span of keys** ``[lo_i, hi_i)``, and both ends never decrease with i:

* bidirectional (``causal=False``): ``lo_i`` = start of i's document, ``hi_i`` = its end;
* causal: ``lo_i`` = start of i's document, ``hi_i`` = i + 1, or the end of i's block when i lies in an image
  block (keys before the block are <= i, keys of the block share its id, keys after it are > every query of
  the block). This needs every block to be one contiguous run of tokens, which ``AttentionMask`` checks.

From the spans, the tables the kernels read are exact and O(T / tile):

* **query tiles** (forward, dQ): tile t covers queries ``q0 .. ql``. Its keys are ``[lo_q0, hi_ql)`` (every
  key tile outside is empty, every one inside holds at least one allowed pair), and the keys every query of
  the tile sees are ``[lo_ql, hi_q0)``: key tiles inside that range are *full* (no mask arithmetic), the rest
  are *partial*.
* **key tiles** (dK/dV): tile t covers keys ``k0 .. kl``. The queries that see key x are
  ``[first(x), end(x))`` with ``first(x) = #{i : hi_i <= x}`` and ``end(x) = #{i : lo_i <= x}`` (binary
  searches, since the spans are monotone); the tile's queries are ``[first(k0), end(kl))``, and the queries
  seeing all of it are ``[first(kl), end(k0))``.

Ranges are stored in tokens, so the tile size of the loop that walks them is free (the kernels convert to
their own tile size); only the owner tile size (the tile a program owns) is baked into a table. A tile that
reaches past T, or whose full range is empty, stores the canonical empty full range ``(hi, hi)``. Each table
comes with an order: tiles by decreasing work (span length), ties by index, so the longest programs start
first (largest-first scheduling).

Layout of one tables tensor (int32, flat): ``q_table [nQ, 4] | q_order [nQ] | k_table [nK, 4] | k_order [nK]``
with rows ``(span_lo, full_lo, full_hi, span_hi)``. ``spans`` is int32 ``[2, T]`` (row 0 = lo, row 1 = hi).

Two builders give identical results: CUDA C++ (``csrc/attention_meta.cu``, a few small launches, no host
sync) and plain torch (CPU, or when the extension is not built). They are the backends of two internal ops
(``attention_row_spans``, ``attention_tile_tables``) dispatched like every op (``moca_kernels.dispatch``):
``impl=`` or ``MOCA_KERNELS_IMPL=attention_tile_tables=torch`` forces one; a single backend name in
``MOCA_KERNELS_IMPL`` applies to them only when they have that backend (``torch``, ``cuda``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _ext
from ..dispatch import Backend, Op, cuda_ext_reasons


# ---------------------------------------------------------------------------------------------------------
# Per-token spans
# ---------------------------------------------------------------------------------------------------------


def row_spans(cu_seqlens: torch.Tensor, block_ids: Optional[torch.Tensor], total_len: int, causal: bool,
              impl: Optional[str] = None) -> torch.Tensor:
    """int32 [2, T]: query i attends to keys ``[spans[0, i], spans[1, i])``.

    Args:
        cu_seqlens: int32 [n_docs + 1] cumulative document lengths (0 first, T last).
        block_ids: int32 [T] or None (only read when ``causal``); blocks must be contiguous runs.
        total_len: T.
        causal: see the module docstring.
        impl: "cuda", "torch" or None (cuda when the tensors are on a GPU and the extension is built).
    """
    return _ROW_SPANS(impl, cu_seqlens=cu_seqlens, block_ids=block_ids if causal else None, total_len=total_len,
                      causal=causal)


def _document_index(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """int64 [T]: the document d with cu[d] <= i < cu[d + 1] (documents of length 0 are skipped)."""
    pos = torch.arange(total_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)


def _run_starts(block_ids: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """bool [T]: True where a new run begins: a document start, a token outside any block (id < 0), or a
    change of block id. A block of one document is then the run of tokens between two such starts."""
    T = block_ids.numel()
    pos = torch.arange(T, device=block_ids.device, dtype=doc_start.dtype)
    prev = torch.cat([block_ids.new_full((1,), -1), block_ids[:-1]])
    return (pos == doc_start) | (block_ids < 0) | (prev < 0) | (block_ids != prev)


def _row_spans_torch(cu_seqlens, block_ids, total_len, causal):
    T = total_len
    cu = cu_seqlens.to(torch.int32)
    doc = _document_index(cu, T)
    lo = cu[doc]
    if not causal:
        hi = cu[doc + 1]
    elif block_ids is None:
        hi = torch.arange(1, T + 1, device=cu.device, dtype=torch.int32)
    else:
        starts = _run_starts(block_ids.to(torch.int32), lo)
        pos = torch.arange(T, device=cu.device, dtype=torch.int32)
        # hi_i = the first run start after i (or T): a suffix minimum over "position if run start else T"
        marked = torch.where(starts, pos, torch.full_like(pos, T))
        after = torch.cat([marked[1:], marked.new_full((1,), T)])
        hi = torch.flip(torch.cummin(torch.flip(after, [0]), 0).values, [0])
    return torch.stack([lo, hi.to(torch.int32)]).contiguous()


def _row_spans_cuda(cu_seqlens, block_ids, total_len, causal):
    T = total_len
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int32).contiguous()
    spans = torch.empty(2, T, dtype=torch.int32, device=dev)
    has_blocks = block_ids is not None
    # one int per 256-token chunk: the chunk's first run start (for run ends that cross chunks)
    scratch = torch.empty((T + 255) // 256 if has_blocks else 1, dtype=torch.int32, device=dev)
    blocks = block_ids.to(torch.int32).contiguous() if has_blocks else None
    status = _ext.module().attention_row_spans(
        cu.data_ptr(), cu.numel() - 1, blocks.data_ptr() if has_blocks else 0, T, bool(causal),
        spans.data_ptr(), scratch.data_ptr(), _ext.stream_handle(dev))
    _ext.check_launch("attention_row_spans", status)
    return spans


_ROW_SPANS = Op("attention_row_spans", [
    Backend("cuda", lambda cu_seqlens, block_ids, **_: cuda_ext_reasons(cu_seqlens, block_ids), _row_spans_cuda),
    Backend("torch", lambda **_: [], _row_spans_torch),
], global_env=False)


def check_blocks(block_ids: torch.Tensor, seqlens) -> Optional[str]:
    """None when every block id >= 0 fits in int32 and forms one contiguous run inside each document, else a
    sentence saying what is wrong (one host sync).

    Args:
        block_ids: integer [T] on any device.
        seqlens: the document lengths (host ints).
    """
    T = block_ids.numel()
    dev = block_ids.device
    b = block_ids.to(torch.int64)
    out_of_range = ((b > 2**31 - 1) | (b < -2**31)).any()
    cu = torch.tensor([0] + list(seqlens), dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    doc = _document_index(cu, T)
    starts = _run_starts(b.clamp(-1, 2**31 - 1).to(torch.int32), cu[doc]) & (b >= 0)
    keys = (doc[starts] * (2 ** 32) + b[starts]).sort().values
    dup = keys[1:] == keys[:-1]
    first = torch.where(dup, keys[1:], keys.new_full(dup.shape, -1)).max() if dup.numel() else keys.new_tensor(-1)
    bad_range, first = torch.stack([out_of_range.to(torch.int64), first.to(torch.int64)]).tolist()
    if bad_range:
        return "block ids must fit in int32"
    if first < 0:
        return None
    return (f"block id {first % 2 ** 32} appears in two separate runs of document {first // 2 ** 32}; each block "
            "(image) must be one contiguous run of tokens: give each image its own id")


# ---------------------------------------------------------------------------------------------------------
# Per-tile tables
# ---------------------------------------------------------------------------------------------------------


class TileTables(NamedTuple):
    """Views into one tables tensor (see the module docstring)."""
    q_table: torch.Tensor  # int32 [nQ, 4]: (span_lo, full_lo, full_hi, span_hi) in key tokens
    q_order: torch.Tensor  # int32 [nQ]: query tiles by decreasing work
    k_table: torch.Tensor  # int32 [nK, 4]: (span_lo, full_lo, full_hi, span_hi) in query tokens
    k_order: torch.Tensor  # int32 [nK]


def n_tiles(total_len: int, tile: int) -> int:
    return (total_len + tile - 1) // tile


def tables_size(total_len: int, q_tile: int, k_tile: int) -> int:
    return 5 * n_tiles(total_len, q_tile) + 5 * n_tiles(total_len, k_tile)


def split_tables(tables: torch.Tensor, total_len: int, q_tile: int, k_tile: int) -> TileTables:
    nq, nk = n_tiles(total_len, q_tile), n_tiles(total_len, k_tile)
    return TileTables(tables[:4 * nq].view(nq, 4), tables[4 * nq:5 * nq],
                      tables[5 * nq:5 * nq + 4 * nk].view(nk, 4), tables[5 * nq + 4 * nk:])


def tile_tables(spans: torch.Tensor, q_tile: int, k_tile: int, impl: Optional[str] = None) -> torch.Tensor:
    """int32 flat tables for query tiles of ``q_tile`` and key tiles of ``k_tile`` tokens (module docstring).

    Args:
        spans: int32 [2, T] from :func:`row_spans`.
        q_tile, k_tile: owner tile sizes (positive).
        impl: "cuda", "torch" or None (cuda when on a GPU and the extension is built).
    """
    if q_tile <= 0 or k_tile <= 0:
        raise ValueError(f"tile_tables: tile sizes must be positive, got {q_tile}, {k_tile}")
    return _TILE_TABLES(impl, spans=spans, q_tile=q_tile, k_tile=k_tile)


def _order_by_work(table: torch.Tensor) -> torch.Tensor:
    work = table[:, 3] - table[:, 0]
    return torch.sort(work, descending=True, stable=True).indices.to(torch.int32)


def _canonical(table: torch.Tensor, tile_end: torch.Tensor, total_len: int) -> torch.Tensor:
    """Empty full ranges (or tiles past T) become (span_hi, span_hi)."""
    no_full = (table[:, 1] >= table[:, 2]) | (tile_end > total_len)
    table[:, 1] = torch.where(no_full, table[:, 3], table[:, 1])
    table[:, 2] = torch.where(no_full, table[:, 3], table[:, 2])
    return table


def _tile_tables_torch(spans, q_tile, k_tile):
    T = spans.shape[1]
    lo, hi = spans[0].contiguous(), spans[1].contiguous()
    dev = spans.device
    q0 = torch.arange(0, T, q_tile, device=dev, dtype=torch.int64)
    ql = torch.clamp(q0 + q_tile, max=T) - 1
    q_table = torch.stack([lo[q0], lo[ql], hi[q0], hi[ql]], 1).to(torch.int32)
    q_table = _canonical(q_table, q0 + q_tile, T)
    k0 = torch.arange(0, T, k_tile, device=dev, dtype=torch.int32)
    kl = torch.clamp(k0 + k_tile, max=T) - 1
    first = lambda x: torch.searchsorted(hi, x, right=True)  # noqa: E731  #{i : hi_i <= x}
    end = lambda x: torch.searchsorted(lo, x, right=True)  # noqa: E731    #{i : lo_i <= x}
    k_table = torch.stack([first(k0), first(kl), end(k0), end(kl)], 1).to(torch.int32)
    k_table = _canonical(k_table, k0.to(torch.int64) + k_tile, T)
    return torch.cat([q_table.reshape(-1), _order_by_work(q_table), k_table.reshape(-1), _order_by_work(k_table)])


def _tile_tables_cuda(spans, q_tile, k_tile):
    T = spans.shape[1]
    spans = spans.contiguous()
    out = torch.empty(tables_size(T, q_tile, k_tile), dtype=torch.int32, device=spans.device)
    status = _ext.module().attention_tile_tables(spans.data_ptr(), T, q_tile, k_tile, out.data_ptr(),
                                                 _ext.stream_handle(spans.device))
    _ext.check_launch("attention_tile_tables", status)
    return out


_TILE_TABLES = Op("attention_tile_tables", [
    Backend("cuda", lambda spans, **_: cuda_ext_reasons(spans), _tile_tables_cuda),
    Backend("torch", lambda **_: [], _tile_tables_torch),
], global_env=False)


# The tables as a custom op, so a compiled function that meets a fresh mask builds them in its graph (the
# spans are a [T] input: document lengths and counts never reach the graph's guards).
@torch.library.custom_op("moca_kernels::attention_tile_tables", mutates_args=())
def tile_tables_op(spans: torch.Tensor, q_tile: int, k_tile: int) -> torch.Tensor:
    return tile_tables(spans, q_tile, k_tile)


@tile_tables_op.register_fake
def _(spans, q_tile, k_tile):
    T = spans.shape[1]
    return spans.new_empty(5 * ((T + q_tile - 1) // q_tile) + 5 * ((T + k_tile - 1) // k_tile))
