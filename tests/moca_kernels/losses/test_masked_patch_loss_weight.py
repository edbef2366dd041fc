"""masked_patch_loss(weight=): the scale folded into the loss and the fused gradient, against float64."""

import math

import pytest
import torch

import moca_kernels as mk
from moca_kernels import reference
from tests.helpers import assert_close_like_torch, rand


def _inputs(N, P, dtype, masked):
    pred = rand(N, P, dtype=dtype)
    target = rand(N, P, dtype=dtype, scale=2.0) + 0.5
    mask = None
    if masked:
        mask = torch.rand(N) < 0.5
        mask[0] = True
    return pred, target, mask


@pytest.mark.parametrize("impl", ["torch", "triton", "triton:v2"])
@pytest.mark.parametrize("weight, masked", [(0.1, False), (-2.5, True)])
def test_weight_matches_float64(impl, weight, masked):
    pred, target, mask = _inputs(6, 37, torch.float32, masked)
    p = pred.clone().requires_grad_()
    loss = mk.masked_patch_loss(p, target, mask, norm_pix=True, impl=impl, weight=weight)
    loss.backward()  # grad_output == 1: the weight must already be in the fused gradient

    p64 = pred.double().requires_grad_()
    ref = weight * reference.masked_patch_loss(p64, target.double(), mask, norm_pix=True)
    ref.backward()
    pl = pred.clone().requires_grad_()
    base = weight * reference.masked_patch_loss(pl, target, mask, norm_pix=True)  # torch's own fp32 error
    base.backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_like_torch(loss.detach(), ref.detach(), base.detach(), what="loss")
    assert_close_like_torch(p.grad, p64.grad, pl.grad, what="grad")
    # and against the unweighted loss of the same backend: weight * L
    unweighted = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl=impl)
    torch.testing.assert_close(loss.detach(), weight * unweighted, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_weight_with_grad_output(impl):
    """An outer scale still multiplies on top of weight (the backward's grad_output path)."""
    pred, target, mask = _inputs(5, 24, torch.float32, True)
    p = pred.clone().requires_grad_()
    (3.0 * mk.masked_patch_loss(p, target, mask, impl=impl, weight=0.25)).backward()
    p64 = pred.double().requires_grad_()
    (0.75 * reference.masked_patch_loss(p64, target.double(), mask)).backward()
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-8)


def test_weight_zero_gives_zero_loss_and_gradient():
    pred, target, mask = _inputs(4, 16, torch.float32, False)
    p = pred.clone().requires_grad_()
    loss = mk.masked_patch_loss(p, target, mask, impl="triton", weight=0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("bad, err, match", [
    (True, TypeError, "weight must be a float"),
    ("0.1", TypeError, "weight must be a float"),
    (torch.tensor(0.1), TypeError, "weight must be a float"),
    (math.nan, ValueError, "weight must be finite"),
    (math.inf, ValueError, "weight must be finite"),
])
def test_bad_weight_is_named(bad, err, match):
    pred, target, _ = _inputs(3, 8, torch.float32, False)
    with pytest.raises(err, match=match):
        mk.masked_patch_loss(pred, target, weight=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "cuda:v2", "cuda:v2p", "triton", "triton:v2"])
def test_gpu_weight_matches_float64(impl):
    """The compiled kernels (csrc kernels take weight as an argument) against float64, grad_output 1."""
    from moca_kernels import _ext

    if impl.startswith("cuda") and not _ext.available():
        pytest.skip(_ext.unavailable_reason())
    pred, target, mask = _inputs(300, 1176, torch.float32, True)
    pred, target, mask = pred.cuda(), target.cuda(), mask.cuda()
    p = pred.clone().requires_grad_()
    loss = mk.masked_patch_loss(p, target, mask, norm_pix=True, impl=impl, weight=0.1)
    loss.backward()
    p64 = pred.double().requires_grad_()
    ref = 0.1 * reference.masked_patch_loss(p64, target.double(), mask, norm_pix=True)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-9)
