"""masked_patch_loss: every backend against float64, edge cases, bad inputs."""

import pytest
import torch

import moca_kernels as mk
from moca_kernels import _alloc, _ext, reference
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import assert_close_like_torch, rand

HAS_CUDA = torch.cuda.is_available()


def naive_lowp(pred, target, mask, norm_pix, eps):
    """PyTorch's own computation in the inputs' precision: the baseline error of the tolerance rule."""
    t = target.to(pred.dtype)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps).sqrt()
    per_row = (pred - t).pow(2).mean(-1)
    if mask is None:
        return per_row.mean()
    return (per_row * mask.to(pred.dtype)).sum() / mask.sum().clamp(min=1)


def make_inputs(N, P, dtype, device, mask_kind, target_dtype=None):
    pred = rand(N, P, dtype=dtype, device=device)
    target = rand(N, P, dtype=target_dtype or dtype, device=device, scale=2.0) + 0.5
    if mask_kind == "none":
        mask = None
    elif mask_kind == "random":
        mask = torch.rand(N, device=device) < 0.5
        mask[0] = True
    elif mask_kind == "all_false":
        mask = torch.zeros(N, dtype=torch.bool, device=device)
    else:
        raise ValueError(mask_kind)
    return pred, target, mask


def check_against_float64(impl, N, P, dtype, device, mask_kind, norm_pix, target_dtype=None, grad_scale=1.0):
    pred, target, mask = make_inputs(N, P, dtype, device, mask_kind, target_dtype)
    p = pred.clone().requires_grad_()
    loss = mk.masked_patch_loss(p, target, mask, norm_pix=norm_pix, impl=impl)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (loss * grad_scale).backward()

    p64 = pred.double().requires_grad_()
    ref = reference.masked_patch_loss(p64, target.double(), mask, norm_pix=norm_pix)
    (ref * grad_scale).backward()

    pl = pred.clone().requires_grad_()
    base = naive_lowp(pl, target, mask, norm_pix, 1e-6)
    (base * grad_scale).backward()

    assert_close_like_torch(loss, ref, base.detach(), dtype=dtype, what="loss")
    assert p.grad.dtype == pred.dtype
    assert_close_like_torch(p.grad, p64.grad, pl.grad, dtype=dtype, what="grad")


def test_torch_backend_matches_float64():
    for norm_pix in (False, True):
        check_against_float64("torch", 9, 37, torch.float32, "cpu", "random", norm_pix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P", [2, 37, 1176])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_matches_float64(dtype, P, mask_kind, norm_pix, device):
    check_against_float64("triton", 7, P, dtype, device, mask_kind, norm_pix)


def test_triton_long_rows_use_the_looped_path(device):
    from moca_kernels.losses import masked_patch_loss_triton as kernels

    P = kernels.MAX_SINGLE_TILE + 7
    check_against_float64("triton", 3, P, torch.float32, device, "random", True)


def test_triton_mixed_pred_and_target_dtypes(device):
    check_against_float64("triton", 5, 33, torch.float32, device, "random", True, target_dtype=torch.float16)


def test_grad_output_other_than_one_scales_the_gradient(device):
    check_against_float64("triton", 6, 40, torch.float32, device, "random", False, grad_scale=0.1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_counted_row_gives_zero_loss_and_zero_grad(impl, device):
    pred, target, mask = make_inputs(5, 12, torch.float32, device, "all_false")
    pred.requires_grad_()
    loss = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_constant_rows_with_norm_pix_give_no_nan(impl, device):
    pred = rand(4, 16, device=device).requires_grad_()
    target = torch.full((4, 16), 0.7, device=device)
    loss = mk.masked_patch_loss(pred, target, norm_pix=True, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # a constant row normalises to zeros: the loss is the mean of pred^2
    torch.testing.assert_close(loss, pred.detach().pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_every_gradient_element_is_written(device):
    pred, target, mask = make_inputs(9, 50, torch.float32, device, "random")
    p = pred.clone().requires_grad_()
    with _alloc.poisoned():
        mk.masked_patch_loss(p, target, mask, norm_pix=True, impl="triton").backward()
    assert torch.isfinite(p.grad).all()
    assert torch.equal(p.grad[~mask], torch.zeros_like(p.grad[~mask]))


def test_strided_rows(device):
    big = rand(6, 64, device=device)
    pred = big[:, :40]  # row stride 64, unit stride along P
    target = rand(6, 40, device=device)
    ours = mk.masked_patch_loss(pred, target, impl="triton")
    torch.testing.assert_close(ours, reference.masked_patch_loss(pred, target), rtol=1e-5, atol=1e-6)


def test_forward_without_grad_matches(device):
    pred, target, mask = make_inputs(8, 24, torch.float32, device, "random")
    with torch.no_grad():
        ours = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl="triton")
    torch.testing.assert_close(ours, reference.masked_patch_loss(pred, target, mask, norm_pix=True), rtol=1e-5, atol=1e-6)


def test_second_backward_through_the_fused_gradient_raises(device):
    pred, target, _ = make_inputs(4, 8, torch.float32, device, "none")
    pred.requires_grad_()
    loss = mk.masked_patch_loss(pred, target, impl="triton") * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_works_under_torch_compile(device):
    pred, target, mask = make_inputs(6, 20, torch.float32, device, "random")
    p = pred.clone().requires_grad_()

    @torch.compile(fullgraph=True)
    def step(x, t, m):
        return mk.masked_patch_loss(x, t, m, norm_pix=True, impl="triton") * 0.1

    step(p, target, mask).backward()
    p2 = pred.clone().requires_grad_()
    (reference.masked_patch_loss(p2, target, mask, norm_pix=True) * 0.1).backward()
    torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-7)


# --- bad input: one clear error each ---------------------------------------------------------------------


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="target shape"):
        mk.masked_patch_loss(torch.randn(4, 5), torch.randn(4, 6))


def test_integer_dtype_raises():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mk.masked_patch_loss(torch.ones(4, 5, dtype=torch.int32), torch.randn(4, 5))


def test_mask_of_wrong_length_raises():
    with pytest.raises(ValueError, match="one flag per row"):
        mk.masked_patch_loss(torch.randn(4, 5), torch.randn(4, 5), torch.ones(3, dtype=torch.bool))


def test_non_bool_mask_raises():
    with pytest.raises(TypeError, match="bool"):
        mk.masked_patch_loss(torch.randn(4, 5), torch.randn(4, 5), torch.ones(4))


def test_empty_input_raises():
    with pytest.raises(ValueError, match="empty"):
        mk.masked_patch_loss(torch.randn(0, 5), torch.randn(0, 5))


def test_norm_pix_with_one_value_per_row_raises():
    with pytest.raises(ValueError, match="P >= 2"):
        mk.masked_patch_loss(torch.randn(4, 1), torch.randn(4, 1), norm_pix=True)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal of CPU tensors")
def test_cpu_tensor_to_the_cuda_backend_raises_with_the_reason():
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        mk.masked_patch_loss(torch.randn(4, 5), torch.randn(4, 5), impl="cuda")


# --- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("P,norm_pix", [(3, False), (1176, True), (4704, False), (20000, True)])
def test_gpu_backends_match_float64(impl, dtype, P, norm_pix):
    if impl == "cuda" and not _ext.available():
        pytest.fail(f"moca_kernels._C did not build: {_ext.unavailable_reason()}")
    check_against_float64(impl, 300, P, dtype, "cuda", "random", norm_pix)
    check_against_float64(impl, 33, P, dtype, "cuda", "none", norm_pix, grad_scale=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_every_gradient_element_is_written(impl):
    pred, target, mask = make_inputs(257, 1176, torch.bfloat16, "cuda", "random")
    p = pred.clone().requires_grad_()
    with _alloc.poisoned():
        mk.masked_patch_loss(p, target, mask, norm_pix=True, impl=impl).backward()
    assert torch.isfinite(p.grad).all()
    assert (p.grad[~mask] == 0).all()


@pytest.mark.gpu
def test_gpu_default_dispatch_prefers_cuda_then_triton():
    from moca_kernels.losses.masked_patch_loss import _OP

    pred, target, mask = make_inputs(8, 16, torch.bfloat16, "cuda", "random")
    chosen = _OP.select(None, pred=pred, target=target, mask=mask, norm_pix=False, eps=1e-6).name
    assert chosen == ("cuda" if _ext.available() else "triton")


def _adopted(impl, device, dtype=torch.float32):
    """True when pred.grad is the very buffer the fused forward wrote (no copy by autograd)."""
    made = []
    original = _alloc.empty_like

    def recording(t, dtype=None):
        out = original(t, dtype)
        made.append(out.data_ptr())
        return out

    pred, target, mask = make_inputs(16, 24, dtype, device, "random")
    pred.requires_grad_()
    _alloc.empty_like = recording
    try:
        (mk.masked_patch_loss(pred, target, mask, impl=impl) * 0.5).backward()
    finally:
        _alloc.empty_like = original
    return pred.grad.data_ptr() in made


def test_the_fused_gradient_is_adopted_not_copied(device):
    assert _adopted("triton", device)


@pytest.mark.gpu
def test_gpu_the_fused_gradient_is_adopted_not_copied():
    if not _ext.available():
        pytest.fail(f"moca_kernels._C did not build: {_ext.unavailable_reason()}")
    assert _adopted("cuda", "cuda", torch.bfloat16) and _adopted("triton", "cuda", torch.bfloat16)


def test_backward_allocates_no_full_size_buffer(device):
    """The fused backward neither copies the gradient nor receives a zero-filled [N, P] gradient of its
    internal output: no aten op in backward produces an [N, P] tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSize(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.seen = shape, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view or an in-place op allocates nothing
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                    self.seen.append(str(func))
            return out

    pred, target, mask = make_inputs(12, 40, torch.float32, device, "random")
    pred.requires_grad_()
    loss = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl="triton") * 0.5
    with FullSize((12, 40)) as spy:
        loss.backward()
    assert spy.seen == [], spy.seen
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
