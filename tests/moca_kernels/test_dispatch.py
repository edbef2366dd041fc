"""Backend choice: order of preference, forcing by impl= and MOCA_KERNELS_IMPL, reasons on refusal."""

import pytest
import torch

import moca_kernels as mk
from moca_kernels import dispatch
from moca_kernels.dispatch import Backend, BackendUnavailable, Op


def make_op(calls):
    def backend(name, reasons):
        return Backend(name, lambda **kw: list(reasons), lambda **kw: calls.append(name) or name)
    return Op("toy", [backend("cuda", ["no GPU here"]), backend("triton", []), backend("torch", [])])


def test_first_backend_without_reasons_is_chosen():
    calls = []
    assert make_op(calls)(x=1) == "triton"


def test_impl_forces_a_backend():
    assert make_op([])(impl="torch", x=1) == "torch"


def test_forced_backend_that_cannot_run_raises_with_its_reasons():
    with pytest.raises(BackendUnavailable, match="no GPU here"):
        make_op([])(impl="cuda", x=1)


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        make_op([])(impl="cudnn", x=1)


def test_env_var_forces_every_op(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")
    assert make_op([])(x=1) == "torch"


def test_env_var_per_op(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "other_op=cuda, toy=torch")
    assert make_op([])(x=1) == "torch"
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "other_op=cuda")
    assert make_op([])(x=1) == "triton"


def test_bad_env_var_raises(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "fastest")
    with pytest.raises(ValueError, match="MOCA_KERNELS_IMPL"):
        make_op([])(x=1)


def test_impl_argument_wins_over_env_var(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "cuda")
    assert make_op([])(impl="torch", x=1) == "torch"


def test_no_backend_available_lists_every_reason():
    op = Op("toy", [Backend("cuda", lambda **kw: ["a"], None), Backend("torch", lambda **kw: ["b"], None)])
    with pytest.raises(BackendUnavailable, match="cuda: a .* torch: b"):
        op(x=1)


def test_not_supported_reasons_reports_every_backend():
    reasons = make_op([]).not_supported_reasons(x=1)
    assert reasons == {"cuda": ["no GPU here"], "triton": [], "torch": []}


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = dispatch.triton_reasons(torch.zeros(2))
    assert any("TRITON_INTERPRET=1" in w for w in why)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch")
def test_cpu_tensors_default_to_torch_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from moca_kernels.losses.masked_patch_loss import _OP

    p = torch.randn(3, 4)
    assert _OP.select(None, pred=p, target=p, mask=None, norm_pix=False, eps=1e-6).name == "torch"


def test_public_api_is_exactly_the_contract():
    assert sorted(mk.__all__) == sorted(
        ["AttentionMask", "masked_attention", "masked_patch_loss", "masked_token_loss", "info_nce", "GradCache"])
    for name in mk.__all__:
        assert getattr(mk, name) is not None
