"""Loads the optional CUDA C++ extension ``moca_kernels._C`` and says why when it cannot.

The extension is torch-free: its launchers take raw device pointers (``tensor.data_ptr()``), sizes, strides
and a CUDA stream handle (:func:`stream_handle`), with the dtype as a code (:func:`dtype_code`). Tensor checks
happen in Python before any pointer crosses over; a launcher returns a cudaError_t as an int, which
:func:`check_launch` turns into an exception.
"""

from __future__ import annotations

from typing import Optional

import torch

_module = None
_error: Optional[str] = None


_tried = False


def _load():
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    try:
        from . import _C  # type: ignore[attr-defined]

        _module = _C
    except ImportError as exc:
        _error = (
            f"{exc}; it is built at install time when nvcc is found "
            "(see setup.py: MOCA_KERNELS_SKIP_CUDA_BUILD, MOCA_KERNELS_CUDA_ARCHS)"
        )
    return _module


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _error


def module():
    """The extension module; raises ImportError with the reason when it is not built."""
    mod = _load()
    if mod is None:
        raise ImportError(f"moca_kernels._C is not available: {_error}")
    return mod


# dtype codes shared with csrc/common.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the cuda backend takes float32, float16 or bfloat16, got {t.dtype}") from None


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current torch stream on ``device``, as an int."""
    return torch.cuda.current_stream(device).cuda_stream


def check_launch(name: str, status: int) -> None:
    """Raise if a launcher reported a CUDA error (it returns cudaGetLastError() as an int)."""
    if status != 0:
        msg = module().error_string(status)
        raise RuntimeError(f"moca_kernels._C.{name} failed: CUDA error {status} ({msg})")
