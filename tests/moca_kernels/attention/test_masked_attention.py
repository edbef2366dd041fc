"""masked_attention: the triton kernels (interpreted on CPU in float32/float16, compiled on GPU in bfloat16)
against the float64 reference on random masks of every kind; tile edge cases, poisoned outputs, bad inputs,
dispatch, torch.compile."""

import random

import pytest
import torch

import moca_kernels as mk
from moca_kernels import _alloc, reference
from moca_kernels.attention import metadata, pack, unpack
from moca_kernels import tuning
from moca_kernels.attention import tiles
from moca_kernels.attention.op import _OP
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import assert_close_like_torch, rand

from .helpers import naive_attention, random_mask

HAS_CUDA = torch.cuda.is_available()


def run_three_ways(mask, q, k, v, scale, deterministic, lse_grad, impl="triton"):
    """(ours, float64 reference, PyTorch in the inputs' dtype), each as (out, lse, dq, dk, dv)."""
    T, Hq, D = q.shape
    g = torch.Generator(device="cpu").manual_seed(7)
    d_out = torch.randn(T, Hq, D, generator=g).to(q.device)
    d_lse = torch.randn(Hq, T, generator=g).to(q.device) if lse_grad else None

    def go(fn, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out, lse = fn(qq, kk, vv)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        loss = (out.to(wide) * d_out.to(wide)).sum()
        if d_lse is not None:
            loss = loss + (lse * d_lse.to(lse.dtype)).sum()
        loss.backward()
        return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad

    ours = go(lambda a, b, c: mk.masked_attention(a, b, c, mask, scale=scale, return_lse=True, impl=impl,
                                                  deterministic=deterministic), q.dtype)
    ref = go(lambda a, b, c: reference.masked_attention(a, b, c, mask, scale=scale, return_lse=True), torch.float64)
    low = go(lambda a, b, c: naive_attention(a, b, c, mask, scale=scale, return_lse=True), q.dtype)
    return ours, ref, low


def use_tiles(q_tile, k_tile, fwd_n, dkdv_m, dq_n, split=1):
    """Owner tiles, walked tiles and GQA split forced (interpreter tests)."""
    return tuning.override(attention_test_tiles=dict(q_tile=q_tile, k_tile=k_tile, fwd_n=fwd_n, dkdv_m=dkdv_m,
                                                     dq_n=dq_n, split=split))


def check_against_float64(kind, Hq, Hkv, D, dtype, T, seed, deterministic, device, scale=None, lse_grad=False,
                          impl="triton"):
    rng = random.Random(seed)
    mask = random_mask(rng, T, kind, device=device)
    torch.manual_seed(seed)
    q = rand(T, Hq, D, dtype=dtype, device=device)
    k = rand(T, Hkv, D, dtype=dtype, device=device)
    v = rand(T, Hkv, D, dtype=dtype, device=device)
    ours, ref, low = run_three_ways(mask, q, k, v, scale, deterministic, lse_grad, impl=impl)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32 and ours[1].shape == (Hq, T)
    for name, a, r, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, low):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_close_like_torch(a, r, b, dtype=dtype, what=f"{name} ({kind}, {mask.seqlens})")


# One case per line: every mask kind, GQA groups 1, 3 and 7, head dims 64, 80 and 128, float32 and float16,
# lengths not multiples of the 16-token interpreted tiles, both backward modes, a custom scale, a lse gradient.
CASES = [
    # kind,       Hq, Hkv, D,   dtype,         T,  deterministic, scale, lse_grad
    ("documents", 3, 1, 64, torch.float32, 45, False, None, False),
    ("causal", 7, 1, 80, torch.float16, 38, True, None, False),
    ("mixed", 2, 2, 128, torch.float32, 37, False, 0.2, True),
    ("mixed", 7, 1, 64, torch.float16, 50, False, None, False),
    ("documents", 6, 2, 128, torch.float16, 33, True, None, True),
    ("causal", 3, 3, 80, torch.float32, 41, False, None, False),
    ("mixed", 6, 2, 80, torch.float32, 47, True, None, False),
]


@pytest.mark.parametrize("kind,Hq,Hkv,D,dtype,T,deterministic,scale,lse_grad", CASES)
def test_triton_matches_float64(kind, Hq, Hkv, D, dtype, T, deterministic, scale, lse_grad, device):
    check_against_float64(kind, Hq, Hkv, D, dtype, T, seed=T * 31 + Hq, deterministic=deterministic, device=device,
                          scale=scale, lse_grad=lse_grad)


@pytest.mark.parametrize("seed", range(10))
def test_triton_matches_float64_on_random_masks(seed, device):
    """Random kind, length, GQA group (1, 3, 7), head dim (64, 80, 96, 128) and backward mode per seed."""
    rng = random.Random(100 + seed)
    kind = ("documents", "causal", "mixed")[seed % 3]
    Hq, Hkv = rng.choice([(1, 1), (3, 1), (7, 1), (6, 2), (2, 2)])
    D = rng.choice([64, 80, 96, 128])
    dtype = torch.float16 if seed % 4 == 3 else torch.float32
    check_against_float64(kind, Hq, Hkv, D, dtype, rng.randint(1, 60), seed=seed, deterministic=rng.random() < 0.5,
                          device=device, lse_grad=rng.random() < 0.3)


@pytest.mark.parametrize("tiles", [dict(q_tile=32, k_tile=16, fwd_n=16, dkdv_m=32, dq_n=16, split=2),
                                   dict(q_tile=16, k_tile=32, fwd_n=32, dkdv_m=16, dq_n=32, split=3)])
def test_walked_tiles_and_group_split_variants(tiles, device):
    """Walked tile sizes other than the owner tiles, and the dK/dV kernel splitting a GQA group over programs
    (7 heads over 3 programs: 3 + 3 + 1)."""
    if device.type == "cuda":
        pytest.skip("tile overrides are an interpreter check")
    with use_tiles(**tiles):
        check_against_float64("mixed", 4, 2, 64, torch.float32, 71, seed=5, deterministic=False, device=device)
        check_against_float64("causal", 7, 1, 64, torch.float32, 40, seed=6, deterministic=True, device=device)


def test_tile_without_allowed_key_for_some_rows_gives_no_nan(device):
    """Causal documents starting mid-tile: the first key tiles of a query tile hold no allowed key for most
    of its rows (the online softmax must not produce exp(-inf - -inf))."""
    mask = mk.AttentionMask.from_seqlens([14, 1, 1, 20, 3], causal=True, device=device)
    T = mask.total_len
    q, k, v = (rand(T, 2, 64, device=device, scale=3.0) for _ in range(3))
    out, lse = mk.masked_attention(q, k, v, mask, return_lse=True, impl="triton")
    ref, ref_lse = reference.masked_attention(q.double(), k.double(), v.double(), mask, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    # a 1-token document attends to itself only: its output is its own value row
    torch.testing.assert_close(out[14], v[14], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens", [[1], [1, 1], [1] * 21, [2, 1, 1]])
def test_one_token_documents_and_tiny_sequences(lens, device):
    mask = mk.AttentionMask.from_seqlens(lens, device=device)
    T = mask.total_len
    q, k, v = (rand(T, h, 64, device=device).requires_grad_() for h in (3, 1, 1))
    out = mk.masked_attention(q, k, v, mask, impl="triton")
    out.square().sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.masked_attention(q64, k64, v64, mask)
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # dQ and dK go through dS = P * (dP - D) with D = rowsum(dO * O) (FlashAttention's backward). For a 1-token
    # document P = 1 and dP = D exactly, so the float64 reference's dQ, dK rows are 0, while in float32 they are
    # the rounding of dP - D, two sums of 64 products of size |dO| |v| ~ 10: a few ulps of that, times the
    # scale and |k|, ~1e-5 (1.4e-5 seen with triton 3.9's interpreter, 0.6e-5 with 3.6). The bound is 8 such
    # ulps, not a fixed 1e-5.
    dp = (2 * out.detach().double() * v.detach().double().repeat_interleave(3, dim=1)).abs().sum(-1).max().item()
    fa_floor = 8 * torch.finfo(torch.float32).eps * dp * 64 ** -0.5 * max(q.abs().max().item(), k.abs().max().item())
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=max(1e-5, fa_floor))


def _grads_against_float64(q, k, v, mask):
    """Forward, lse and the three gradients of the triton backend against float64 (q, k, v: leaves or views)."""
    out, lse = mk.masked_attention(q, k, v, mask, return_lse=True, impl="triton")
    dq, dk, dv = torch.autograd.grad(out.square().sum() + lse.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.masked_attention(q64, k64, v64, mask, return_lse=True)
    ref_grads = torch.autograd.grad(ref.square().sum() + ref_lse.sum(), (q64, k64, v64))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), (ref, ref_lse, *ref_grads)):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


def test_strided_views_match_float64(device):
    """q as a transposed [Hq, T, D] tensor, k and v as views into one fused [T, 2, Hkv, D] tensor, and a
    last-dim stride of 2 (copied): the kernels read the strides they are given."""
    mask = mk.AttentionMask.from_seqlens([6, 1, 12], causal=True, device=device)
    q = rand(2, 19, 64, device=device).requires_grad_().transpose(0, 1)
    kv = rand(19, 2, 1, 64, device=device).requires_grad_()
    v_wide = rand(19, 1, 128, device=device).requires_grad_()
    assert not q.is_contiguous() and not kv[:, 0].is_contiguous() and v_wide[..., ::2].stride(-1) == 2
    _grads_against_float64(q, kv[:, 0], v_wide[..., ::2], mask)


@pytest.mark.parametrize("Hq,kind", [(6, "mixed"), (16, "documents")])
def test_gqa_groups_of_6_and_16_match_float64(Hq, kind, device):
    """6 and 16 query heads per key/value head (groups beyond the 1, 2, 3 and 7 of the tests above)."""
    mask = random_mask(random.Random(Hq), 19, kind, device=device)
    q = rand(19, Hq, 64, device=device).requires_grad_()
    k, v = (rand(19, 1, 64, device=device).requires_grad_() for _ in range(2))
    _grads_against_float64(q, k, v, mask)


@pytest.mark.parametrize("deterministic,split", [(False, 1), (True, 1), (False, 2)])
def test_every_output_element_is_written(deterministic, split, device):
    rng = random.Random(11)
    mask = random_mask(rng, 35, "mixed", device=device)
    T = mask.total_len
    q, k, v = (rand(T, h, 64, device=device).requires_grad_() for h in (4, 2, 2))
    forced = use_tiles(*tiles.plan(device, torch.float32, 64), 16, 16, 16, split=split)
    with _alloc.poisoned(), forced:
        out, lse = mk.masked_attention(q, k, v, mask, return_lse=True, impl="triton", deterministic=deterministic)
        (out.sum() + lse.sum()).backward()
    for name, t in (("out", out), ("lse", lse), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


def test_padded_batch_through_pack_and_unpack(device):
    attn = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], device=device)
    mask = mk.AttentionMask.from_padding_mask(attn)
    x = rand(3, 7, 2, 64, device=device)
    packed = pack(x, mask)
    out = unpack(mk.masked_attention(packed, packed, packed, mask, impl="triton"), mask)
    for b in range(3):   # each row alone, without padding
        real = attn[b].bool()
        alone = reference.masked_attention(x[b][real], x[b][real], x[b][real], mk.AttentionMask.from_seqlens([int(real.sum())]))
        torch.testing.assert_close(out[b][real], alone, rtol=1e-4, atol=1e-5)
        assert bool((out[b][~real] == 0).all())


# ---------------------------------------------------------------------------------------------------------
# Bad input and dispatch
# ---------------------------------------------------------------------------------------------------------


def _qkv(T=6, Hq=4, Hkv=2, D=16, **kw):
    return rand(T, Hq, D, **kw), rand(T, Hkv, D, **kw), rand(T, Hkv, D, **kw)


@pytest.mark.parametrize("make,match,exc", [
    (lambda m: (_qkv()[0][0], *_qkv()[1:], m), "3-D", ValueError),
    (lambda m: (*_qkv(Hq=3), m), "multiple of key/value heads", ValueError),
    (lambda m: (*_qkv(T=7), m), "covers 6 tokens", ValueError),
    (lambda m: (_qkv()[0], _qkv()[1].half(), _qkv()[2], m), "one dtype", TypeError),
    (lambda m: (*(t.long() for t in _qkv()), m), "float32", TypeError),
    (lambda m: (*_qkv(), "not a mask"), "AttentionMask", TypeError),
    (lambda m: (_qkv()[0], _qkv(D=8)[1], _qkv(D=8)[2], m), "D=16", ValueError),
    (lambda m: (_qkv()[0], _qkv()[1], _qkv(Hkv=1)[2], m), "same shape", ValueError),
    (lambda m: (*_qkv(Hq=0, Hkv=0), m), "empty input", ValueError),
    (lambda m: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2], m), "one device", ValueError),
])
def test_bad_inputs_raise_one_clear_error(make, match, exc):
    mask = mk.AttentionMask.from_seqlens([2, 4])
    with pytest.raises(exc, match=match):
        mk.masked_attention(*make(mask))


def test_bad_scale_and_impl_raise():
    mask = mk.AttentionMask.from_seqlens([6])
    for bad in (-1.0, float("inf"), True):   # inf would make every output NaN; True is not a scale
        with pytest.raises((ValueError, TypeError), match="scale"):
            mk.masked_attention(*_qkv(), mask, scale=bad)
    with pytest.raises(ValueError, match="impl"):
        mk.masked_attention(*_qkv(), mask, impl="nope")
    with pytest.raises(BackendUnavailable, match="no 'cuda' backend"):
        mk.masked_attention(*_qkv(), mask, impl="cuda")


def test_unsupported_head_dim_falls_back_to_torch_with_the_reason():
    mask = mk.AttentionMask.from_seqlens([3, 3])
    q, k, v = _qkv(D=160)
    reasons = _OP.not_supported_reasons(q=q, k=k, v=v, mask=mask, scale=None, return_lse=False, deterministic=False)
    assert any("head dim 160" in r for r in reasons["triton"]) and reasons["torch"] == []
    with pytest.raises(BackendUnavailable, match="head dim 160"):
        mk.masked_attention(q, k, v, mask, impl="triton")
    out = mk.masked_attention(q, k, v, mask)   # automatic: torch
    torch.testing.assert_close(out, reference.masked_attention(q, k, v, mask))


def test_float64_goes_to_the_torch_backend():
    mask = mk.AttentionMask.from_seqlens([3, 3], causal=True)
    q, k, v = _qkv(dtype=torch.float64)
    reasons = _OP.not_supported_reasons(q=q, k=k, v=v, mask=mask, scale=None, return_lse=False, deterministic=False)
    assert any("float64" in r for r in reasons["triton"])
    assert mk.masked_attention(q, k, v, mask).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck(device):
    """Schema, fake implementations (shapes, strides, dtypes) against the real kernels, autograd registration
    and AOT dispatch of the three custom ops."""
    mask = mk.AttentionMask.from_seqlens([10, 7], causal=True, device=device)
    q_tile, k_tile = tiles.plan(device, torch.float32, 64)
    q = rand(17, 4, 64, device=device).requires_grad_()
    k, v = (rand(17, 2, 64, device=device).requires_grad_() for _ in range(2))
    tables = mask.tile_metadata(q_tile, k_tile)
    ops = torch.ops.moca_kernels
    torch.library.opcheck(ops.attention_tile_tables.default, (mask.spans, q_tile, k_tile))
    for fwd_variant, bwd_variant in (("base", "base"), ("ws", "fused")):
        torch.library.opcheck(ops.masked_attention_fwd.default, (q, k, v, mask.spans, tables, 0.125, q_tile, k_tile,
                                                                 False, fwd_variant, bwd_variant))
    out, lse = ops.masked_attention_fwd(q.detach(), k.detach(), v.detach(), mask.spans, tables, 0.125, q_tile, k_tile,
                                        False, "base", "base")
    for d_lse, deterministic, bwd_variant in ((None, True, "base"), (torch.randn_like(lse), False, "even")):
        torch.library.opcheck(ops.masked_attention_bwd.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                              out, lse, d_lse, mask.spans, tables, 0.125, q_tile, k_tile, deterministic, bwd_variant))


def test_compiled_function_does_not_recompile_when_documents_change(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def layer(q, k, v, mask):
        return mk.masked_attention(q, k, v, mask).square().sum()

    T = 40
    q, k, v = (rand(T, h, 64, device=device).requires_grad_() for h in (4, 2, 2))
    rng = random.Random(3)
    for kind in ("documents", "mixed", "mixed", "documents"):
        mask = random_mask(rng, T, kind, device=device)
        for t in (q, k, v):
            t.grad = None
        loss = layer(q, k, v, mask)
        loss.backward()
        ref = reference.masked_attention(q.double(), k.double(), v.double(), mask).square().sum()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(q.grad).all()
    # one graph for bidirectional masks, one for causal ones (causal is part of the mask's identity)
    assert counter.frame_count <= 2, f"recompiled: {counter.frame_count} frames"


def test_compiled_function_called_again_with_the_same_mask(device):
    """The second call finds the tables cached on the mask: at most one more graph, same numbers."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layer = torch.compile(lambda q, mask: mk.masked_attention(q, q, q, mask), backend=counter, fullgraph=True)
    q = rand(33, 2, 64, device=device)
    masks = [mk.AttentionMask.from_seqlens(lens, causal=True, device=device) for lens in ([3, 30], [33], [1, 31, 1])]
    for mask in masks:
        first = layer(q, mask)
        second = layer(q, mask)
        torch.testing.assert_close(first, second)
        torch.testing.assert_close(first, reference.masked_attention(q, q, q, mask), rtol=1e-4, atol=1e-5)
    assert counter.frame_count <= 2


def test_compiled_layers_share_one_table_build(device):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()

    @torch.compile(backend=backend, fullgraph=True)
    def two_layers(x, mask):
        h = mk.masked_attention(x, x, x, mask)
        return mk.masked_attention(h, h, h, mask)

    mask = mk.AttentionMask.from_seqlens([9, 1, 20], device=device)
    x = rand(30, 2, 64, device=device)
    torch.testing.assert_close(two_layers(x, mask), mk.masked_attention(mk.masked_attention(x, x, x, mask), *(
        [mk.masked_attention(x, x, x, mask)] * 2), mask), rtol=1e-5, atol=1e-6)
    builds = [n for n in graphs[0].graph.nodes if "attention_tile_tables" in str(n.target)]
    assert len(builds) == 1


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 against float64, long sequences, determinism, compiled with inductor
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_config(monkeypatch):
    """One config per kernel on GPU tests (the benchmark tunes): a handful of compiles instead of dozens."""
    with tuning.override(attention_tune=0):
        yield


# Few distinct kernel variants (each costs a compile): bf16 at D = 128 in both backward modes and at D = 80
# (vision tower); fp16 / fp32 below.
GPU_CASES = [
    # kind,      Hq, Hkv, D,  T,    deterministic
    ("documents", 16, 2, 128, 3001, False),
    ("mixed", 7, 1, 128, 2500, True),
    ("causal", 8, 2, 128, 1999, False),
    ("documents", 16, 16, 80, 2100, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,Hq,Hkv,D,T,deterministic", GPU_CASES)
def test_gpu_bf16_within_twice_torch_bf16_error(kind, Hq, Hkv, D, T, deterministic, one_config):
    check_against_float64(kind, Hq, Hkv, D, torch.bfloat16, T, seed=T, deterministic=deterministic,
                          device=torch.device("cuda"), lse_grad=kind == "mixed")


@pytest.mark.gpu
def test_gpu_float32_and_float16(one_config):
    dev = torch.device("cuda")
    check_against_float64("mixed", 4, 2, 128, torch.float32, 700, seed=1, deterministic=False, device=dev)
    check_against_float64("causal", 4, 1, 64, torch.float16, 900, seed=2, deterministic=True, device=dev)


@pytest.mark.gpu
def test_gpu_long_sequence_131072(one_config):
    """T = 131072 in documents of up to 8192 tokens; a sample of documents checked against the reference."""
    rng = random.Random(0)
    lens, left = [], 131072
    while left:
        n = min(left, rng.choice([1, 17, 640, 2048, 4096, 8192]))
        lens.append(n)
        left -= n
    blocks = torch.full((131072,), -1, dtype=torch.int64)
    blocks[1000:4000] = 4            # images (split into one block per document they cross)
    blocks[70000:75000] = 5
    blocks[131072 - 700:] = 6
    mask = mk.AttentionMask.from_seqlens(lens, block_ids=blocks, causal=True, device="cuda")
    q, k, v = (rand(131072, h, 128, dtype=torch.bfloat16, device="cuda").requires_grad_() for h in (4, 1, 1))
    out = mk.masked_attention(q, k, v, mask)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    starts = mask.cu_seqlens.tolist()
    for d in (0, len(lens) // 2, len(lens) - 1):
        a, b = starts[d], starts[d + 1]
        sub = mk.AttentionMask.from_seqlens([b - a], block_ids=mask.block_ids[a:b], causal=True, device="cuda")
        ref = reference.masked_attention(q[a:b].double(), k[a:b].double(), v[a:b].double(), sub)
        low = naive_attention(q[a:b].detach(), k[a:b].detach(), v[a:b].detach(), sub)
        assert_close_like_torch(out[a:b].detach(), ref, low, what=f"document {d} of {len(lens)}")


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible(one_config):
    rng = random.Random(5)
    mask = random_mask(rng, 3000, "mixed", device="cuda")
    q, k, v = (rand(3000, h, 128, dtype=torch.bfloat16, device="cuda") for h in (8, 2, 2))
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        mk.masked_attention(qq, kk, vv, mask, deterministic=True).float().square().sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_poisoned_outputs_and_inductor_without_recompiles(one_config):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def layer(q, k, v, mask):
        return mk.masked_attention(q, k, v, mask)

    rng = random.Random(9)
    q, k, v = (rand(2048, h, 128, dtype=torch.bfloat16, device="cuda").requires_grad_() for h in (8, 2, 2))
    for _ in range(3):
        mask = random_mask(rng, 2048, "documents", device="cuda")
        with _alloc.poisoned():
            out = layer(q, k, v, mask)
            out.float().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()
        q.grad = k.grad = v.grad = None
    assert counter.frame_count == 1


@pytest.mark.gpu
def test_gpu_masks_built_on_cpu_are_copied_once(one_config):
    mask = mk.AttentionMask.from_seqlens([100, 28])
    q, k, v = (rand(128, 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    mk.masked_attention(q, k, v, mask)
    on_gpu = mask.to("cuda")
    assert mask.to("cuda") is on_gpu and on_gpu.spans.is_cuda
    assert metadata.tables_size(128, 128, 128) == on_gpu.tile_metadata(128, 128).numel()
