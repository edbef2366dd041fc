"""Output allocation for the fast backends, with a poison switch for tests.

Kernels allocate every output through :func:`empty` / :func:`empty_like`. Inside ``poisoned()``, those
buffers come filled with NaN (or a given value), so a test can prove that a kernel writes every element.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

_poison: Optional[float] = None


@contextlib.contextmanager
def poisoned(value: float = float("nan")):
    """Fill every kernel output buffer with ``value`` while the context is active (tests only)."""
    global _poison
    old, _poison = _poison, value
    try:
        yield
    finally:
        _poison = old


def _fill(t: torch.Tensor) -> torch.Tensor:
    if _poison is not None and t.numel():
        t.fill_(_poison if t.is_floating_point() else -1)
    return t


def empty(*shape, dtype, device) -> torch.Tensor:
    return _fill(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return _fill(torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device))
