"""moca_kernels.integrations.flash_attn against flash-attn's documented semantics (flash-attn itself needs CUDA
and is not installed): ``flash_attn_varlen_func`` output and gradients equal per-sequence float64 attention
(causal within each sequence or not, GQA by head count, softmax_scale), each unsupported option is refused
naming its argument, and ``AttentionMask.from_cu_seqlens`` equals ``from_seqlens``."""

import inspect
import re
import subprocess
import sys

import pytest
import torch

import moca_kernels as mk
from moca_kernels.integrations.flash_attn import flash_attn_varlen_func
from tests.helpers import readme_snippet

# flash_attn.flash_attn_varlen_func (flash-attn 2.x), from its documentation: name -> default
FLASH_ATTN_SIGNATURE = [
    ("q", None), ("k", None), ("v", None), ("cu_seqlens_q", None), ("cu_seqlens_k", None), ("max_seqlen_q", None),
    ("max_seqlen_k", None), ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
    ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
    ("return_attn_probs", False), ("block_table", None),
]


def reference(q, k, v, cu, causal, scale=None):
    """flash-attn's documented semantics in float64: each sequence [cu[i], cu[i+1]) attends within itself;
    query head h reads key/value head h // (Hq // Hkv); causal = key j <= query i within the sequence."""
    q, k, v = (t.double() for t in (q, k, v))
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    offsets = [int(x) for x in cu]
    for a, b in zip(offsets, offsets[1:]):
        if a == b:
            continue
        kd = k[a:b].repeat_interleave(Hq // Hkv, dim=1)
        vd = v[a:b].repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("ihd,jhd->hij", q[a:b], kd) * scale
        if causal:
            L = b - a
            s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        out[a:b] = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), vd)
    return out


def make(cu, Hq, Hkv, D=16, dtype=torch.float64):
    T = int(cu[-1])
    q = torch.randn(T, Hq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(T, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(T, Hkv, D, dtype=dtype, requires_grad=True)
    return q, k, v


CU = [0, 5, 12, 13, 21]      # a 1-token sequence included


@pytest.mark.parametrize("causal,Hq,Hkv,scale", [
    (False, 4, 4, None), (True, 4, 4, 0.3), (False, 4, 2, 0.3), (True, 4, 2, None), (False, 6, 1, None),
    (True, 6, 1, 0.3),
])
def test_matches_flash_attn_semantics_float64(causal, Hq, Hkv, scale):
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v = make(cu, Hq, Hkv)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, softmax_scale=scale, causal=causal, impl="torch")
    ref = reference(q, k, v, CU, causal, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


def test_window_minus_one_zero_is_causal_and_equal_cu_tensors_accepted():
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v = make(cu, 4, 2)
    out = flash_attn_varlen_func(q, k, v, cu, cu.clone().long(), 8, 9, window_size=(-1, 0), impl="torch")
    torch.testing.assert_close(out, reference(q, k, v, CU, True), rtol=0, atol=1e-12)


def test_zero_length_sequences_are_dropped():
    """flash-attn allows empty sequences (repeated offsets); they hold no token."""
    cu = torch.tensor([0, 4, 4, 9, 9], dtype=torch.int32)
    q, k, v = make(cu, 2, 2)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True, impl="torch")
    torch.testing.assert_close(out, reference(q, k, v, [0, 4, 9], True), rtol=0, atol=1e-12)


def test_triton_float32_interpreted(device):
    """Triton kernels: interpreted on a CPU-only machine, compiled on a GPU (the ``device`` fixture)."""
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32, device=device)
    q, k, v = (t.detach().to(device).requires_grad_() for t in make(cu, 4, 2, D=16, dtype=torch.float32))
    for causal in (False, True):
        out = flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=causal, impl="triton")
        ref = reference(q, k, v, cu.tolist(), causal)
        assert (out.double() - ref).abs().max().item() < 2e-5
        go = torch.randn_like(out)
        for g, r in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go.double())):
            assert (g.double() - r).abs().max().item() < 2e-5


def test_mask_cached_per_cu_tensor_and_rebuilt_after_in_place_change():
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    q, k, v = make(cu, 2, 2)
    a = flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, impl="torch")
    b = flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, impl="torch")
    assert torch.equal(a, b)
    cu[1] = 3                   # in place: the cached mask of [0, 6, 12] must not be reused
    c = flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, impl="torch")
    torch.testing.assert_close(c, reference(q, k, v, [0, 3, 12], False), rtol=0, atol=1e-12)


def test_signature_is_flash_attns():
    params = list(inspect.signature(flash_attn_varlen_func).parameters.values())
    positional = [(p.name, None if p.default is inspect.Parameter.empty else p.default)
                  for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == FLASH_ATTN_SIGNATURE


def _call(**over):
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = make(cu, 2, 2)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5, impl="torch")
    args.update(over)
    return flash_attn_varlen_func(**args)


@pytest.mark.parametrize("over,exc,name", [
    (dict(dropout_p=0.1), NotImplementedError, "dropout_p"),
    (dict(window_size=(4, 4)), NotImplementedError, "window_size"),
    (dict(window_size=(-1, 2)), NotImplementedError, "window_size"),
    (dict(softcap=30.0), NotImplementedError, "softcap"),
    (dict(alibi_slopes=torch.ones(2)), NotImplementedError, "alibi_slopes"),
    (dict(return_attn_probs=True), NotImplementedError, "return_attn_probs"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), NotImplementedError, "block_table"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), NotImplementedError, "cu_seqlens_k"),
    (dict(k=torch.randn(9, 2, 16, dtype=torch.float64)), NotImplementedError, "k has 9 tokens"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q"),
    (dict(max_seqlen_k=2), ValueError, "max_seqlen_k"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 8.0])), ValueError, "cu_seqlens_q"),
])
def test_refusals_name_the_argument(over, exc, name):
    with pytest.raises(exc, match=re.escape(name)):
        _call(**over)


# -- AttentionMask.from_cu_seqlens ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["int32", "int64", "list"])
@pytest.mark.parametrize("causal", [False, True])
def test_from_cu_seqlens_equals_from_seqlens(form, causal):
    lens = [4, 1, 6, 3]
    cu = [0, 4, 5, 11, 14]
    arg = cu if form == "list" else torch.tensor(cu, dtype=getattr(torch, form))
    blocks = torch.full((14,), -1)
    blocks[6:9] = 0
    a = mk.AttentionMask.from_cu_seqlens(arg, block_ids=blocks, causal=causal)
    b = mk.AttentionMask.from_seqlens(lens, block_ids=blocks, causal=causal)
    assert a.seqlens == b.seqlens and a.causal == b.causal
    assert torch.equal(a.cu_seqlens, b.cu_seqlens) and torch.equal(a.spans, b.spans)
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("cu,exc,pattern", [
    ([5, 12, 16], ValueError, "start with 0.*from_seqlens"),
    ([0, 5, 3, 9], ValueError, "nondecreasing.*cu_seqlens\\[1\\] = 5 > cu_seqlens\\[2\\] = 3"),
    ([0, 5, 5, 9], ValueError, "document 1 has zero length"),
    ([0], ValueError, "at least 2"),
    (torch.tensor([0.0, 3.0]), TypeError, "cu_seqlens must be an integer tensor"),
    (torch.tensor([[0, 3]]), ValueError, "cu_seqlens must be 1-D"),
    (torch.tensor([0, 3]) > 1, TypeError, "cu_seqlens must be an integer tensor"),
    ("0,3", TypeError, "cu_seqlens must be a 1-D integer tensor or a list"),
])
def test_from_cu_seqlens_refusals(cu, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mk.AttentionMask.from_cu_seqlens(cu)


def test_import_moca_kernels_imports_no_integration():
    code = ("import sys, moca_kernels; bad = [m for m in sys.modules if m.startswith('moca_kernels.integrations.')"
            " or m.split('.')[0] in ('xformers', 'flash_attn')]; print(bad); assert not bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# -- README -------------------------------------------------------------------------------------------------


def test_readme_flash_attn_and_xformers_snippet(monkeypatch):
    try:
        from xformers.ops.fmha import attn_bias  # noqa: F401
    except Exception as exc:  # the snippet builds an xformers bias
        pytest.skip(f"xformers.ops.fmha.attn_bias does not import: {type(exc).__name__}: {exc}")
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")
    scope: dict = {}
    exec(compile(readme_snippet("### flash-attn and xformers"), "README:flash-attn and xformers", "exec"), scope)
    q, k, v, cu = scope["q"], scope["k"], scope["v"], scope["cu"]
    atol = 1e-5 if q.dtype == torch.float32 else 3e-2     # the snippet uses bf16 on a GPU
    torch.testing.assert_close(scope["out"].double(), reference(q, k, v, cu.tolist(), True), rtol=0, atol=atol)
    torch.testing.assert_close(scope["out_bi"].double(), reference(q, k, v, cu.tolist(), False), rtol=0, atol=atol)
    torch.testing.assert_close(scope["out_x"][0], scope["out_bi"], rtol=0, atol=0)
