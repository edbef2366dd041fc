"""xformers block-diagonal biases as masks, tested against real xformers objects: the dense bias xformers
itself materialises defines the reference (float64 softmax(q k^T * scale + bias) v). Where
``xformers.ops.fmha.attn_bias`` does not import, those tests skip with the reason; the duck-typed recognition
is also tested with a stand-in class so it runs without xformers."""

import re

import pytest
import torch

import moca_kernels as mk
from moca_kernels.attention.mask import mask_of_xformers_bias
from moca_kernels.integrations.xformers import memory_efficient_attention

try:
    from xformers.ops.fmha import attn_bias as xab
    XFORMERS_REASON = None
except Exception as exc:  # e.g. an xformers wheel built for another torch
    xab = None
    XFORMERS_REASON = f"xformers.ops.fmha.attn_bias does not import: {type(exc).__name__}: {str(exc)[:200]}"

needs_xformers = pytest.mark.skipif(xab is None, reason=XFORMERS_REASON or "")

LENS = [5, 1, 7, 3]
T = sum(LENS)


def dense_reference(q, k, v, bias_dense, scale=None):
    """float64 attention with an additive [T, T] bias (0 = allowed, -inf = masked), GQA by head count."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("ihd,jhd->hij", q, k) * scale + bias_dense.double().to(q.device)
    return torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v)


def qkv(Tn, Hq, Hkv, D=16, dtype=torch.float64):
    return (torch.randn(Tn, Hq, D, dtype=dtype, requires_grad=True),
            torch.randn(Tn, Hkv, D, dtype=dtype, requires_grad=True),
            torch.randn(Tn, Hkv, D, dtype=dtype, requires_grad=True))


@needs_xformers
@pytest.mark.parametrize("cls,causal", [("BlockDiagonalMask", False), ("BlockDiagonalCausalMask", True)])
def test_from_xformers_matches_the_bias_xformers_materialises(cls, causal):
    bias = getattr(xab, cls).from_seqlens(LENS)
    mask = mk.AttentionMask.from_xformers(bias)
    allowed = bias.materialize((T, T), dtype=torch.float32) == 0
    assert torch.equal(mask.to_dense(), allowed)
    same = mk.AttentionMask.from_seqlens(LENS, causal=causal)
    assert mask.seqlens == same.seqlens and mask.causal == causal and torch.equal(mask.spans, same.spans)


@needs_xformers
@pytest.mark.parametrize("cls", ["BlockDiagonalMask", "BlockDiagonalCausalMask"])
@pytest.mark.parametrize("Hq,Hkv,scale", [(4, 4, None), (4, 2, 0.25)])
def test_masked_attention_takes_the_bias(cls, Hq, Hkv, scale):
    bias = getattr(xab, cls).from_seqlens(LENS)
    q, k, v = qkv(T, Hq, Hkv)
    out = mk.masked_attention(q, k, v, bias, scale=scale, impl="torch")
    ref = dense_reference(q, k, v, bias.materialize((T, T), dtype=torch.float64), scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    go = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


@needs_xformers
def test_triton_float32_interpreted(device):
    """Triton kernels: interpreted on a CPU-only machine, compiled on a GPU (the ``device`` fixture)."""
    bias = xab.BlockDiagonalCausalMask.from_seqlens([9, 4, 11])
    q, k, v = (t.detach().to(device).requires_grad_() for t in qkv(24, 4, 2, dtype=torch.float32))
    out = mk.masked_attention(q, k, v, bias, impl="triton")
    ref = dense_reference(q, k, v, bias.materialize((24, 24), dtype=torch.float64))
    assert (out.double() - ref).abs().max().item() < 2e-5
    go = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go.double())):
        assert (g.double() - r).abs().max().item() < 2e-5


@needs_xformers
def test_memory_efficient_attention_layouts():
    # block-diagonal, B = 1, [1, T, H, K]
    bias = xab.BlockDiagonalMask.from_seqlens(LENS)
    q, k, v = qkv(T, 4, 4)
    out = memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, impl="torch")
    assert out.shape == (1, T, 4, 16)
    torch.testing.assert_close(out[0], dense_reference(q, k, v, bias.materialize((T, T))), rtol=0, atol=1e-12)
    # no bias and LowerTriangularMask: each batch row is one sequence
    B, M = 3, 6
    qb, kb, vb = (torch.randn(B, M, 2, 8, dtype=torch.float64) for _ in range(3))
    for b_, dense in ((None, torch.zeros(M, M)), (xab.LowerTriangularMask(), None)):
        if dense is None:
            dense = b_.materialize((M, M), dtype=torch.float64)
        out = memory_efficient_attention(qb, kb, vb, attn_bias=b_, scale=0.4, impl="torch")
        for i in range(B):
            torch.testing.assert_close(out[i], dense_reference(qb[i], kb[i], vb[i], dense, 0.4), rtol=0, atol=1e-12)
    # 5-D GQA as xformers builds it: k, v [B, M, G, H, K] expanded over H
    G, H = 2, 3
    q5 = torch.randn(1, T, G, H, 8, dtype=torch.float64)
    k5, v5 = (torch.randn(1, T, G, 1, 8, dtype=torch.float64).expand(1, T, G, H, 8) for _ in range(2))
    out = memory_efficient_attention(q5, k5, v5, attn_bias=bias, impl="torch")
    ref = dense_reference(q5[0].reshape(T, G * H, 8), k5[0, :, :, 0], v5[0, :, :, 0], bias.materialize((T, T)))
    torch.testing.assert_close(out[0].reshape(T, G * H, 8), ref, rtol=0, atol=1e-12)


@needs_xformers
@pytest.mark.parametrize("make,name", [
    (lambda: xab.BlockDiagonalCausalFromBottomRightMask.from_seqlens([3, 4]),
     "BlockDiagonalCausalFromBottomRightMask"),
    (lambda: xab.BlockDiagonalCausalMask.from_seqlens([3, 4]).make_local_attention(2),
     "BlockDiagonalCausalLocalAttentionMask"),
    (lambda: xab.LowerTriangularMask(), "LowerTriangularMask"),
    (lambda: xab.BlockDiagonalMask.from_seqlens([3, 4], kv_seqlen=[4, 3]), "query offsets"),
    (lambda: xab.BlockDiagonalMask.from_seqlens([3, 0, 4]), "zero length"),
])
def test_other_biases_refused_by_name(make, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        mk.AttentionMask.from_xformers(make())


@needs_xformers
@pytest.mark.parametrize("over,exc,name", [
    (dict(p=0.1), NotImplementedError, "p=0.1"),
    (dict(op=object()), NotImplementedError, "op="),
    (dict(attn_bias=torch.zeros(7, 7)), NotImplementedError, "attn_bias"),
    (dict(attn_bias="bottom-right"), NotImplementedError,
     "attn_bias of type BlockDiagonalCausalFromBottomRightMask"),
    (dict(batch=2), ValueError, "B = 1"),
])
def test_memory_efficient_attention_refusals(over, exc, name):
    batch = over.pop("batch", 1)
    if over.get("attn_bias") == "bottom-right":
        over["attn_bias"] = xab.BlockDiagonalCausalFromBottomRightMask.from_seqlens([3, 4])
    over.setdefault("attn_bias", xab.BlockDiagonalMask.from_seqlens([3, 4]))
    x = torch.randn(batch, 7, 2, 8)
    with pytest.raises(exc, match=re.escape(name)):
        memory_efficient_attention(x, x, x, **over)


@needs_xformers
def test_mask_built_once_per_bias_object():
    bias = xab.BlockDiagonalMask.from_seqlens(LENS)
    assert mask_of_xformers_bias(bias, "cpu") is mask_of_xformers_bias(bias, "cpu")
    other = xab.BlockDiagonalMask.from_seqlens(LENS)
    assert mask_of_xformers_bias(other, "cpu") is not mask_of_xformers_bias(bias, "cpu")


@needs_xformers
def test_xformers_own_kernel_where_it_loads():
    """xformers' memory_efficient_attention against ours where its kernels load (a GPU with a matching build);
    skipped with xformers' reason elsewhere."""
    import xformers.ops as xops

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bias = xab.BlockDiagonalCausalMask.from_seqlens(LENS, **({"device": dev} if dev == "cuda" else {}))
    q, k, v = (torch.randn(1, T, 4, 64, device=dev, dtype=torch.float16) for _ in range(3))
    try:
        theirs = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        pytest.skip(f"xformers' kernels do not run here: {' '.join(lines[:1] + lines[-4:])[:300]}")
    ours = memory_efficient_attention(q, k, v, attn_bias=bias)
    assert (ours.float() - theirs.float()).abs().max().item() < 2e-3


# -- without xformers: recognised by duck-typing --------------------------------------------------------------


class _SeqInfo:
    def __init__(self, starts):
        self.seqstart = torch.tensor(starts, dtype=torch.int32)
        self.seqstart_py = list(starts)


def _fake(name, q_starts, k_starts=None):
    cls = type(name, (), {"__module__": "xformers.ops.fmha.attn_bias"})
    obj = cls()
    obj.q_seqinfo, obj.k_seqinfo = _SeqInfo(q_starts), _SeqInfo(k_starts or q_starts)
    return obj


def test_duck_typed_bias_without_importing_xformers():
    bias = _fake("BlockDiagonalCausalMask", [0, 3, 8])
    q, k, v = qkv(8, 2, 1)
    out = mk.masked_attention(q, k, v, bias, impl="torch")
    torch.testing.assert_close(out, mk.masked_attention(q, k, v, mk.AttentionMask.from_seqlens([3, 5], causal=True),
                                                        impl="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="PagedBlockDiagonalPaddedKeysMask"):
        mk.AttentionMask.from_xformers(_fake("PagedBlockDiagonalPaddedKeysMask", [0, 3, 8]))
    with pytest.raises(TypeError, match="BlockDiagonalMask or BlockDiagonalCausalMask"):
        mk.AttentionMask.from_xformers(object())
    with pytest.raises(TypeError, match="mask must be an AttentionMask"):
        mk.masked_attention(q, k, v, object(), impl="torch")
