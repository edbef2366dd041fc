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
    check_inputs_against_float64(impl, pred, target, mask, norm_pix, grad_scale)


def check_inputs_against_float64(impl, pred, target, mask, norm_pix, grad_scale=1.0):
    """Loss and gradient of ``impl`` on these tensors (pred may be a strided view) against float64."""
    dtype = pred.dtype
    p = pred.detach().requires_grad_()  # an alias keeps pred's strides
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


def test_column_strided_inputs(device):
    """pred and target with a non-unit stride along P (transposed storage) are read right."""
    pred = rand(37, 9, device=device).T  # [9, 37], strides (1, 9)
    target = (rand(37, 9, device=device, scale=2.0) + 0.5).T
    mask = torch.rand(9, device=device) < 0.5
    mask[0] = True
    check_inputs_against_float64("triton", pred, target, mask, True)


def test_target_that_requires_grad_goes_to_the_torch_backend_and_gets_its_gradient(device):
    pred, target, mask = make_inputs(6, 20, torch.float32, device, "random")
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    mk.masked_patch_loss(p, t, mask, norm_pix=True).backward()
    p64, t64 = pred.double().requires_grad_(), target.double().requires_grad_()
    reference.masked_patch_loss(p64, t64, mask, norm_pix=True).backward()
    assert t.grad is not None, "target got no gradient (a fused backend took it)"
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)


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


# --- kernel variants (backends "cuda:v2", "cuda:v2p", "triton:v2") -------------------------------------------
# The interpreted v2 runs at most 2 programs, so N above 2 * ROWS (ROWS <= 4 when interpreted) makes each
# program loop over several row blocks.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# 37 = 32 + 5 (tail tile of 8), 64: no tail, 147 = 1176 / 8 = 128 + 19 (tail 32), 1176 = 1024 + 152 (tail 256)
@pytest.mark.parametrize("P", [2, 3, 37, 64, 147, 1176])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_v2_matches_float64(dtype, P, mask_kind, norm_pix, device):
    check_against_float64("triton:v2", 23, P, dtype, device, mask_kind, norm_pix)


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("N", [1, 5, 21])
def test_triton_variants_write_every_row_and_zero_the_uncounted(variant, N, device):
    pred, target, mask = make_inputs(N, 37, torch.float32, device, "random")
    p = pred.clone().requires_grad_()
    with _alloc.poisoned():
        loss = mk.masked_patch_loss(p, target, mask, norm_pix=True, impl="triton:" + variant)
        loss.backward()
    assert torch.isfinite(p.grad).all()
    assert torch.equal(p.grad[~mask], torch.zeros_like(p.grad[~mask]))
    ref = reference.masked_patch_loss(pred.double(), target.double(), mask, norm_pix=True)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mask_kind", ["all_false", "all_true"])
def test_triton_v2_with_no_row_or_every_row_counted(mask_kind, device):
    pred, target, _ = make_inputs(11, 37, torch.float32, device, "none")
    mask = torch.full((11,), mask_kind == "all_true", device=device)
    p = pred.clone().requires_grad_()
    with _alloc.poisoned():
        loss = mk.masked_patch_loss(p, target, mask, norm_pix=True, impl="triton:v2")
        loss.backward()
    p64 = pred.double().requires_grad_()
    ref = reference.masked_patch_loss(p64, target.double(), mask, norm_pix=True)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-8)
    if mask_kind == "all_false":
        assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p.grad))


def test_triton_v2_constant_rows_with_norm_pix_give_no_nan(device):
    pred = rand(9, 37, device=device).requires_grad_()
    target = torch.full((9, 37), 0.7, device=device)
    loss = mk.masked_patch_loss(pred, target, norm_pix=True, impl="triton:v2")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(loss, pred.detach().pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_triton_v2_strided_rows_and_no_grad(device):
    big = rand(13, 64, device=device)
    pred, target = big[:, :37], rand(13, 37, device=device)  # row stride 64
    mask = torch.rand(13, device=device) < 0.5
    with torch.no_grad():
        ours = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl="triton:v2")
    ref = reference.masked_patch_loss(pred.double(), target.double(), mask, norm_pix=True)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)


def test_triton_v2_head_and_tail_tiles_cover_the_row():
    from moca_kernels.losses import masked_patch_loss_triton as kernels

    assert kernels.head_tail(1176) == (1024, 256)
    assert kernels.head_tail(37) == (32, 8)
    assert kernels.head_tail(64) == (64, 0)
    for P in range(2, 3000):
        head, tail = kernels.head_tail(P)
        assert head <= P <= head + tail or (tail == 0 and head == P)
        assert head & (head - 1) == 0 and tail & (tail - 1) == 0
        assert head + tail < 2 * P  # never wider than twice the row (v1's next_power_of_2 can be 2P - 2)


def test_variants_are_backends_and_automatic_dispatch_takes_v1():
    from moca_kernels.losses.masked_patch_loss import _OP

    assert _OP.spellings() == ["cuda", "cuda:v2", "cuda:v2p", "triton", "triton:v2", "torch"]
    assert [b.spelling for b in _OP.backends if b.auto] == ["cuda", "triton", "torch"]
    assert _OP.resolve("cuda").variant == {"fwd": "v1"} and _OP.resolve("triton").variant == {"fwd": "v1"}


def test_variant_from_the_environment(device, monkeypatch):
    """MOCA_KERNELS_IMPL=masked_patch_loss=triton:v2 runs the v2 kernel (its tuning key appears)."""
    from moca_kernels import tuning

    monkeypatch.setenv("MOCA_KERNELS_IMPL", "masked_patch_loss=triton:v2")
    tuning.CACHE.clear()
    pred, target, mask = make_inputs(9, 37, torch.float32, device, "random")
    loss = mk.masked_patch_loss(pred, target, mask, norm_pix=True)
    ref = reference.masked_patch_loss(pred.double(), target.double(), mask, norm_pix=True)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    assert [k[2] for k in tuning.cached("masked_patch_loss")] == ["v2"]


def test_forced_triton_v2_on_rows_it_cannot_hold_raises_its_reason(device):
    """Rows longer than v2's single tile: the v2 backend refuses (it ran v1 silently before)."""
    from moca_kernels.losses import masked_patch_loss_triton as kernels

    P = kernels.MAX_SINGLE_TILE + 7
    with pytest.raises(BackendUnavailable, match=f"triton:v2.*P = {P}.*single tile"):
        mk.masked_patch_loss(rand(2, P, device=device), rand(2, P, device=device), impl="triton:v2")


@pytest.mark.parametrize("impl,match", [("triton:v3", "unknown kernel variant 'v3'"),
                                        ("triton:v2p", "unknown kernel variant 'v2p'"),
                                        ("torch:v2", "backend 'torch' has no kernel variants"), ("cuda:", "unknown kernel variant")])
def test_unknown_kernel_variant_raises(impl, match, device):
    with pytest.raises(ValueError, match="masked_patch_loss: " + match):
        mk.masked_patch_loss(rand(4, 8, device=device), rand(4, 8, device=device), impl=impl)


def test_removed_variant_variable_raises(device, monkeypatch):
    monkeypatch.setenv("MOCA_MPL_KERNEL", "v2")
    with pytest.raises(ValueError, match="MOCA_MPL_KERNEL was removed.*masked_patch_loss=cuda:v2p"):
        mk.masked_patch_loss(rand(4, 8, device=device), rand(4, 8, device=device))


@pytest.mark.skipif(not _ext.available(), reason="extension not built")
@pytest.mark.parametrize("variant", [0, 4])
def test_cuda_launcher_rejects_an_unknown_variant_without_touching_memory(variant):
    status = _ext.module().masked_patch_loss_fwd(0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 0, 1e-6, False, False, 0, variant)
    assert status == 1  # cudaErrorInvalidValue, before any launch


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


@pytest.mark.parametrize("shape", [(8,), (2, 3, 8)])
def test_pred_that_is_not_2d_raises(shape):
    with pytest.raises(ValueError, match=r"2-D \[N, P\]"):
        mk.masked_patch_loss(torch.randn(shape), torch.randn(shape))


def test_inputs_on_different_devices_raise():
    pred, target = torch.randn(4, 5), torch.randn(4, 5)  # "meta" stands in for a second device
    with pytest.raises(ValueError, match="one device"):
        mk.masked_patch_loss(pred, target, torch.ones(4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        mk.masked_patch_loss(pred, target.to("meta"))


@pytest.mark.parametrize("eps", [-1e-6, float("nan")])
def test_negative_or_nan_eps_raises(eps):
    with pytest.raises(ValueError, match="eps must be >= 0"):
        mk.masked_patch_loss(torch.randn(4, 5), torch.randn(4, 5), norm_pix=True, eps=eps)


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


# Every (backend, variant) pair. The cuda kernels are compiled ahead, so they are checked widely; each
# triton shape compiles on first use, so triton is checked at a few shapes.
CUDA_VARIANTS = ["v1", "v2", "v2p"]
ALL_VARIANTS = [("cuda", v) for v in CUDA_VARIANTS] + [("triton", "v1"), ("triton", "v2")]


def _need_ext(impl, variant=None):
    """Fail (not skip) on a GPU machine where the CUDA extension did not build; the backend spelling
    ``impl:variant`` (``impl`` without a variant)."""
    if impl == "cuda" and not _ext.available():
        pytest.fail(f"moca_kernels._C did not build: {_ext.unavailable_reason()}")
    return impl if variant is None else f"{impl}:{variant}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", CUDA_VARIANTS)
@pytest.mark.parametrize("dtype,P", [(torch.bfloat16, P) for P in (8, 264, 520, 1176, 1536, 1800, 2048, 2056, 37, 1183)]
                         + [(torch.float16, 1176), (torch.float16, 37), (torch.float32, 520), (torch.float32, 1176)])
def test_gpu_cuda_variants_match_float64(variant, dtype, P):
    """bf16 P = 8 .. 2048 take 1, 2, 3, 5, 6, 8 (7 rounded up), 8 packs per lane; 2056 has 9 (looped); 37 and
    1183 are not multiples of 8 (looped); fp32 520 / 1176 take 5 / 10 packs (registers / looped). N = 300 is not a
    multiple of 8 rows."""
    _need_ext("cuda")
    check_against_float64("cuda:" + variant, 300, P, dtype, "cuda", "random", True)
    check_against_float64("cuda:" + variant, 33, P, dtype, "cuda", "none", False, grad_scale=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("dtype,P", [(torch.bfloat16, 1176), (torch.bfloat16, 37), (torch.float16, 1176)])
def test_gpu_triton_variants_match_float64(variant, dtype, P):
    check_against_float64("triton:" + variant, 300, P, dtype, "cuda", "random", True)


@pytest.mark.gpu
def test_gpu_triton_v2_every_candidate_matches_float64():
    """The GPU tests take each kernel's first config (MOCA_KERNELS_AUTOTUNE=0); the timed pick may take any."""
    from moca_kernels.losses import masked_patch_loss_triton as kernels

    N, P = 1000, 1176
    pred, target, mask = make_inputs(N, P, torch.bfloat16, "cuda", "random")
    count = mask.sum(dtype=torch.int32).reshape(1)
    t = target.double()
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    diff = (pred.double() - t) * mask[:, None]
    inv = 1.0 / (count.item() * P)
    for cfg in kernels._configs_v2(P):
        row_loss = torch.full((N,), float("nan"), device="cuda")
        grad = torch.full_like(pred, float("nan"))
        kernels._launch_fwd_v2(cfg, pred, target, mask.view(torch.uint8), count, grad, row_loss, True, 1e-6, True)
        # float32 math on the same bf16 inputs; the gradient is rounded to bf16 (relative 2^-9)
        torch.testing.assert_close(row_loss.double(), diff.pow(2).sum(-1) * inv, rtol=1e-4, atol=1e-3 * inv,
                                   msg=str(cfg))
        torch.testing.assert_close(grad.double(), 2 * diff * inv, rtol=2**-7, atol=1e-5 * inv, msg=str(cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("impl,variant", ALL_VARIANTS)
@pytest.mark.parametrize("row_stride", [1184, 1177])  # 16-byte aligned rows (register path) or not (looped)
def test_gpu_variants_on_strided_rows(impl, variant, row_stride):
    impl = _need_ext(impl, variant)
    big = rand(301, row_stride, dtype=torch.bfloat16, device="cuda")
    pred = big[:, :1176]
    target = rand(301, 1176, dtype=torch.bfloat16, device="cuda", scale=2.0) + 0.5
    mask = torch.rand(301, device="cuda") < 0.5
    check_inputs_against_float64(impl, pred, target, mask, True)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_column_strided_inputs(impl):
    """A non-unit stride along P (transposed storage) is made contiguous before the kernels read rows."""
    _need_ext(impl)
    pred = rand(1176, 301, dtype=torch.bfloat16, device="cuda").T
    target = (rand(1176, 301, dtype=torch.bfloat16, device="cuda", scale=2.0) + 0.5).T
    mask = torch.rand(301, device="cuda") < 0.5
    check_inputs_against_float64(impl, pred, target, mask, True)


@pytest.mark.gpu
@pytest.mark.parametrize("impl,variant", ALL_VARIANTS)
def test_gpu_variants_loop_over_rows_many_times(impl, variant):
    """More rows than (SMs x resident warps) of the persistent cuda grid (<= 32 warps per SM) and the
    persistent triton grid (<= 4 programs of <= 8 rows per SM): each warp / program takes several rows / blocks.
    Every gradient element is written (poisoned buffers), uncounted rows get zeros."""
    impl = _need_ext(impl, variant)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N = 4 * sms * 32 + 37
    pred, target, mask = make_inputs(N, 1176, torch.bfloat16, "cuda", "random")
    with _alloc.poisoned():
        check_inputs_against_float64(impl, pred, target, mask, True)
    p = pred.clone().requires_grad_()
    with _alloc.poisoned():
        mk.masked_patch_loss(p, target, mask, norm_pix=True, impl=impl).backward()
    assert torch.isfinite(p.grad).all() and (p.grad[~mask] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("impl,variant", ALL_VARIANTS)
def test_gpu_variants_forward_without_grad_matches(impl, variant):
    impl = _need_ext(impl, variant)
    pred, target, mask = make_inputs(1001, 1176, torch.bfloat16, "cuda", "random")
    with torch.no_grad():
        ours = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl=impl)
    ref = reference.masked_patch_loss(pred.double(), target.double(), mask, norm_pix=True)
    base = naive_lowp(pred, target, mask, True, 1e-6)
    assert_close_like_torch(ours, ref, base, dtype=torch.bfloat16, what="loss")


@pytest.mark.gpu
@pytest.mark.parametrize("impl,variant", ALL_VARIANTS)
def test_gpu_variants_with_no_row_or_every_row_counted(impl, variant):
    impl = _need_ext(impl, variant)
    pred, target, _ = make_inputs(777, 1176, torch.bfloat16, "cuda", "none")
    for counted in (False, True):
        mask = torch.full((777,), counted, device="cuda")
        p = pred.clone().requires_grad_()
        with _alloc.poisoned():
            loss = mk.masked_patch_loss(p, target, mask, norm_pix=True, impl=impl)
            loss.backward()
        if counted:
            check_inputs_against_float64(impl, pred, target, mask, True)
        else:
            assert loss.item() == 0.0 and (p.grad == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("impl,variant", ALL_VARIANTS)
def test_gpu_variants_constant_rows_with_norm_pix_give_no_nan(impl, variant):
    impl = _need_ext(impl, variant)
    pred = rand(40, 1176, dtype=torch.bfloat16, device="cuda").requires_grad_()
    target = torch.full((40, 1176), 0.7, dtype=torch.bfloat16, device="cuda")
    loss = mk.masked_patch_loss(pred, target, norm_pix=True, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(loss, pred.detach().float().pow(2).mean(), rtol=1e-3, atol=1e-6)


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
