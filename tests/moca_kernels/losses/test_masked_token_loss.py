"""masked_token_loss: the fused Triton backend against float64, edge cases, bad inputs.

CPU runs interpret the Triton kernels (float32 / float16 only: interpreted bf16 dots are wrong); GPU tests
(bf16 included) are marked ``gpu``. Sizes are odd on purpose: N, H, V are not multiples of any tile, the
vocabulary spans several forward splits and, with ``small_chunks``, several backward chunks.
"""

import pytest
import torch
import torch.nn.functional as F

import moca_kernels as mk
from moca_kernels import _alloc, reference, tuning
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import assert_close_like_torch, rand

HAS_CUDA = torch.cuda.is_available()
IGNORE = -100


@pytest.fixture
def kernels():
    from moca_kernels.losses import masked_token_loss_triton as k

    with tuning.override(autotune=False):  # one config per kernel: keeps the GPU run's compile time small
        yield k


@pytest.fixture
def small_chunks(kernels):
    """Backward in vocabulary chunks of 16 columns, so tiny V still takes several chunks."""
    with tuning.override(mtl_vocab_chunk=16):
        yield kernels


def make_inputs(N, H, V, dtype, device, with_bias=False, ignored=0.4, logit_std=1.5):
    hidden = rand(N, H, dtype=dtype, device=device)
    weight = rand(V, H, dtype=dtype, device=device, scale=logit_std / H ** 0.5)
    bias = rand(V, dtype=dtype, device=device, scale=0.5) if with_bias else None
    labels = torch.randint(0, V, (N,), device=device)
    if ignored:
        drop = torch.rand(N, device=device) < ignored
        drop[0] = False  # at least one counted row
        labels[drop] = IGNORE
    return hidden, weight, bias, labels


def naive_lowp(hidden, weight, labels, bias, reduction):
    """PyTorch in the inputs' precision with the logits materialised: the tolerance rule's baseline."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction=reduction)


def _leaves(hidden, weight, bias, dtype=None):
    cast = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach().clone())
    return [None if t is None else cast(t).requires_grad_() for t in (hidden, weight, bias)]


def check_against_float64(impl, N, H, V, dtype, device, reduction="mean", with_bias=False, ignored=0.4,
                          logit_std=1.5):
    hidden, weight, bias, labels = make_inputs(N, H, V, dtype, device, with_bias, ignored, logit_std)
    grad_out = rand(N, device=device) if reduction == "none" else torch.tensor(0.7, device=device)

    h, w, b = _leaves(hidden, weight, bias)
    ours = mk.masked_token_loss(h, w, labels, bias=b, reduction=reduction, impl=impl)
    assert ours.dtype == torch.float32
    assert ours.shape == ((N,) if reduction == "none" else ())
    (ours * grad_out).sum().backward()

    h64, w64, b64 = _leaves(hidden, weight, bias, torch.float64)
    ref = reference.masked_token_loss(h64, w64, labels, bias=b64, reduction=reduction)
    (ref * grad_out.double()).sum().backward()

    hl, wl, bl = _leaves(hidden, weight, bias)
    base = naive_lowp(hl, wl, labels, bl, reduction)
    (base.float() * grad_out).sum().backward()

    assert_close_like_torch(ours, ref, base.detach(), dtype=dtype, what="loss")
    for name, leaf, exact, lowp in (("d hidden", h, h64, hl), ("d weight", w, w64, wl), ("d bias", b, b64, bl)):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        assert_close_like_torch(leaf.grad, exact.grad, lowp.grad, dtype=dtype, what=name)
    return labels, h.grad


# --- interpreted Triton (CPU) or compiled (GPU) against float64 -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_matches_float64_at_odd_sizes(dtype, reduction, with_bias, small_chunks, device):
    # H = 24 is not a multiple of BLOCK_K, V = 37 spans two forward splits and three backward chunks
    labels, dh = check_against_float64("triton", 13, 24, 37, dtype, device, reduction, with_bias)
    assert (labels == IGNORE).any()
    assert torch.equal(dh[labels == IGNORE], torch.zeros_like(dh[labels == IGNORE]))


def test_triton_single_chunk_and_tile_aligned_hidden(kernels, device):
    # H = 32 takes the EVEN_K path, V = 20 one split and one chunk
    check_against_float64("triton", 5, 32, 20, torch.float32, device, "mean", with_bias=True)


def test_every_row_counted_skips_compaction(small_chunks, device):
    check_against_float64("triton", 9, 20, 33, torch.float32, device, "sum", ignored=0.0)


def test_large_logits_do_not_overflow(small_chunks, device):
    # logits of std ~60: exp overflows float32 without the running max
    check_against_float64("triton", 7, 24, 37, torch.float32, device, "mean", logit_std=60.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored_gives_zero_loss_and_zero_grads(impl, reduction, kernels, device):
    hidden, weight, bias, _ = make_inputs(6, 16, 21, torch.float32, device, with_bias=True)
    labels = torch.full((6,), IGNORE, device=device)
    h, w, b = _leaves(hidden, weight, bias)
    loss = mk.masked_token_loss(h, w, labels, bias=b, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_tied_weight_gradient_adds_to_the_embedding_gradient(small_chunks, device):
    # the LM head is the input embedding: its gradient is the sum of both uses
    V, H, N = 29, 24, 11
    emb = rand(V, H, device=device, scale=0.3)
    tokens = torch.randint(0, V, (N,), device=device)
    proj = rand(H, H, device=device, scale=H ** -0.5)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::3] = IGNORE

    def run(impl, e, p):
        hidden = torch.tanh(F.embedding(tokens, e) @ p)
        return mk.masked_token_loss(hidden, e, labels, impl=impl) if impl else \
            reference.masked_token_loss(hidden, e, labels)

    e1, p1 = emb.clone().requires_grad_(), proj.clone().requires_grad_()
    run("triton", e1, p1).backward()
    e64, p64 = emb.double().requires_grad_(), proj.double().requires_grad_()
    run(None, e64, p64).backward()
    torch.testing.assert_close(e1.grad.double(), e64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1.grad.double(), p64.grad, rtol=1e-5, atol=1e-6)


def test_strided_views_of_hidden_and_weight(small_chunks, device):
    # weight as the transpose of an [H, V] tensor, hidden as every other column of a wider tensor
    N, H, V = 10, 24, 37
    wide = rand(N, 2 * H, device=device)
    w_t = rand(H, V, device=device, scale=0.3)
    labels = torch.randint(0, V, (N,), device=device)
    labels[1::4] = IGNORE
    grads = []
    for impl in ("triton", None):
        a = wide.double() if impl is None else wide.clone()
        b = w_t.double() if impl is None else w_t.clone()
        a.requires_grad_()
        b.requires_grad_()
        hidden, weight = a[:, ::2], b.t()
        assert not hidden.is_contiguous() and not weight.is_contiguous()
        loss = mk.masked_token_loss(hidden, weight, labels, reduction="sum", impl=impl) if impl else \
            reference.masked_token_loss(hidden, weight, labels, reduction="sum")
        loss.backward()
        grads.append((loss, a.grad, b.grad))
    for ours, ref in zip(grads[0], grads[1]):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_strided_bias_view(small_chunks, device):
    # bias as every other element of a longer tensor (stride 2): the kernels must not read it as contiguous
    N, H, V = 9, 24, 37
    hidden, weight, _, labels = make_inputs(N, H, V, torch.float32, device)
    wide = rand(2 * V, device=device, scale=0.5)
    results = []
    for dt in (torch.float32, torch.float64):
        b2 = wide.to(dt, copy=True).requires_grad_()
        bias = b2[::2]
        assert not bias.is_contiguous()
        h, w = hidden.to(dt), weight.to(dt)
        loss = mk.masked_token_loss(h, w, labels, bias=bias, reduction="sum", impl="triton") if dt == torch.float32 \
            else reference.masked_token_loss(h, w, labels, bias=bias, reduction="sum")
        loss.backward()
        results.append((loss, b2.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_uint8_labels_count_like_pytorch(impl, kernels, device):
    # PyTorch takes uint8 targets; label 156 must count although -100 wraps to 156 in uint8
    N, H, V = 5, 16, 160
    hidden, weight, _, _ = make_inputs(N, H, V, torch.float32, device, ignored=0.0)
    labels = torch.tensor([156, 3, 156, 159, 0], dtype=torch.uint8, device=device)
    ours = mk.masked_token_loss(hidden, weight, labels, reduction="none", impl=impl)
    ref = F.cross_entropy(hidden.double() @ weight.double().T, labels, reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
def test_gradient_only_for_inputs_that_require_it(trainable, small_chunks, device):
    hidden, weight, bias, labels = make_inputs(8, 24, 37, torch.float32, device, with_bias=True)
    leaf = {"hidden": hidden, "weight": weight, "bias": bias}[trainable].requires_grad_()
    mk.masked_token_loss(hidden, weight, labels, bias=bias, impl="triton").backward()
    h64, w64, b64 = (t.detach().double().requires_grad_(name == trainable)
                     for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)))
    reference.masked_token_loss(h64, w64, labels, bias=b64).backward()
    exact = {"hidden": h64, "weight": w64, "bias": b64}[trainable].grad
    torch.testing.assert_close(leaf.grad.double(), exact, rtol=1e-5, atol=1e-7)
    assert all(t.grad is None for t in (hidden, weight, bias) if t is not leaf)


def test_every_output_element_is_written(small_chunks, device):
    hidden, weight, bias, labels = make_inputs(13, 24, 37, torch.float32, device, with_bias=True)
    h, w, b = _leaves(hidden, weight, bias)
    with _alloc.poisoned():
        loss = mk.masked_token_loss(h, w, labels, bias=b, reduction="none", impl="triton")
        loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss[labels == IGNORE] == 0).all()
    for t in (h, w, b):
        assert torch.isfinite(t.grad).all()
    assert (h.grad[labels == IGNORE] == 0).all()


def test_forward_without_grad_matches(kernels, device):
    hidden, weight, bias, labels = make_inputs(12, 24, 37, torch.float32, device, with_bias=True)
    with torch.no_grad():
        ours = mk.masked_token_loss(hidden, weight, labels, bias=bias, reduction="none", impl="triton")
    ref = reference.masked_token_loss(hidden.double(), weight.double(), labels, bias=bias.double(), reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_works_under_torch_compile(small_chunks, device):
    hidden, weight, _, labels = make_inputs(9, 24, 37, torch.float32, device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    @torch.compile(fullgraph=True)
    def step(x, lm_head, y):
        return mk.masked_token_loss(x, lm_head, y, impl="triton") * 0.5

    step(h, w, labels).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (reference.masked_token_loss(h2, w2, labels) * 0.5).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


# --- bad input: one clear error each ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bad", [37, -1, -7])
def test_label_outside_the_vocabulary_raises(impl, bad, kernels, device):
    hidden, weight, _, labels = make_inputs(6, 16, 37, torch.float32, device)
    labels[3] = bad
    with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary"):
        mk.masked_token_loss(hidden, weight, labels, impl=impl)


def test_custom_ignore_index_is_not_an_error(kernels, device):
    hidden, weight, _, labels = make_inputs(6, 16, 37, torch.float32, device, ignored=0.0)
    labels[2] = -1
    ours = mk.masked_token_loss(hidden, weight, labels, ignore_index=-1, reduction="none", impl="triton")
    assert ours[2] == 0 and (ours[labels != -1] > 0).all()


def test_shape_mismatches_raise():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden has H = 8"):
        mk.masked_token_loss(h, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match="labels has 3 rows"):
        mk.masked_token_loss(h, w, y[:3])
    with pytest.raises(ValueError, match=r"bias must have shape \[10\]"):
        mk.masked_token_loss(h, w, y, bias=torch.randn(9))
    with pytest.raises(ValueError, match="must share their leading shape"):   # hidden [..., H] needs labels [...]
        mk.masked_token_loss(h[None], w, y)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        mk.masked_token_loss(h, w[None], y)


def test_float_labels_raise():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        mk.masked_token_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4))


def test_unknown_reduction_raises():
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.masked_token_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), reduction="avg")


@pytest.mark.parametrize("N,H,V", [(0, 8, 10), (4, 0, 10), (4, 8, 0)])
def test_empty_input_raises(N, H, V):
    with pytest.raises(ValueError, match="empty"):
        mk.masked_token_loss(torch.randn(N, H), torch.randn(V, H), torch.zeros(N, dtype=torch.long))


@pytest.mark.parametrize("name", ["hidden", "weight", "bias"])
def test_non_float_hidden_weight_or_bias_raises(name):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(10, 8), "bias": torch.randn(10)}
    args[name] = args[name].long()
    with pytest.raises(TypeError, match=f"{name} must be float32"):
        mk.masked_token_loss(args["hidden"], args["weight"], torch.zeros(4, dtype=torch.long), bias=args["bias"])


def test_tensors_on_different_devices_raise():
    with pytest.raises(ValueError, match="tensors must be on one device"):
        mk.masked_token_loss(torch.randn(4, 8), torch.randn(10, 8, device="meta"), torch.zeros(4, dtype=torch.long))


def test_mixed_hidden_and_weight_dtypes_are_refused_by_triton_with_the_reason(device):
    with pytest.raises(BackendUnavailable, match="differ in dtype"):
        mk.masked_token_loss(torch.randn(4, 8, device=device), torch.randn(10, 8, device=device).half(),
                             torch.zeros(4, dtype=torch.long, device=device), impl="triton")


# --- GPU (compiled Triton, bf16) --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("engine,reduction,with_bias", [("auto", "mean", True), ("auto", "none", False),
                                                        ("triton", "mean", False), ("triton", "none", True)])
def test_gpu_bf16_matches_float64(engine, reduction, with_bias, kernels):
    # H = 200 is not a multiple of 64; V = 5000 spans two 4096-column splits; chunks of 2048 columns
    with tuning.override(mtl_bwd_gemm=engine):
        check_against_float64("triton", 300, 200, 5000, torch.bfloat16, "cuda", reduction, with_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_fp16_and_fp32_match_float64(dtype, kernels):
    check_against_float64("triton", 257, 192, 4099, dtype, "cuda", "sum", with_bias=True)


@pytest.mark.gpu
def test_gpu_qwen_vocabulary_bf16(kernels):
    # the real head shape (H = 2048, V = 151936) at a few hundred rows, 40% of them counted
    check_against_float64("triton", 384, 2048, 151936, torch.bfloat16, "cuda", "mean", ignored=0.6)


@pytest.mark.gpu
def test_gpu_every_output_element_is_written(kernels):
    hidden, weight, bias, labels = make_inputs(333, 200, 5000, torch.bfloat16, "cuda", with_bias=True)
    h, w, b = _leaves(hidden, weight, bias)
    with _alloc.poisoned():
        loss = mk.masked_token_loss(h, w, labels, bias=b, reduction="none", impl="triton")
        loss.sum().backward()
    assert torch.isfinite(loss).all()
    for t in (h, w, b):
        assert torch.isfinite(t.grad).all()
    assert (h.grad[labels == IGNORE] == 0).all()


@pytest.mark.gpu
def test_gpu_default_dispatch_is_triton():
    from moca_kernels.losses.masked_token_loss import _OP

    hidden, weight, _, labels = make_inputs(8, 16, 40, torch.bfloat16, "cuda")
    chosen = _OP.select(None, hidden=hidden, weight=weight, labels=labels, bias=None, ignore_index=IGNORE,
                        reduction="mean").name
    assert chosen == "triton"
