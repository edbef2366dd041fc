"""Input checks shared by the public ops: one clear error per misuse, raised before any backend runs."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence

import torch

try:
    import numpy as _np

    BOOL_TYPES = (bool, _np.bool_)   # numpy bools are no ints (1.5-style truncation) and no strings
except ImportError:  # numpy is optional for torch
    BOOL_TYPES = (bool,)

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
    """``xs`` (a sequence of ints or a 1-D integer tensor) as a list of Python ints. Anything else (None, a
    single int, a string, floats, bools, a float or bool tensor) raises TypeError / ValueError naming ``name``."""
    if isinstance(xs, torch.Tensor):
        if xs.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(xs.shape)}")
        if xs.is_floating_point() or xs.is_complex() or xs.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must hold integers, got {xs.dtype}")
        return [int(x) for x in xs.tolist()]
    if isinstance(xs, (str, bytes)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{op}: {name} must be a sequence of ints or a 1-D integer tensor, got "
                        f"{type(xs).__name__} {xs!r}"[:300])
    return [check_int_value(name, x, op, what=f"{name} must hold integers") for x in xs]


def check_bool(name: str, value, op: str) -> bool:
    """``value`` if it is a bool (or a numpy bool), else TypeError naming ``name`` (no truthiness of strings)."""
    if isinstance(value, BOOL_TYPES):
        return bool(value)
    raise TypeError(f"{op}: {name} must be True or False, got {type(value).__name__} {value!r}"[:300])


def check_int_value(name: str, value, op: str, what: Optional[str] = None) -> int:
    """``value`` as a Python int when it is an integer (int, numpy integer, 0-d integer tensor), never a bool or
    a float (no silent truncation of 1.5 to 1); TypeError naming ``name`` otherwise."""
    if not isinstance(value, BOOL_TYPES + (float,)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    what = what or f"{name} must be an int"
    raise TypeError(f"{op}: {what}, got {type(value).__name__} {value!r}"[:300])


def check_real(name: str, value, op: str, finite: bool = True) -> float:
    """``value`` as a Python float when it is a real number (int, float, numpy scalar), never a bool, a string or
    None; TypeError (wrong type) or, with ``finite``, ValueError (inf / nan) naming ``name`` otherwise."""
    if isinstance(value, BOOL_TYPES) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}"[:300])
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf
    if finite and not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    return v
