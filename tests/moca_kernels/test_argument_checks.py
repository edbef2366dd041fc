"""Issue 13 item 10 and issue 12 item 9: each misuse found by hand gives one clear error naming the op and the
argument, and interpreted Triton never computes in bfloat16 (its tl.dot is wrong there). Each test failed before
the fix (see the commit message)."""

import math

import pytest
import torch

import moca_kernels as mk
from moca_kernels import reference
from moca_kernels.dispatch import BackendUnavailable

HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreted Triton: CPU-only dispatch rule")


# --- bfloat16 never runs interpreted --------------------------------------------------------------------------


def _bf16_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    mask = mk.AttentionMask.from_seqlens([40, 24])
    q, k, v = r(64, 2, 32), r(64, 1, 32), r(64, 1, 32)
    labels = torch.randint(0, 48, (16,), generator=g)
    hidden, weight = r(16, 32), r(48, 32)
    pred, target = r(8, 16), r(8, 16)
    qe = torch.nn.functional.normalize(r(8, 16).float(), dim=-1).bfloat16()
    return [
        ("masked_attention", lambda impl: mk.masked_attention(q, k, v, mask, impl=impl),
         lambda: reference.masked_attention(q.double(), k.double(), v.double(), mask)),
        ("masked_token_loss", lambda impl: mk.masked_token_loss(hidden, weight, labels, impl=impl),
         lambda: reference.masked_token_loss(hidden.double(), weight.double(), labels)),
        ("masked_patch_loss", lambda impl: mk.masked_patch_loss(pred, target, impl=impl),
         lambda: reference.masked_patch_loss(pred.double(), target.double())),
        ("info_nce", lambda impl: mk.info_nce(qe, qe, 0.1, impl=impl),
         lambda: reference.info_nce(qe.double(), qe.double(), 0.1)),
    ]


@cpu_only
@pytest.mark.parametrize("case", _bf16_cases(), ids=lambda c: c[0])
def test_interpreted_triton_is_never_picked_for_bfloat16(case, monkeypatch):
    """Was: automatic dispatch ran the interpreted kernels on bf16 CPU tensors: masked_attention ~8e8 (float64:
    ~3), masked_token_loss ~5e9 (float64: ~9)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name, run, ref = case
    ours = run(None)
    expected = ref()
    torch.testing.assert_close(ours.double(), expected.double(), rtol=3e-2, atol=3e-2)
    with pytest.raises(BackendUnavailable, match=rf"{name}: backend 'triton'.*bfloat16 under TRITON_INTERPRET=1"):
        run("triton")


# --- masked_attention: scale --------------------------------------------------------------------------------


@cpu_only
def test_huge_scale_is_not_given_to_the_triton_backward():
    """Was: scale=1e30 ran the triton kernels, whose backward recomputes the softmax from a float32 LSE: dQ came
    out NaN or off by ~1e23 where float64 gives ~0. Now: the torch backend (automatic), an error (forced)."""
    mask = mk.AttentionMask.from_seqlens([5, 7])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(12, 2, 8, generator=g).requires_grad_() for _ in range(3))
    out = mk.masked_attention(q, k, v, mask, scale=1e30)
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.masked_attention(q64, k64, v64, mask, scale=1e30)
    ref.backward(torch.ones_like(ref))
    for a, b in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendUnavailable, match=r"masked_attention: backend 'triton'.*scale 1e\+30 > 1000"):
        mk.masked_attention(q, k, v, mask, scale=1e30, impl="triton")
    # the bound itself still runs on triton
    mk.masked_attention(q, k, v, mask, scale=mk.attention.op.MAX_TRITON_SCALE, impl="triton")


@pytest.mark.parametrize("scale,error", [("0.5", TypeError), (True, TypeError), (float("inf"), ValueError),
                                         (0.0, ValueError), (-1.0, ValueError), (10 ** 400, ValueError)],
                         ids=["str", "bool", "inf", "zero", "negative", "int-beyond-float"])
def test_bad_scale_is_named(scale, error):
    mask = mk.AttentionMask.from_seqlens([4])
    q = torch.randn(4, 1, 2)
    with pytest.raises(error, match=r"masked_attention: scale"):
        mk.masked_attention(q, q, q, mask, scale=scale, impl="torch")


@pytest.mark.parametrize("arg", ["return_lse", "deterministic"])
def test_flags_must_be_bools(arg):
    """Was: bool('no') == True, silently."""
    mask = mk.AttentionMask.from_seqlens([4])
    q = torch.randn(4, 1, 2)
    with pytest.raises(TypeError, match=rf"masked_attention: {arg} must be True or False"):
        mk.masked_attention(q, q, q, mask, impl="torch", **{arg: "no"})


# --- AttentionMask ----------------------------------------------------------------------------------------------


def test_seqlens_none_names_the_argument():
    with pytest.raises(TypeError, match=r"AttentionMask.from_seqlens: seqlens must be a sequence of ints"):
        mk.AttentionMask.from_seqlens(None)
    with pytest.raises(TypeError, match=r"AttentionMask.from_seqlens: seqlens must be a sequence of ints"):
        mk.AttentionMask.from_seqlens(7)
    with pytest.raises(TypeError, match=r"seqlens must hold integers, got torch.bool"):
        mk.AttentionMask.from_seqlens(torch.tensor([True, True]))


def test_more_tokens_than_int32_offsets_hold_is_named():
    """Was: RuntimeError 'value cannot be converted to type int32 without overflow', naming no op."""
    with pytest.raises(ValueError, match=r"AttentionMask.from_seqlens: seqlens holds 2147483648 tokens in all; at most "
                                         r"2\*\*31 - 1"):
        mk.AttentionMask.from_seqlens([2 ** 31])
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        mk.AttentionMask.from_seqlens([2 ** 30, 2 ** 30])


def test_cumulative_offsets_are_refused_with_a_pointer():
    """Issue 12 item 9. Was: [0, 5, 12, 16] built a 33-token mask with a zero-length document."""
    with pytest.raises(ValueError, match=r"seqlens\[0\] is 0.*looks like cumulative offsets.*"
                                         r"AttentionMask\.from_cu_seqlens.*differences \[5, 7, 4\]"):
        mk.AttentionMask.from_seqlens([0, 5, 12, 16])
    with pytest.raises(ValueError, match=r"looks like cumulative offsets"):
        mk.AttentionMask.from_seqlens(torch.tensor([0, 5, 12, 16], dtype=torch.int32))


def test_zero_length_documents_are_refused():
    with pytest.raises(ValueError, match=r"seqlens\[1\] is 0; every document needs at least one token") as info:
        mk.AttentionMask.from_seqlens([3, 0, 2])
    assert "cumulative" not in str(info.value)   # [3, 0, 2] does not look like offsets
    # padded batches keep their rows of padding only (length 0), as before
    mask = mk.AttentionMask.from_padding_mask(torch.tensor([[1, 1], [0, 0], [1, 0]]))
    assert mask.seqlens == (2, 0, 1)


def test_image_block_across_two_documents_is_refused():
    """Was accepted although the docstring says blocks are checked to lie inside one document."""
    blocks = torch.tensor([-1, -1, 0, 0, 0, 0, -1, -1])
    with pytest.raises(ValueError, match=r"AttentionMask.from_seqlens: block id 0 runs across the boundary between "
                                         r"two documents \(tokens 3 and 4\)"):
        mk.AttentionMask.from_seqlens([4, 4], block_ids=blocks, causal=True)
    with pytest.raises(ValueError, match=r"from_padding_mask: block id 0 runs across"):
        mk.AttentionMask.from_padding_mask(torch.ones(2, 4, dtype=torch.long), block_ids=blocks.reshape(2, 4),
                                           causal=True)
    # inside one document, or the same id in two documents that do not touch: fine
    mk.AttentionMask.from_seqlens([8], block_ids=blocks, causal=True)
    mk.AttentionMask.from_seqlens([3, 5], block_ids=torch.tensor([0, 0, -1, 0, 0, -1, -1, -1]), causal=True)


@pytest.mark.parametrize("arg,value", [("causal", "yes"), ("causal", None), ("check_blocks", "no")])
def test_mask_flags_must_be_bools(arg, value):
    with pytest.raises(TypeError, match=rf"AttentionMask.from_seqlens: {arg} must be True or False"):
        mk.AttentionMask.from_seqlens([3], **{arg: value})


def test_bad_device_is_named():
    with pytest.raises(ValueError, match=r"AttentionMask.from_seqlens: device 'gpu0' is not a device"):
        mk.AttentionMask.from_seqlens([3], device="gpu0")


# --- losses -----------------------------------------------------------------------------------------------------


def test_masked_patch_loss_eps():
    pred, target = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(TypeError, match=r"masked_patch_loss: eps must be a real number, got NoneType"):
        mk.masked_patch_loss(pred, target, norm_pix=True, eps=None)
    for bad in ("1e-6", True):
        with pytest.raises(TypeError, match=r"masked_patch_loss: eps must be a real number"):
            mk.masked_patch_loss(pred, target, norm_pix=True, eps=bad)
    with pytest.raises(ValueError, match=r"masked_patch_loss: eps must be >= 0 and finite"):
        mk.masked_patch_loss(pred, target, norm_pix=True, eps=math.inf)
    with pytest.raises(TypeError, match=r"masked_patch_loss: norm_pix must be True or False"):
        mk.masked_patch_loss(pred, target, norm_pix="no")


@pytest.mark.parametrize("value", [None, 1.5, -100.0, True, "-100"])
def test_masked_token_loss_ignore_index(value):
    """Was: None gave a bare TypeError from int(); 1.5 was truncated to 1 (rows labelled 1 silently ignored)."""
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    labels = torch.tensor([1, 2, 1, 4])
    with pytest.raises(TypeError, match=r"masked_token_loss: ignore_index must be an int"):
        mk.masked_token_loss(hidden, weight, labels, ignore_index=value)


def test_masked_token_loss_ignore_index_beyond_int64():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"masked_token_loss: ignore_index must fit in int64"):
        mk.masked_token_loss(hidden, weight, torch.tensor([1, 2, 1, 4]), ignore_index=2 ** 70)


@pytest.mark.parametrize("value,error,match", [
    (None, TypeError, "temperature must be a float > 0"), ("0.1", TypeError, "temperature must be a float > 0"),
    (True, TypeError, "temperature must be a float > 0"), (math.inf, ValueError, "temperature must be finite"),
    (math.nan, ValueError, "temperature must be finite"), (1e-300, ValueError, "temperature must be > 0"),
    (torch.tensor(math.inf), ValueError, "temperature must be > 0 and finite"),
])
def test_info_nce_temperature(value, error, match):
    """Was: None a bare TypeError; inf, '0.1' (float('0.1')) and True (1.0) accepted."""
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(error, match=rf"info_nce: {match}"):
        mk.info_nce(q, q, temperature=value, impl="torch")


# --- GradCache --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,error", [(None, TypeError), (1.5, TypeError), ("4", TypeError), (True, TypeError),
                                         ([2, 1.5], TypeError), (0, ValueError), ([], ValueError)])
def test_grad_cache_chunk_sizes(value, error):
    """Was: None and 1.5 gave bare TypeErrors ('... object is not iterable')."""
    with pytest.raises(error, match=r"GradCache: chunk_sizes"):
        mk.GradCache(lambda x: x, lambda a: a.sum(), value)


def test_grad_cache_other_arguments():
    enc, loss = (lambda x: x), (lambda a: a.sum())
    with pytest.raises(TypeError, match=r"GradCache: split_fn must be callable"):
        mk.GradCache(enc, loss, 2, split_fn=3)
    with pytest.raises(TypeError, match=r"GradCache: scaler must be"):
        mk.GradCache(enc, loss, 2, scaler="amp")
    with pytest.raises(TypeError, match=r"GradCache: sync_modules must be a list or tuple"):
        mk.GradCache(enc, loss, 2, sync_modules=None)
