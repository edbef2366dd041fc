"""AttentionMask and its O(T) metadata: spans and tables checked against the dense definition, CUDA builder
against the torch builder, block checks, padding helpers."""

import random
import time

import pytest
import torch

import moca_kernels as mk
from moca_kernels import _ext
from moca_kernels.attention import metadata, pack, unpack

from .helpers import KINDS, build_mask, random_blocks, random_lengths, random_mask

HAS_CUDA = torch.cuda.is_available()


def dense_from_spans(mask):
    T = mask.total_len
    lo, hi = mask.spans.cpu()
    j = torch.arange(T)
    return (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])


@pytest.mark.parametrize("kind", KINDS)
def test_spans_equal_the_dense_definition_and_never_decrease(kind):
    rng = random.Random(1)
    for trial in range(40):
        mask = random_mask(rng, rng.randint(1, 70), kind)
        assert torch.equal(dense_from_spans(mask), mask.to_dense()), (kind, mask.seqlens)
        lo, hi = mask.spans
        assert bool((lo[1:] >= lo[:-1]).all()) and bool((hi[1:] >= hi[:-1]).all())


def _check_table(dense_rows, table, tile, T):
    """dense_rows: bool [T, T] with the owner on dim 0 (queries for the query table, keys for the key table)."""
    for t in range(table.shape[0]):
        block = dense_rows[t * tile:min(T, t * tile + tile)]
        seen_by_any, seen_by_all = block.any(0), block.all(0)
        span_lo, full_lo, full_hi, span_hi = table[t].tolist()
        hits = seen_by_any.nonzero().flatten()
        # exact span: nothing outside is allowed, nothing inside is empty
        assert span_lo == hits.min().item() and span_hi == hits.max().item() + 1
        assert bool(seen_by_any[span_lo:span_hi].all())
        if full_lo < full_hi:   # full range: exactly the columns every row of the tile sees
            full = seen_by_all.nonzero().flatten()
            assert (full_lo, full_hi) == (full.min().item(), full.max().item() + 1)
            assert bool(seen_by_all[full_lo:full_hi].all())
        else:                   # canonical empty range; a whole tile then has no full column
            assert full_lo == full_hi == span_hi
            if t * tile + tile <= T:
                assert not bool(seen_by_all.any())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q_tile,k_tile", [(16, 16), (4, 8), (8, 3), (1, 1)])
def test_tables_classify_tiles_exactly(kind, q_tile, k_tile):
    rng = random.Random(2)
    for trial in range(12):
        mask = random_mask(rng, rng.randint(1, 60), kind)
        T = mask.total_len
        dense = mask.to_dense()
        tabs = mask.tiles(q_tile, k_tile)
        _check_table(dense, tabs.q_table, q_tile, T)
        _check_table(dense.T, tabs.k_table, k_tile, T)
        for order, table in ((tabs.q_order, tabs.q_table), (tabs.k_order, tabs.k_table)):
            assert sorted(order.tolist()) == list(range(table.shape[0]))
            work = (table[:, 3] - table[:, 0])[order.long()]
            assert bool((work[1:] <= work[:-1]).all()), "largest-first order"


def test_tables_are_built_once_per_tile_size_and_cached():
    mask = mk.AttentionMask.from_seqlens([5, 7])
    a = mask.tile_metadata(16, 16)
    assert mask.tile_metadata(16, 16) is a
    assert mask.tile_metadata(16, 8) is not a
    assert a.dtype == torch.int32 and a.numel() == metadata.tables_size(12, 16, 16)


def test_blocks_split_across_two_runs_are_rejected():
    blocks = torch.tensor([-1, 3, 3, -1, 3, -1])
    with pytest.raises(ValueError, match="two separate runs"):
        mk.AttentionMask.from_seqlens([6], blocks, causal=True)
    # the same id in two documents is two blocks; without causal the blocks do not matter
    mk.AttentionMask.from_seqlens([3, 3], blocks, causal=True)
    mk.AttentionMask.from_seqlens([6], blocks, causal=False)


@pytest.mark.parametrize("bad,match", [
    (dict(seqlens=[]), "empty"),
    (dict(seqlens=[0, 0]), "no token"),
    (dict(seqlens=[3, -1]), ">= 1"),
    (dict(seqlens=[2.5]), "integers"),
    (dict(seqlens=[4], block_ids=torch.zeros(3, dtype=torch.long)), "shape"),
    (dict(seqlens=[4], block_ids=torch.zeros(4)), "integer tensor"),
    (dict(seqlens=[2], block_ids=torch.tensor([2**40, 2**40]), causal=True), "int32"),
])
def test_bad_mask_arguments_raise_one_clear_error(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mk.AttentionMask.from_seqlens(**bad)


def test_image_block_sees_itself_and_earlier_text_only():
    blocks = torch.tensor([-1, -1, 5, 5, -1])
    mask = mk.AttentionMask.from_seqlens([5], blocks, causal=True)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(mask.to_dense(), expected)
    assert torch.equal(dense_from_spans(mask), expected)


def test_padding_mask_round_trip_and_gradients():
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]])
    mask = mk.AttentionMask.from_padding_mask(attn, causal=True)
    assert mask.seqlens == (3, 3, 0, 3) and mask.causal and mask.padding_shape == (4, 5)
    x = torch.randn(4, 5, 6, requires_grad=True)
    packed = pack(x, mask)
    assert torch.equal(packed, x[attn.bool()])
    back = unpack(packed, mask, fill=-7.0)
    assert torch.equal(back[attn.bool()], x[attn.bool()]) and bool((back[~attn.bool()] == -7.0).all())
    (back * 2).sum().backward()
    assert torch.equal(x.grad, 2.0 * attn[..., None].float().expand(4, 5, 6))


def test_padding_mask_with_image_blocks():
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    blocks = torch.tensor([[-1, 0, 0, -1, 9], [3, 3, -1, -1, 4]])
    mask = mk.AttentionMask.from_padding_mask(attn, block_ids=blocks, causal=True)
    assert mask.block_ids.tolist() == [-1, 0, 0, -1, 3, 3, -1, -1, 4]
    assert torch.equal(dense_from_spans(mask), mask.to_dense())


def test_padding_helpers_reject_misuse():
    mask = mk.AttentionMask.from_padding_mask(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="B=2, S=3"):
        pack(torch.randn(3, 2), mask)
    with pytest.raises(ValueError, match="T=6"):
        unpack(torch.randn(5, 2), mask)
    with pytest.raises(ValueError, match="from_padding_mask"):
        pack(torch.randn(1, 4), mk.AttentionMask.from_seqlens([4]))
    with pytest.raises(ValueError, match="padding"):
        mk.AttentionMask.from_padding_mask(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="bool or integer"):
        mk.AttentionMask.from_padding_mask(torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------
# GPU: the CUDA C++ builder gives the torch builder's integers
# ---------------------------------------------------------------------------------------------------------


def _gpu_masks():
    rng = random.Random(3)
    for kind in KINDS:
        for total in (1, 2, 17, 255, 256, 257, 1000, 4099):
            for _ in range(3):
                yield kind, random_lengths(rng, total), None
    # long image blocks crossing many 256-token chunks, one reaching the end of T, blocks at document ends
    lens = [3000, 1, 6000, 2191]
    blocks = torch.full((sum(lens),), -1, dtype=torch.int64)
    blocks[10:2990] = 1
    blocks[3001:3001 + 6000] = 2
    blocks[9001 + 100:] = 7
    yield "mixed", lens, blocks
    lens = [131072 - 6000, 4000, 2000]
    yield "documents", lens, None
    rng2 = random.Random(4)
    big = random_lengths(rng2, 131072)
    yield "mixed", big, random_blocks(rng2, big, image_prob=0.5, max_image=4096)


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.available(), reason="moca_kernels._C not built")
def test_cuda_builder_matches_torch_builder():
    for kind, lens, blocks in _gpu_masks():
        if kind == "mixed" and blocks is None:
            blocks = random_blocks(random.Random(len(lens)), lens)
        mask = build_mask(lens, None if kind == "documents" else blocks, kind != "documents", "cuda")
        T = mask.total_len
        spans_torch = metadata.row_spans(mask.cu_seqlens, mask.block_ids, T, mask.causal, impl="torch")
        spans_cuda = metadata.row_spans(mask.cu_seqlens, mask.block_ids, T, mask.causal, impl="cuda")
        assert torch.equal(spans_cuda, spans_torch), (kind, lens[:5])
        for q_tile, k_tile in ((128, 128), (64, 128), (16, 7)):
            a = metadata.tile_tables(spans_torch, q_tile, k_tile, impl="torch")
            b = metadata.tile_tables(spans_torch, q_tile, k_tile, impl="cuda")
            assert torch.equal(a, b), (kind, lens[:5], q_tile, k_tile)


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.available(), reason="moca_kernels._C not built")
def test_cuda_metadata_build_time_is_reported():
    """Not a pass/fail on time: prints the build time of spans + tables at the headline shape."""
    lens = [4096, 2048, 3072, 1024, 512, 2560, 3072]
    mask = mk.AttentionMask.from_seqlens(lens, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        spans = metadata.row_spans(mask.cu_seqlens, None, 16384, False)
        metadata.tile_tables(spans, 128, 128)
    torch.cuda.synchronize()
    print(f"\nmetadata build (spans + tables, host-timed incl. launches): {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
