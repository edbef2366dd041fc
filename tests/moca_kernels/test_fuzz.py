"""Property-based fuzz of every public op's arguments (issue 13): AttentionMask's constructors, masked_attention,
masked_token_loss, masked_patch_loss, info_nce and GradCache.

Each example changes one argument of a valid call to a value drawn from a pool of valid values (ints given as
numpy ints, tensors instead of lists, ...) or of bad ones (None, bools, strings, floats where ints belong, inf,
NaN, negative or empty values, wrong dtypes, shapes and lengths). The property:

* a valid value gives the result of the float64 reference, computed here from the definition (tiny shapes, torch
  backend; a few float32 cases through the interpreted Triton kernels);
* a bad value raises ValueError or TypeError whose message names the op and the argument: never a bare
  TypeError from deep inside, never a result (silent truncation, a wrong value).

The counts (bad inputs tried / clear errors / silent ones) are printed by the last test (``pytest -s``).
"""

import math
import re

import numpy as np
import pytest
import torch

import moca_kernels as mk
from moca_kernels import reference
from moca_kernels.dispatch import BackendUnavailable

hypothesis = pytest.importorskip("hypothesis", reason="the argument fuzz needs hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
HAS_CUDA = torch.cuda.is_available()
TRITON = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))

COUNTS = {"bad": 0, "clear": 0, "silent": 0, "valid": 0}
SILENT = []


class Bad:
    """A bad value for argument ``arg`` (the message must name one of ``names``)."""

    def __init__(self, value, *names):
        self.value, self.names = value, names

    def __repr__(self):
        return f"Bad({_short(self.value)})"


def _short(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}:{v.dtype}"
    return repr(v)[:60]


def expect_clear_error(op: str, arg: str, call, bad: Bad):
    """Run ``call`` on a bad value: it must raise ValueError / TypeError naming ``op`` and the argument."""
    COUNTS["bad"] += 1
    names = bad.names or (arg,)
    try:
        result = call()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert op in msg, f"{op}({arg}={_short(bad.value)}): error does not name the op: {type(exc).__name__}: {msg}"
        assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), (
            f"{op}({arg}={_short(bad.value)}): error names none of {names}: {type(exc).__name__}: {msg}")
        COUNTS["clear"] += 1
        return
    COUNTS["silent"] += 1
    SILENT.append(f"{op}({arg}={_short(bad.value)})")
    raise AssertionError(f"{op}({arg}={_short(bad.value)}) was accepted and returned {_short(result)}")


def call_drawn(op: str, fn, kw: dict, arg, value):
    """Set ``kw[arg]`` to the drawn ``value`` (no change when ``arg`` is None) and call ``fn(**kw)``. A ``Bad``
    value must be refused with a clear error (``expect_clear_error``): returns (True, None) then, else
    (False, the call's result)."""
    if arg is not None:
        kw[arg] = value.value if isinstance(value, Bad) else value
    if isinstance(value, Bad):
        expect_clear_error(op, arg, lambda: fn(**kw), value)
        return True, None
    return False, fn(**kw)


def close64(ours, ref, what, rtol=1e-5, atol=1e-6):
    COUNTS["valid"] += 1
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol, equal_nan=True, msg=what)


# Values that are wrong for almost every argument; each strategy below adds its own.
JUNK = [None, "1", "abc", object(), [], {}, float("nan")]

# ---------------------------------------------------------------------------------------------------------
# AttentionMask
# ---------------------------------------------------------------------------------------------------------

OP_SEQ = "AttentionMask.from_seqlens"
OP_PAD = "AttentionMask.from_padding_mask"


@st.composite
def documents(draw, max_docs=4, max_len=5):
    lens = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_docs))
    causal = draw(st.booleans())
    blocks = None
    if draw(st.booleans()):
        ids, prev = [], -1
        for L in lens:
            i, next_id = 0, draw(st.integers(0, 2))
            doc = [-1] * L
            while i < L:
                if draw(st.booleans()):
                    n = draw(st.integers(1, L - i))
                    if i == 0 and next_id == prev:
                        next_id += 1
                    doc[i:i + n] = [next_id] * n
                    next_id += 1
                    i += n
                else:
                    i += 1
            ids += doc
            prev = doc[-1]
        blocks = torch.tensor(ids, dtype=draw(st.sampled_from([torch.int64, torch.int32])))
    return lens, blocks, causal


def dense_definition(lens, blocks, causal) -> torch.Tensor:
    """bool [T, T] from the documented rule, independent of the library."""
    T = sum(lens)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    i = torch.arange(T)
    allowed = doc[:, None] == doc[None, :]
    if causal:
        within = i[None, :] <= i[:, None]
        if blocks is not None:
            b = blocks.long()
            within |= (b[:, None] == b[None, :]) & (b[:, None] >= 0)
        allowed &= within
    return allowed


def seqlens_values(lens):
    """Ways of giving valid lengths ``lens``."""
    return st.sampled_from([lens, tuple(lens), torch.tensor(lens), torch.tensor(lens, dtype=torch.int32),
                            np.array(lens), [np.int64(x) for x in lens]])


def bad_seqlens(lens):
    T = sum(lens)
    cumulative = [0] + [sum(lens[:i + 1]) for i in range(len(lens))]
    return st.sampled_from([
        Bad(None), Bad(5), Bad("12"), Bad(b"12"), Bad([]), Bad([1.5] + lens[1:]), Bad([float(x) for x in lens]),
        Bad([True] + lens[1:]), Bad([np.True_] + lens[1:]), Bad([None]), Bad([[1, 2]]), Bad(lens + [0]), Bad([0] + lens), Bad(cumulative),
        Bad([-1] + lens), Bad(torch.tensor(lens, dtype=torch.float32)),
        Bad([2 ** 31], "seqlens"), Bad([2 ** 30, 2 ** 30], "seqlens"),   # too many tokens in all
        Bad(torch.tensor([True] * len(lens))), Bad(torch.tensor([lens])), Bad(torch.tensor(T)),
        Bad([float("nan")]), Bad([float("inf")]), Bad({"a": 1}), Bad([3 + 0j]),
    ])


@FAST
@given(documents(), st.data())
def test_from_seqlens_arguments(docs, data):
    lens, blocks, causal = docs
    T = sum(lens)
    arg = data.draw(st.sampled_from(["seqlens", "block_ids", "causal", "device", "check_blocks", None]))
    kw = dict(seqlens=lens, block_ids=blocks, causal=causal)
    value = None
    if arg == "seqlens":
        value = data.draw(st.one_of(seqlens_values(lens), bad_seqlens(lens)))
    elif arg == "block_ids":
        split = torch.full((T,), -1)
        split[0], split[-1] = 4, 4   # one id in two runs (a bad value when they lie in one document)
        across = None
        if len(lens) > 1:
            across = torch.full((T,), -1)
            across[lens[0] - 1:lens[0] + 1] = 2   # one run over the boundary of documents 0 and 1
        choices = [Bad(torch.zeros(T)), Bad(torch.zeros(T, dtype=torch.bool)),
                   Bad(torch.zeros(T + 1, dtype=torch.long)), Bad(torch.zeros(1, T, dtype=torch.long)),
                   Bad([-1] * T), Bad("0" * T)]
        if causal:   # block ids are only read (and checked) with causal=True
            choices.append(Bad(torch.full((T,), 2 ** 40), "int32"))
        if causal and T > 2 and lens[0] == T:
            choices.append(Bad(split, "block id"))
        if causal and across is not None:
            choices.append(Bad(across, "block id"))
        value = data.draw(st.sampled_from(choices + [None, torch.full((T,), -1), torch.arange(T) * 0 - 3]))
    elif arg == "causal":
        value = data.draw(st.sampled_from([True, False, np.bool_(True), Bad(None), Bad("yes"), Bad("False"), Bad(1),
                                           Bad(0.0), Bad([True])]))
    elif arg == "device":
        value = data.draw(st.sampled_from([None, "cpu", torch.device("cpu"), Bad("gpu0"), Bad("nonsense:3"),
                                           Bad(3.5), Bad([])]))
    elif arg == "check_blocks":
        value = data.draw(st.sampled_from([True, False, Bad(None), Bad("no"), Bad(1)]))
    refused, mask = call_drawn(OP_SEQ, mk.AttentionMask.from_seqlens, kw, arg, value)
    if refused:
        return
    b = kw["block_ids"]
    expected = dense_definition(lens, b, bool(kw["causal"]))
    COUNTS["valid"] += 1
    assert mask.seqlens == tuple(lens) and mask.total_len == T
    assert torch.equal(mask.to_dense(), expected)
    # the kernels' per-token spans give the same mask
    lo, hi = mask.spans.long()
    j = torch.arange(T)
    assert torch.equal((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), expected)


@FAST
@given(st.integers(1, 4), st.integers(1, 5), st.data())
def test_from_padding_mask_arguments(B, S, data):
    attn = data.draw(st.lists(st.integers(0, 1), min_size=B * S, max_size=B * S))
    attn = torch.tensor(attn).reshape(B, S)
    if attn.sum() == 0:
        attn[0, 0] = 1
    arg = data.draw(st.sampled_from(["attention_mask", "block_ids", "causal", None]))
    kw = dict(attention_mask=attn, causal=data.draw(st.booleans()))
    value = None
    if arg == "attention_mask":
        value = data.draw(st.sampled_from([
            attn.bool(), attn.to(torch.int32), Bad(attn.float()), Bad(attn[0]), Bad(attn[None]), Bad(None),
            Bad(attn.tolist()), Bad(torch.zeros(B, S, dtype=torch.long), "padding"), Bad("mask")]))
    elif arg == "block_ids":
        value = data.draw(st.sampled_from([None, torch.full((B, S), -1), Bad(torch.full((B, S + 1), -1)),
                                           Bad(torch.zeros(B, S)), Bad([[-1] * S] * B), Bad(torch.full((B * S,), -1))]))
    elif arg == "causal":
        value = data.draw(st.sampled_from([True, Bad(None), Bad("yes"), Bad(1)]))
    refused, mask = call_drawn(OP_PAD, mk.AttentionMask.from_padding_mask, kw, arg, value)
    if refused:
        return
    COUNTS["valid"] += 1
    assert mask.seqlens == tuple(attn.sum(1).tolist())
    x = torch.randn(B, S, 3)
    packed = mk.attention.pack(x, mask)
    assert torch.equal(packed, x[attn.bool()])
    assert torch.equal(mk.attention.unpack(packed, mask)[attn.bool()], x[attn.bool()])


# ---------------------------------------------------------------------------------------------------------
# masked_attention
# ---------------------------------------------------------------------------------------------------------

OP_ATT = "masked_attention"


def attention64(q, k, v, dense, scale):
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(~dense[None], float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v), torch.logsumexp(s, -1)


@st.composite
def attention_case(draw):
    lens, blocks, causal = draw(documents(max_docs=3, max_len=5))
    Hkv = draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    D = draw(st.integers(1, 6))
    return lens, blocks, causal, Hq, Hkv, D


def run_attention_case(case, data, impl, dtype):
    lens, blocks, causal, Hq, Hkv, D = case
    T = sum(lens)
    mask = mk.AttentionMask.from_seqlens(lens, block_ids=blocks, causal=causal)
    q = torch.randn(T, Hq, D, dtype=dtype)
    k, v = torch.randn(T, Hkv, D, dtype=dtype), torch.randn(T, Hkv, D, dtype=dtype)
    kw = dict(q=q, k=k, v=v, mask=mask, scale=None, return_lse=False, impl=impl, deterministic=False)
    arg = data.draw(st.sampled_from(["q", "k", "v", "mask", "scale", "return_lse", "deterministic", "impl", None]))
    value = None
    if arg in ("q", "k", "v"):
        t = kw[arg]
        value = data.draw(st.sampled_from([
            Bad(t.long()), Bad(t.bool()), Bad(t[:, 0]), Bad(t[None]), Bad(None), Bad(t.tolist()),
            Bad(t[:-1] if T > 1 else t[:, :0], "T", "k/v", "mask", "heads", arg),
            Bad(t[..., :-1] if D > 1 else torch.cat([t, t], -1), "D", "k/v", "k", "v"),
            Bad(t.to(torch.float16 if dtype != torch.float16 else torch.float32), "dtype", "q", "k", "v"),
            Bad(t[:, :0], "heads", "k", "v", "q"), Bad(np.zeros(tuple(t.shape), dtype=np.float32)),
            t.transpose(0, 1).contiguous().transpose(0, 1),   # non-contiguous, valid
        ]))
        if arg == "q" and Hkv == 2:
            value = data.draw(st.sampled_from([value, Bad(torch.randn(T, 1, D, dtype=dtype), "heads", "q")]))
    elif arg == "mask":
        value = data.draw(st.sampled_from([
            Bad(None), Bad(lens), Bad(mask.to_dense()), Bad("documents"),
            Bad(mk.AttentionMask.from_seqlens([T + 1]), "mask", "T")]))
    elif arg == "scale":
        value = data.draw(st.one_of(
            st.floats(1e-3, 10.0), st.integers(1, 3), st.sampled_from([np.float32(0.5), np.float64(0.3)]),
            st.sampled_from([Bad(0.0), Bad(-0.5), Bad(float("inf")), Bad(float("nan")), Bad("0.5"), Bad(True),
                             Bad([0.5]), Bad(torch.tensor(0.5)), Bad(-float("inf")), Bad(10 ** 400)])))
    elif arg in ("return_lse", "deterministic"):
        value = data.draw(st.sampled_from([True, False, Bad(None), Bad("no"), Bad(1), Bad(0.0)]))
    elif arg == "impl":
        value = data.draw(st.sampled_from(["torch", Bad("tritonx"), Bad(3), Bad("TORCH"), Bad(["torch"]), Bad(True)]))
    refused, out = call_drawn(OP_ATT, mk.masked_attention, kw, arg, value)
    if refused:
        return
    scale = kw["scale"] if kw["scale"] is not None else D ** -0.5
    ref, lse = attention64(kw["q"], kw["k"], kw["v"], dense_definition(lens, blocks, causal), float(scale))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    if kw["return_lse"]:
        out, ours_lse = out
        close64(ours_lse, lse, "lse", **tol)
    close64(out, ref, f"masked_attention {case} {arg}", **tol)


@FAST
@given(attention_case(), st.data())
def test_masked_attention_arguments(case, data):
    run_attention_case(case, data, "torch", torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="interpreted Triton: CPU only")
@TRITON
@given(attention_case(), st.data())
def test_masked_attention_arguments_interpreted_triton(case, data):
    run_attention_case(case, data, "triton", torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="interpreted Triton: CPU only")
def test_interpreted_triton_never_takes_bfloat16_or_huge_scales():
    """Automatic dispatch takes torch where the interpreted kernel would be wrong; forcing triton raises."""
    mask = mk.AttentionMask.from_seqlens([3, 5])
    q = torch.randn(8, 2, 4)
    for kw, why in ((dict(q=q.bfloat16(), k=q.bfloat16(), v=q.bfloat16()), "bfloat16"),
                    (dict(q=q, k=q, v=q, scale=1e30), "scale")):
        with pytest.raises(BackendUnavailable, match=why):
            mk.masked_attention(mask=mask, impl="triton", **kw)
        ours = mk.masked_attention(mask=mask, **kw)
        ref, _ = attention64(kw["q"], kw["k"], kw["v"], mask.to_dense(), kw.get("scale", 0.5))
        close64(ours, ref, why, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# masked_token_loss
# ---------------------------------------------------------------------------------------------------------

OP_MTL = "masked_token_loss"


@FAST
@given(st.integers(1, 5), st.integers(1, 4), st.integers(2, 6), st.data())
def test_masked_token_loss_arguments(N, H, V, data):
    run_token_loss_case(N, H, V, data, "torch")


@pytest.mark.skipif(HAS_CUDA, reason="interpreted Triton: CPU only")
@TRITON
@given(st.integers(1, 5), st.integers(1, 4), st.integers(2, 6), st.data())
def test_masked_token_loss_arguments_interpreted_triton(N, H, V, data):
    run_token_loss_case(N, H, V, data, "triton")


def run_token_loss_case(N, H, V, data, impl):
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    bias = torch.randn(V) if data.draw(st.booleans()) else None
    ignore = data.draw(st.sampled_from([-100, -1, 0, V + 3, np.int64(-7), np.int32(1)]))
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.3] = int(ignore)
    kw = dict(hidden=hidden, weight=weight, labels=labels, bias=bias, ignore_index=ignore,
              reduction=data.draw(st.sampled_from(["mean", "sum", "none"])), impl=impl)
    arg = data.draw(st.sampled_from(["hidden", "weight", "labels", "bias", "ignore_index", "reduction", "impl", None]))
    value = None
    if arg == "ignore_index":
        value = data.draw(st.sampled_from([
            -100, Bad(None), Bad(1.5), Bad(-100.0), Bad(True), Bad("-100"), Bad(2 ** 70), Bad(float("nan")),
            Bad(torch.tensor(1.5)), Bad([1])]))
    elif arg == "reduction":
        value = data.draw(st.sampled_from(["mean", Bad("avg"), Bad(None), Bad(["mean"]), Bad(1), Bad("MEAN")]))
    elif arg == "labels":
        out_of_range = labels.clone()
        out_of_range[0] = V if int(ignore) != V else V + 1
        negative = labels.clone()
        negative[-1] = -5 if int(ignore) != -5 else -6
        value = data.draw(st.sampled_from([
            labels.to(torch.int32), labels.to(torch.int16), Bad(labels.float()), Bad(labels.bool()),
            Bad(out_of_range, "label", "labels"), Bad(negative, "label", "labels"),
            Bad(labels[:-1] if N > 1 else labels[:0], "labels", "hidden"),
            Bad(labels[None]), Bad(labels.tolist()), Bad(None)]))
    elif arg == "hidden":
        value = data.draw(st.sampled_from([
            Bad(hidden.long()), Bad(hidden[0]), Bad(hidden[None]), Bad(None),
            Bad(hidden[:0], "hidden", "labels", "empty"),
            Bad(torch.randn(N, H + 1), "hidden", "weight", "H"), Bad(hidden.tolist()), hidden.T.contiguous().T]))
    elif arg == "weight":
        value = data.draw(st.sampled_from([
            Bad(weight.long()), Bad(weight[0]), Bad(None), Bad(weight[:0], "weight", "empty", "hidden"),
            Bad(torch.randn(V, H + 1), "weight", "hidden"), weight.T.contiguous().T]))
    elif arg == "bias":
        value = data.draw(st.sampled_from([None, torch.randn(V), Bad(torch.randn(V + 1)), Bad(torch.randn(1, V)),
                                           Bad(torch.arange(V)), Bad([0.0] * V), Bad(0.5)]))
    elif arg == "impl":
        value = data.draw(st.sampled_from([Bad("fast"), Bad(0), Bad(False)]))
    refused, out = call_drawn(OP_MTL, mk.masked_token_loss, kw, arg, value)
    if refused:
        return
    b = kw["bias"]
    ref = reference.masked_token_loss(kw["hidden"].double(), kw["weight"].double(), kw["labels"].long(),
                                      bias=b.double() if b is not None else None, ignore_index=int(kw["ignore_index"]),
                                      reduction=kw["reduction"])
    # the reference itself, checked against a dense cross-entropy once here
    logits = kw["hidden"].double() @ kw["weight"].double().T + (b.double() if b is not None else 0)
    keep = kw["labels"].long() != int(kw["ignore_index"])
    rows = torch.zeros(N, dtype=torch.float64)
    rows[keep] = torch.nn.functional.cross_entropy(logits[keep], kw["labels"].long()[keep], reduction="none")
    dense = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / max(int(keep.sum()), 1)}[kw["reduction"]]
    close64(ref, dense, "reference")
    close64(out, dense, f"masked_token_loss {arg}")


# ---------------------------------------------------------------------------------------------------------
# masked_patch_loss
# ---------------------------------------------------------------------------------------------------------

OP_MPL = "masked_patch_loss"


def patch_loss64(pred, target, mask, norm_pix, eps):
    p, t = pred.double(), target.double()
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps).sqrt()
    rows = ((p - t) ** 2).mean(-1)
    if mask is None:
        return rows.mean()
    return (rows * mask).sum() / max(int(mask.sum()), 1)


@FAST
@given(st.integers(1, 5), st.integers(2, 6), st.data())
def test_masked_patch_loss_arguments(N, P, data):
    run_patch_loss_case(N, P, data, "torch")


@pytest.mark.skipif(HAS_CUDA, reason="interpreted Triton: CPU only")
@TRITON
@given(st.integers(1, 5), st.integers(2, 6), st.data())
def test_masked_patch_loss_arguments_interpreted_triton(N, P, data):
    run_patch_loss_case(N, P, data, "triton")


def run_patch_loss_case(N, P, data, impl):
    pred, target = torch.randn(N, P), torch.randn(N, P)
    mask = (torch.rand(N) < 0.6) if data.draw(st.booleans()) else None
    kw = dict(pred=pred, target=target, mask=mask, norm_pix=data.draw(st.booleans()),
              eps=data.draw(st.sampled_from([1e-6, 0.0, 0, 1e-2, np.float32(1e-3)])), impl=impl)
    arg = data.draw(st.sampled_from(["pred", "target", "mask", "norm_pix", "eps", "impl", None]))
    value = None
    if arg == "eps":
        value = data.draw(st.sampled_from([
            1e-5, Bad(None), Bad(True), Bad("1e-6"), Bad(-1e-6), Bad(float("inf")), Bad(float("nan")), Bad([1e-6]),
            Bad(torch.tensor(1e-6)), Bad(-1)]))
    elif arg == "norm_pix":
        value = data.draw(st.sampled_from([True, False, Bad("yes"), Bad(None), Bad(1), Bad("False")]))
    elif arg == "mask":
        value = data.draw(st.sampled_from([
            None, torch.ones(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool), Bad(torch.ones(N)),
            Bad(torch.ones(N, dtype=torch.long)), Bad(torch.ones(N + 1, dtype=torch.bool)),
            Bad(torch.ones(N, 1, dtype=torch.bool)), Bad([True] * N), Bad("all")]))
    elif arg == "pred":
        value = data.draw(st.sampled_from([
            Bad(pred.long()), Bad(pred[0]), Bad(pred[None]), Bad(None), Bad(pred[:0], "pred", "empty"),
            Bad(pred[:, :1], "target", "pred"), Bad(pred.tolist()), pred.T.contiguous().T]))
    elif arg == "target":
        value = data.draw(st.sampled_from([
            Bad(target.long()), Bad(target[:, :-1], "target"), Bad(None), Bad(target.tolist()), target.half()]))
    elif arg == "impl":
        value = data.draw(st.sampled_from([Bad("gpu"), Bad(1)]))
    refused, out = call_drawn(OP_MPL, mk.masked_patch_loss, kw, arg, value)
    if refused:
        return
    ref = patch_loss64(kw["pred"], kw["target"], kw["mask"], kw["norm_pix"], float(kw["eps"]))
    close64(out, ref, f"masked_patch_loss {arg}")


def test_masked_patch_loss_norm_pix_needs_two_values():
    expect_clear_error(OP_MPL, "norm_pix", lambda: mk.masked_patch_loss(torch.randn(3, 1), torch.randn(3, 1),
                                                                          norm_pix=True, impl="torch"),
                       Bad(True, "norm_pix"))


# ---------------------------------------------------------------------------------------------------------
# info_nce
# ---------------------------------------------------------------------------------------------------------

OP_NCE = "info_nce"


@st.composite
def nce_case(draw):
    B, D, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(0, 2))
    P = B + draw(st.integers(0, 2))
    return B, D, k, P


def run_nce_case(case, data, impl):
    B, D, k, P = case
    query = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    doc = torch.nn.functional.normalize(torch.randn(P + B * k, D), dim=-1)
    M = doc.shape[0]
    kw = dict(query=query, doc=doc, temperature=data.draw(st.sampled_from([0.05, 0.5, 1, np.float32(0.1)])),
              positive_index=None, impl=impl, hard_negatives=k,
              hard_negative_scope=data.draw(st.sampled_from(["batch", "own"])), symmetric=data.draw(st.booleans()),
              doc_ids=None)
    arg = data.draw(st.sampled_from(["temperature", "positive_index", "hard_negatives", "hard_negative_scope",
                                     "symmetric", "doc_ids", "query", "doc", "impl", None]))
    value = None
    if arg == "temperature":
        value = data.draw(st.one_of(st.floats(0.01, 5.0), st.sampled_from([
            torch.tensor(0.07), torch.tensor([0.07]), Bad(None), Bad(True), Bad("0.1"), Bad(float("inf")),
            Bad(float("nan")), Bad(0.0), Bad(-0.1), Bad(1e-300), Bad(torch.tensor([0.1, 0.2])), Bad(torch.tensor(1)),
            Bad(torch.tensor(-0.1)), Bad(torch.tensor(float("inf"))), Bad(torch.tensor(float("nan"))), Bad([0.1])])))
    elif arg == "positive_index":
        pos = torch.randint(0, P, (B,))
        value = data.draw(st.sampled_from([
            pos, pos.to(torch.int32), Bad(pos.float()), Bad(pos.bool()), Bad(pos.tolist()), Bad(pos[None]),
            Bad(torch.full((B,), P if kw["hard_negative_scope"] == "own" and k else M), "positive_index"),
            Bad(torch.full((B,), -1), "positive_index"), Bad(torch.zeros(B + 1, dtype=torch.long))]))
    elif arg == "hard_negatives":
        value = data.draw(st.sampled_from([Bad(-1), Bad(1.5), Bad(True), Bad(None), Bad("2"), Bad(float(k)),
                                           Bad(k + M, "hard_negatives", "doc")]))
    elif arg == "hard_negative_scope":
        value = data.draw(st.sampled_from([Bad("all"), Bad(None), Bad(["own"]), Bad(1), Bad("OWN")]))
    elif arg == "symmetric":
        value = data.draw(st.sampled_from([True, False, Bad("yes"), Bad(1), Bad(None)]))
    elif arg == "doc_ids":
        ids = torch.randint(0, 3, (M,))
        value = data.draw(st.sampled_from([ids, Bad(ids.float()), Bad(ids[:-1]), Bad(ids.tolist()), Bad(ids.bool())]))
    elif arg == "query":
        value = data.draw(st.sampled_from([
            Bad(query.long()), Bad(query[0]), Bad(None), Bad(query[:, :0], "query", "empty", "doc"),
            Bad(query[:0], "query", "empty", "doc", "positive", "positives"),
            Bad(query.double(), "query", "doc", "dtype"),
            Bad(torch.randn(B, D + 1), "query", "doc")]))
    elif arg == "doc":
        value = data.draw(st.sampled_from([Bad(doc.long()), Bad(doc[:, None]), Bad(None),
                                           Bad(doc[:0], "doc", "empty"), Bad(doc.tolist())]))
    elif arg == "impl":
        value = data.draw(st.sampled_from([Bad("cuda_fast"), Bad(2)]))
    refused, out = call_drawn(OP_NCE, mk.info_nce, kw, arg, value)
    if refused:
        return
    t = kw["temperature"]
    t64 = t.double() if torch.is_tensor(t) else float(t)
    ref = reference.info_nce(kw["query"].double(), kw["doc"].double(), t64, kw["positive_index"],
                             hard_negatives=k, hard_negative_scope=kw["hard_negative_scope"],
                             symmetric=kw["symmetric"], doc_ids=kw["doc_ids"])
    close64(out, ref, f"info_nce {arg}", rtol=1e-4, atol=1e-5)


@FAST
@given(nce_case(), st.data())
def test_info_nce_arguments(case, data):
    run_nce_case(case, data, "torch")


@pytest.mark.skipif(HAS_CUDA, reason="interpreted Triton: CPU only")
@TRITON
@given(nce_case(), st.data())
def test_info_nce_arguments_interpreted_triton(case, data):
    run_nce_case(case, data, "triton")


# ---------------------------------------------------------------------------------------------------------
# GradCache
# ---------------------------------------------------------------------------------------------------------

OP_GC = "GradCache"


@FAST
@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_grad_cache_arguments(B, Dq, data):
    torch.manual_seed(B * 10 + Dq)
    enc = torch.nn.Linear(3, 2, dtype=torch.float64)
    queries, docs = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)

    def loss_fn(q, d):
        return mk.info_nce(q, d, temperature=0.5, impl="torch")

    kw = dict(encoders=enc, loss_fn=loss_fn, chunk_sizes=data.draw(st.integers(1, 4)))
    arg = data.draw(st.sampled_from(["chunk_sizes", "encoders", "loss_fn", "split_fn", "scaler", "sync_modules", None]))
    value = None
    if arg == "chunk_sizes":
        value = data.draw(st.sampled_from([
            2, (1, 3), [4, 2], np.int64(2), (np.int32(1), 2), Bad(None), Bad(1.5), Bad("4"), Bad(0), Bad(-1), Bad(True),
            Bad([]), Bad([2, 0]), Bad([2, 1.5]), Bad((2, None)), Bad(2.0), Bad(float("inf")), Bad(float("nan")),
            Bad({2: 3}), Bad(np.True_), Bad(np.float32(2.0))]))
    elif arg == "encoders":
        value = data.draw(st.sampled_from([[enc, enc], Bad(None), Bad([]), Bad(3), Bad([enc, 3])]))
    elif arg == "loss_fn":
        value = data.draw(st.sampled_from([Bad(None), Bad("info_nce"), Bad(0.1)]))
    elif arg == "split_fn":
        value = data.draw(st.sampled_from([None, Bad(3), Bad("rows")]))
    elif arg == "scaler":
        value = data.draw(st.sampled_from([None, Bad("amp"), Bad(2.0)]))
    elif arg == "sync_modules":
        value = data.draw(st.sampled_from([(), [], Bad(None), Bad(enc), Bad(3), Bad("ddp")]))
    refused, _ = call_drawn(OP_GC, lambda **kw: mk.GradCache(**kw).step(queries, docs), kw, arg, value)
    if refused:
        return
    ours = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    ref_loss = reference.info_nce(enc(queries), enc(docs), 0.5)
    ref_loss.backward()
    COUNTS["valid"] += 1
    for a, b in zip(ours, (p.grad for p in enc.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zz_counts():
    """Runs last: prints the counts for the closing note; no bad input may have been accepted."""
    print(f"\nargument fuzz: bad inputs tried {COUNTS['bad']}, clear errors {COUNTS['clear']}, silent "
          f"{COUNTS['silent']}; valid calls equal to the float64 reference {COUNTS['valid']}")
    assert not SILENT, SILENT
