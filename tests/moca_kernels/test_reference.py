"""The torch backend of every public op (the references) against independent float64 computations."""

import pytest
import torch
import torch.nn.functional as F

import moca_kernels as mk
from moca_kernels import reference
from tests.helpers import assert_close_like_torch, rand


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if out.dim() else None)
    return out.detach(), [t.grad for t in leaves]


def dense_attention64(q, k, v, mask, scale):
    """Whole-sequence attention with the dense [T, T] mask: a different route to the same numbers."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(~mask.to_dense()[None], float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v)


@pytest.mark.parametrize("causal,blocks", [(False, False), (True, False), (True, True)])
def test_masked_attention_torch_backend_matches_dense_float64(causal, blocks):
    seqlens = [5, 1, 9, 3]   # (zero-length documents are refused by from_seqlens; from_padding_mask keeps them)
    T = sum(seqlens)
    block_ids = None
    if blocks:
        block_ids = torch.full((T,), -1)
        block_ids[2:5] = 7   # an image inside document 0
        block_ids[8:12] = 3  # an image inside document 2
    mask = mk.AttentionMask.from_seqlens(seqlens, block_ids=block_ids, causal=causal)
    q, k, v = rand(T, 6, 8), rand(T, 2, 8), rand(T, 2, 8)
    fn = lambda q, k, v: mk.masked_attention(q, k, v, mask, scale=0.3, impl="torch")  # noqa: E731
    out, grads = grads_of(fn, q, k, v)
    ref, ref_grads = grads_of(lambda q, k, v: dense_attention64(q, k, v, mask, 0.3), q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)


def test_masked_attention_lse_is_the_log_normaliser():
    mask = mk.AttentionMask.from_seqlens([4, 6], causal=True)
    q, k, v = rand(10, 2, 4), rand(10, 1, 4), rand(10, 1, 4)
    _, lse = mk.masked_attention(q, k, v, mask, return_lse=True, impl="torch")
    s = torch.einsum("thd,shd->hts", q.double(), k.double().expand(10, 2, 4)) * 0.5
    s = s.masked_fill(~mask.to_dense()[None], float("-inf"))
    assert lse.shape == (2, 10) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_loss_torch_backend_matches_float64(norm_pix):
    pred, target = rand(11, 30), rand(11, 30) * 3 + 1
    mask = torch.rand(11) < 0.6
    mask[0] = True
    fn = lambda p, t: mk.masked_patch_loss(p, t, mask, norm_pix=norm_pix, impl="torch")  # noqa: E731
    out, (gp, gt) = grads_of(fn, pred, target)

    def explicit64(p, t):
        p, t = p.double(), t.double()
        if norm_pix:
            mu = t.mean(1, keepdim=True)
            var = ((t - mu) ** 2).sum(1, keepdim=True) / (t.shape[1] - 1)
            t = (t - mu) / torch.sqrt(var + 1e-6)
        rows = mask.nonzero().squeeze(1)
        return ((p[rows] - t[rows]) ** 2).sum() / (rows.numel() * p.shape[1])

    ref, (rp, rt) = grads_of(explicit64, pred, target)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gp.double(), rp.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt.double(), rt.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_token_loss_torch_backend_matches_float64(reduction):
    N, H, V = 13, 8, 37
    hidden, weight, bias = rand(N, H), rand(V, H), rand(V)
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    fn = lambda h, w, b: mk.masked_token_loss(h, w, labels, bias=b, reduction=reduction, impl="torch")  # noqa: E731
    out, grads = grads_of(fn, hidden, weight, bias)

    def full64(h, w, b):
        logits = h.double() @ w.double().T + b.double()
        per_row = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * (labels != -100)
        return {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / (labels != -100).sum()}[reduction]

    ref, ref_grads = grads_of(full64, hidden, weight, bias)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)


def test_masked_token_loss_reference_chunks_do_not_change_the_result():
    N, H, V = 20, 6, 11
    hidden, weight = rand(N, H).requires_grad_(), rand(V, H)
    labels = torch.randint(0, V, (N,))
    a = reference.masked_token_loss(hidden, weight, labels, chunk_size=3)
    ga, = torch.autograd.grad(a, hidden)
    b = reference.masked_token_loss(hidden, weight, labels, chunk_size=1000)
    gb, = torch.autograd.grad(b, hidden)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight = rand(5, 4).requires_grad_(), rand(9, 4).requires_grad_()
    loss = mk.masked_token_loss(hidden, weight, torch.full((5,), -100), impl="torch")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_info_nce_torch_backend_matches_float64():
    q = F.normalize(rand(7, 16), dim=-1)
    d = F.normalize(rand(10, 16), dim=-1)
    pos = torch.tensor([3, 0, 9, 1, 1, 5, 2])
    t = torch.tensor(0.05)
    fn = lambda q, d, t: mk.info_nce(q, d, temperature=t, positive_index=pos, impl="torch")  # noqa: E731
    out, grads = grads_of(fn, q, d, t)

    def explicit64(q, d, t):
        logits = q.double() @ d.double().T / t.double()
        return (-F.log_softmax(logits, 1)[torch.arange(7), pos]).mean()

    ref, ref_grads = grads_of(explicit64, q, d, t)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)


def test_low_precision_inputs_are_computed_in_float32():
    """The torch backend upcasts: its bf16 error is no worse than 2x PyTorch's own bf16 computation."""
    p64, t64 = rand(64, 100, dtype=torch.float64), rand(64, 100, dtype=torch.float64)
    ref = reference.masked_patch_loss(p64, t64)
    p, t = p64.bfloat16(), t64.bfloat16()
    ours = mk.masked_patch_loss(p, t, impl="torch")
    lowp = (p - t).pow(2).mean()
    assert_close_like_torch(ours, ref, lowp, dtype=torch.bfloat16)
