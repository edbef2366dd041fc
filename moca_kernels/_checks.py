"""Input checks shared by the public ops: one clear error per misuse, raised before any backend runs."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: torch.Tensor, op: str) -> None:
    check_tensor(name, t, op)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 (float64 on the torch backend), got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, op: str, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items()))


def check_same_dtype(op: str, **tensors: Optional[torch.Tensor]) -> None:
    dts = {n: t.dtype for n, t in tensors.items() if t is not None}
    if len(set(dts.values())) > 1:
        raise TypeError(f"{op}: tensors must share one dtype, got " + ", ".join(f"{n} {d}" for n, d in dts.items()))


def check_nonempty(op: str, **tensors: torch.Tensor) -> None:
    for n, t in tensors.items():
        if t.numel() == 0:
            raise ValueError(f"{op}: {n} is empty (shape {tuple(t.shape)})")


def check_int(name: str, t: torch.Tensor, op: str) -> None:
    check_tensor(name, t, op)
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (oracle runs), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def as_int_list(xs: Sequence[int] | torch.Tensor, name: str, op: str) -> list:
    if isinstance(xs, torch.Tensor):
        if xs.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(xs.shape)}")
        if xs.is_floating_point():
            raise TypeError(f"{op}: {name} must hold integers, got {xs.dtype}")
        return [int(x) for x in xs.tolist()]
    out = []
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, (int,)) and not (hasattr(x, "__index__")):
            raise TypeError(f"{op}: {name} must hold integers, got {x!r}")
        out.append(int(x))
    return out
