"""Tolerance helpers: compare against a float64 reference, with tolerances set by PyTorch's own error.

A kernel's result passes when its max abs error against float64 is at most ``factor`` times the max abs
error of PyTorch computing the same thing in the same low precision, plus a small floor for rounding noise
(FlashAttention's rule). NaN or inf never passes.
"""

import torch

# Rounding floors relative to the reference's scale: a few units of the dtype's roundoff.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_like_torch(ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype=None,
                            factor: float = 2.0, what: str = "output") -> None:
    """ours, torch_lowp: results in low precision; ref64: float64 reference of the same quantity."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values in the result"
    dtype = dtype or ours.dtype
    scale = max(ref64.double().abs().max().item(), 1e-30)
    err = max_abs_err(ours, ref64)
    base = max_abs_err(torch_lowp, ref64)
    bound = factor * base + FLOOR[dtype] * scale
    assert err <= bound, f"{what}: max abs error {err:.3e} > {factor} x torch's {base:.3e} + floor ({bound:.3e})"


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh random normal data (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)
