"""masked_token_loss in the linear cross-entropy conventions of Cut Cross-Entropy (hidden [..., H], labels
[...], ``shift``), torch (``F.linear_cross_entropy``) and Liger (a loss module swapped into a model):
against float64 torch, against cut-cross-entropy's torch path and Liger's module where they run on CPU."""

import pytest
import torch
import torch.nn.functional as F

import moca_kernels as mk
from moca_kernels.losses import MaskedTokenLoss
from tests.helpers import readme_snippet

V, H = 37, 12


def reference(hidden, weight, labels, shift=0, reduction="mean", bias=None):
    """float64: hidden[..., t] predicts labels[..., t + shift] (CCE's documented shift), rows flattened."""
    h, w = hidden.double(), weight.double()
    if shift:
        h, labels = h[..., :-shift, :], labels[..., shift:]
    logits = h.reshape(-1, h.shape[-1]) @ w.T + (0 if bias is None else bias.double())
    loss = F.cross_entropy(logits, labels.reshape(-1).long(), reduction=reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def data(shape, dtype=torch.float64, ignored=0.25):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(*shape, H, dtype=dtype, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(V, H, dtype=dtype, generator=g)).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignored] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("shape,shift,reduction", [
    ((9,), False, "none"), ((9,), True, "mean"), ((9,), 2, "sum"),
    ((2, 9), False, "mean"), ((2, 9), True, "none"), ((2, 9), 2, "mean"),
    ((2, 3, 7), False, "sum"), ((2, 3, 7), True, "sum"), ((2, 3, 7), 2, "none"),
])
def test_leading_dims_and_shift_match_float64(shape, shift, reduction):
    hidden, weight, labels = data(shape)
    loss = mk.masked_token_loss(hidden, weight, labels, reduction=reduction, shift=shift, impl="torch")
    ref = reference(hidden, weight, labels, int(shift), reduction)
    assert loss.shape == ref.shape
    if reduction == "none":
        assert loss.shape == shape[:-1] + (shape[-1] - int(shift),)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    go = torch.rand_like(loss)
    for g, r in zip(torch.autograd.grad(loss, (hidden, weight), go), torch.autograd.grad(ref, (hidden, weight), go)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_triton_float32_interpreted_with_shift(device):
    """Triton kernels: interpreted on a CPU-only machine, compiled on a GPU (the ``device`` fixture)."""
    hidden, weight, labels = (t.detach().to(device) for t in data((2, 10), dtype=torch.float32))
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = mk.masked_token_loss(hidden, weight, labels, shift=True, impl="triton")
    ref = reference(hidden, weight, labels, 1)
    assert abs(loss.item() - ref.item()) < 1e-5
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert (gh.double() - rh).abs().max().item() < 1e-5 and (gw.double() - rw).abs().max().item() < 1e-5


@pytest.fixture
def cce_torch_path(monkeypatch):
    """cut-cross-entropy's linear_cross_entropy with impl="torch_compile" (its CPU-capable path; the Triton
    "cce" path fails under the Triton interpreter), its inner torch.compile'd function run eagerly: the
    same code without minutes of CPU compilation."""
    try:
        import cut_cross_entropy.torch_compile as tc
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        pytest.skip(f"cut_cross_entropy does not import: {type(exc).__name__}: {exc}")
    apply = tc.torch_compile_linear_cross_entropy_apply
    monkeypatch.setattr(tc, "torch_compile_linear_cross_entropy_apply",
                        getattr(apply, "_torchdynamo_orig_callable", None) or getattr(apply, "__wrapped__", apply))
    return lambda *a, **kw: linear_cross_entropy(*a, impl="torch_compile", **kw)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cut_cross_entropy(cce_torch_path, shift, reduction):
    hidden, weight, labels = data((3, 11), dtype=torch.float32)
    ours = mk.masked_token_loss(hidden, weight, labels, reduction=reduction, shift=shift, impl="torch")
    theirs = cce_torch_path(hidden, weight, labels, reduction=reduction, shift=shift)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    go = torch.rand_like(ours)
    grads = torch.autograd.grad(ours, (hidden, weight), go)
    for g, r in zip(grads, torch.autograd.grad(theirs, (hidden, weight), go)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_matches_torch_linear_cross_entropy():
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    hidden, weight, labels = data((14,))
    bias = torch.randn(V, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        ours = mk.masked_token_loss(hidden, weight, labels, bias=bias, reduction=reduction, impl="torch")
        theirs = F.linear_cross_entropy(hidden, weight, labels, linear_bias=bias, reduction=reduction)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_module_form_matches_liger_module():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        pytest.skip(f"liger_kernel does not import: {type(exc).__name__}: {exc}")
    hidden, weight, labels = data((2, 8), dtype=torch.float32)
    lm_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(weight)
    ours = MaskedTokenLoss(shift=True)(hidden, lm_head, labels)
    # Liger's module: weight first, no shift (the caller shifts and flattens)
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    try:
        theirs = LigerFusedLinearCrossEntropyLoss()(w2, h2[:, :-1].reshape(-1, H), labels[:, 1:].reshape(-1))
    except Exception as exc:
        pytest.skip(f"Liger's fused linear cross-entropy does not run here: {type(exc).__name__}: {str(exc)[:200]}")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lm_head.weight.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_module_takes_a_linear_or_a_weight():
    hidden, weight, labels = data((2, 6))
    lin = torch.nn.Linear(H, V, dtype=torch.float64)
    loss_fn = MaskedTokenLoss(reduction="sum", shift=1, impl="torch")
    a = loss_fn(hidden, lin, labels)
    b = loss_fn(hidden, lin.weight, labels, bias=lin.bias)
    torch.testing.assert_close(a, reference(hidden, lin.weight, labels, 1, "sum", lin.bias), rtol=0, atol=1e-12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "shift=1" in repr(loss_fn)
    with pytest.raises(ValueError, match="bias= was given too"):
        loss_fn(hidden, lin, labels, bias=lin.bias)
    with pytest.raises(TypeError, match="lm_head must be an nn.Linear or a weight tensor"):
        loss_fn(hidden, "lm_head", labels)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(shift=-1), ValueError, "shift"),
    (dict(shift=1.5), ValueError, "shift"),
    (dict(ignore_index=None), TypeError, "ignore_index"),
])
def test_module_checks_options_at_construction(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MaskedTokenLoss(**kwargs)


def test_refusals_name_the_culprit():
    hidden, weight, labels = data((2, 5))
    with pytest.raises(ValueError, match="shift must be >= 0"):
        mk.masked_token_loss(hidden, weight, labels, shift=-1)
    with pytest.raises(TypeError, match="shift must be a bool or an int"):
        mk.masked_token_loss(hidden, weight, labels, shift="next")
    with pytest.raises(ValueError, match="must share their leading shape"):
        mk.masked_token_loss(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match=r"needs labels \[..., S\] with S > 5"):
        mk.masked_token_loss(hidden, weight, labels, shift=5)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        mk.masked_token_loss(hidden, weight, labels.float(), shift=True)


def test_readme_linear_cross_entropy_snippet(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")
    scope: dict = {}
    code = readme_snippet("### Linear cross-entropy (Cut Cross-Entropy / Liger style)")
    exec(compile(code, "README:linear cross-entropy", "exec"), scope)
    hidden, lm_head, labels = scope["hidden"], scope["lm_head"], scope["labels"]
    ref = reference(hidden, lm_head.weight, labels, 1)
    torch.testing.assert_close(scope["loss"].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scope["module_loss"].double(), ref, rtol=1e-5, atol=1e-6)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
