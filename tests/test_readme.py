"""The README's kernel-library example runs as written (shapes scaled down, CPU, torch backend), so the
documented calls, argument names and shapes cannot drift from the code."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _kernel_example() -> str:
    text = README.read_text()
    section = text.split("## The kernel library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _scaled(code: str, factor: int = 32) -> str:
    """Every integer literal >= 1000 divided by ``factor`` (4096 + 2048 + 3072 = 9216 stays consistent), on
    the CPU in float32."""
    line = 'dev, dt = "cuda", torch.bfloat16'
    assert line in code, "the example's device line changed: update this test"
    code = code.replace(line, 'dev, dt = "cpu", torch.float32')
    return re.sub(r"\b\d{4,}\b", lambda m: str(int(m.group()) // factor), code)


def test_kernel_library_example_runs(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")   # the interpreted triton kernels would be slow here
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(_scaled(_kernel_example()), str(README) + ":kernel-library example", "exec"), scope)
    out, y = scope["out"], scope["y"]
    assert out.shape == scope["q"].shape and torch.isfinite(out).all()
    assert y.shape == scope["x"].shape and torch.isfinite(y).all()
    for name in ("pred", "hidden", "lm_head", "qe", "de", "t"):
        g = scope[name].grad
        assert g is not None and torch.isfinite(g).all(), name


def test_scaling_keeps_the_example_consistent():
    code = _scaled(_kernel_example())
    assert "from_seqlens([128, 64, 96]" in code and "torch.randn(288, 16, 128" in code
    with pytest.raises(AssertionError):
        _scaled("x = 1")
