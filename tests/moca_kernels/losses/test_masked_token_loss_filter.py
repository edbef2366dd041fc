"""masked_token_loss(filter_eps=): Cut Cross-Entropy's gradient filter, opt-in; exact by default.

Interpreted Triton kernels run 16 x 16 logit tiles, so the torch reference filters with block_m = block_v = 16.
Inputs are LM-like: a shared "frequency" direction gives each token a fixed log-prior (Zipf-like, in a random
order of token ids, so only Cut Cross-Entropy's vocabulary order groups the unlikely tokens), so most of
the vocabulary has tiny probabilities in every row, as in a trained LM, and whole tiles fall under the threshold.
"""

import math

import pytest
import torch

import moca_kernels as mk
from moca_kernels import reference
from moca_kernels.losses import masked_token_loss_triton as K

EPS = 2.0**-12  # CCE's "auto" threshold for bfloat16


def lm_like(n, H, V, seed=0, spread=2.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    hidden[:, 0] = 1.0
    rank = torch.randperm(V, generator=g).float()  # token ids do not follow frequency: the filter's order must
    weight[:, 0] = -spread * torch.log1p(rank)     # token v's log-prior, Zipf-like
    labels = torch.multinomial(torch.softmax(weight[:, 0], 0), n, replacement=True, generator=g)
    labels[1] = -100
    return hidden, weight, labels


def grads(impl, hidden, weight, labels, filter_eps, bias=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    loss = mk.masked_token_loss(h, w, labels, bias=b, impl=impl, filter_eps=filter_eps)
    loss.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def ref_grads(hidden, weight, labels, filter_eps, bias=None):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    if filter_eps is None:
        loss = reference.masked_token_loss(h, w, labels, bias=b)
    else:
        counted = labels != -100
        order = reference.vocab_order(hidden[counted], weight, bias)  # as the kernels' launcher computes it
        loss = reference.masked_token_loss_filtered(h, w, labels, filter_eps, bias=b, block_m=16, block_v=16,
                                                    order=order)
    loss.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def test_nothing_filtered_equals_exact():
    """A threshold no tile falls under: the filtered path gives the exact path's loss bit for bit and its
    gradients up to float32 summation order (the filtered path walks the vocabulary in CCE's order, in
    gathered chunks)."""
    hidden, weight, labels = lm_like(40, 32, 200)
    exact = grads("triton", hidden, weight, labels, None)
    assert K.last_filter_stats == {}
    filt = grads("triton", hidden, weight, labels, 1e-30)
    stats = K.last_filter_stats
    assert stats["kept"] == stats["tiles"] == 3 * 13 and stats["active_columns"] == 200
    assert torch.equal(exact[0], filt[0])
    for a, b in zip(exact[1:3], filt[1:3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("impl", ["triton", "triton:v2", "triton:v3"])
def test_filtered_matches_the_filtered_reference(impl):
    hidden, weight, labels = lm_like(40, 32, 200)
    bias = torch.randn(200) * 0.1
    ours = grads(impl, hidden, weight, labels, EPS, bias)
    stats = dict(K.last_filter_stats)
    ref = ref_grads(hidden, weight, labels, EPS, bias)
    exact = ref_grads(hidden, weight, labels, None, bias)
    assert 0 < stats["kept"] < stats["tiles"] and stats["active_columns"] < 200  # tiles and columns dropped
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=1e-5, atol=1e-6)  # the loss stays exact
    for name, a, r, e in zip(("hidden", "weight", "bias"), ours[1:], ref[1:], exact[1:]):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6, msg=f"grad {name}")
        assert not torch.allclose(r, e, rtol=0, atol=1e-12), f"grad {name}: the filter changed nothing"


def test_filtered_error_under_the_documented_bound():
    """Against float64 exact gradients: each dropped entry of G is below eps * g_r (g_r = 1 / n_counted), so
    |err dWeight[v, k]| <= eps * sum_r g_r |h[r, k]| and |err dHidden[r, k]| <= g_r * m_r * eps * max |W[:, k]|
    with m_r the row's dropped entries (bounded by the row's softmax mass outside kept tiles too)."""
    hidden, weight, labels = lm_like(48, 32, 256, seed=1)
    _, dh, dw, _ = grads("triton", hidden, weight, labels, EPS)
    _, dh64, dw64, _ = ref_grads(hidden, weight, labels, None)
    counted = labels != -100
    g = 1.0 / counted.sum()
    bound_w = EPS * g * hidden[counted].abs().sum(0).double()                        # [H]
    err_w = (dw.double() - dw64).abs().amax(0)
    assert (err_w <= bound_w + 1e-7).all(), (err_w - bound_w).max()
    bound_h = EPS * g * weight.shape[0] * weight.abs().amax(0).double()              # [H], all V dropped
    err_h = (dh.double() - dh64).abs().amax(0)
    assert (err_h <= bound_h + 1e-7).all()
    assert err_w.max() > 1e-9  # the filter did drop something


def test_engine_torch_compact_gemms(monkeypatch):
    """The cuBLAS-side path of the compacted GEMMs (torch.mm / addmm on the gathered columns), run on CPU."""
    monkeypatch.setattr(K, "_bwd_engine", lambda dtype, device: "torch")
    hidden, weight, labels = lm_like(40, 32, 200)
    ours = grads("triton", hidden, weight, labels, EPS)
    ref = ref_grads(hidden, weight, labels, EPS)
    assert K.last_filter_stats["active_columns"] < 200
    for a, r in zip(ours[1:3], ref[1:3]):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


def test_fp16_filtered_matches_reference():
    hidden, weight, labels = lm_like(40, 32, 200)
    h16, w16 = hidden.half(), weight.half()
    ours = grads("triton", h16, w16, labels, "auto")  # float16: eps = 2^-15
    ref = ref_grads(h16.float(), w16.float(), labels, torch.finfo(torch.float16).eps / 32)
    for a, r in zip(ours[1:3], ref[1:3]):
        torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=2e-4)


def test_torch_backend_filters_like_the_reference():
    hidden, weight, labels = lm_like(40, 32, 200)
    ours = grads("torch", hidden.double(), weight.double(), labels, EPS)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    reference.masked_token_loss_filtered(h, w, labels, EPS, block_m=128, block_v=128).backward()
    assert torch.equal(ours[1], h.grad) and torch.equal(ours[2], w.grad)
    exact = grads("torch", hidden.double(), weight.double(), labels, None)
    assert not torch.equal(ours[2], exact[2])


@pytest.mark.parametrize("bad, err", [(True, TypeError), ("high", ValueError), (0.0, ValueError),
                                      (-1e-4, ValueError), (math.nan, ValueError), (torch.tensor(1e-4), TypeError)])
def test_bad_filter_eps_is_named(bad, err):
    hidden, weight, labels = lm_like(4, 8, 16)
    with pytest.raises(err, match="filter_eps"):
        mk.masked_token_loss(hidden, weight, labels, impl="torch", filter_eps=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "triton:v3"])
def test_gpu_filtered_fp32_matches_the_filtered_reference(impl):
    """Compiled kernels (autotuned tile, read back from the autotuner) against the float64 filtered reference
    with the same tile and order, float32; and the loss stays exact."""
    from moca_kernels.losses import masked_token_loss_desc as D
    from moca_kernels.losses import masked_token_loss_kernels as KK

    hidden, weight, labels = lm_like(300, 64, 5000, seed=2)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    ours = grads(impl, hidden, weight, labels, EPS)
    stats = dict(K.last_filter_stats)
    kernel = KK._grad_logits_kernel if impl == "triton" else D._GRAD_DESC["v3"]
    cfg = kernel.best_config.kwargs
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    order = reference.vocab_order(hidden[labels != -100], weight)
    reference.masked_token_loss_filtered(h, w, labels, EPS, block_m=cfg["BLOCK_M"], block_v=cfg["BLOCK_V"],
                                         order=order).backward()
    assert 0 < stats["kept"] < stats["tiles"], stats
    torch.testing.assert_close(ours[1].double(), h.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(ours[2].double(), w.grad, rtol=1e-3, atol=1e-6)


def test_opcheck_with_the_filter():
    """The fused forward custom op with filter_eps set: schema, fake tensors, autograd registration, and the
    backward through aot dispatch (torch.compile's path)."""
    hidden, weight, labels = lm_like(20, 16, 48)
    args = (hidden.requires_grad_(), weight.requires_grad_(), labels, None, -100, "v1", "v1", EPS)
    torch.library.opcheck(torch.ops.moca_kernels.masked_token_loss_fwd.default, args)
