"""Backend choice for every op: cuda > triton > torch, by what the inputs support.

Each op owns an :class:`Op` holding its backends in order of preference. A backend answers
``reasons(**inputs)`` with a list of readable strings saying why it cannot take these inputs (an empty list
means it can). Dispatch takes the first backend with no reasons. A backend can be forced with the op's
``impl=`` argument or the ``MOCA_KERNELS_IMPL`` environment variable; a forced backend that cannot take the
inputs raises :class:`BackendUnavailable` listing its reasons, never a silent fallback.

``MOCA_KERNELS_IMPL`` holds either one backend name for every op (``triton``) or a comma-separated list of
``op=backend`` pairs (``masked_patch_loss=cuda,info_nce=torch``); ops not named choose automatically.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (the test suite sets it), never silently, and
never on bfloat16 CPU tensors (``interpreted_bf16_reasons``: one rule for every op).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "MOCA_KERNELS_IMPL"


class BackendUnavailable(RuntimeError):
    """Raised when a forced backend cannot take the inputs (or no backend can)."""


@dataclass
class Backend:
    name: str
    reasons: Callable[..., List[str]]
    """reasons(**inputs) -> why this backend cannot take the inputs ([] = it can)."""
    run: Callable
    """run(**inputs) -> the op's result."""


class Op:
    """The backends of one public op, in order of preference."""

    def __init__(self, name: str, backends: Sequence[Backend]):
        self.name = name
        self.backends = list(backends)
        names = [b.name for b in self.backends]
        assert all(n in BACKENDS for n in names) and len(set(names)) == len(names), names

    def not_supported_reasons(self, **inputs) -> Dict[str, List[str]]:
        """For every backend, why it cannot take these inputs ([] = it can)."""
        return {b.name: list(b.reasons(**inputs)) for b in self.backends}

    def select(self, impl: Optional[str] = None, **inputs) -> Backend:
        forced = _forced_backend(self.name, impl)
        if forced is not None:
            match = [b for b in self.backends if b.name == forced]
            if not match:
                have = ", ".join(b.name for b in self.backends)
                raise BackendUnavailable(f"{self.name}: no '{forced}' backend (this op has: {have})")
            why = match[0].reasons(**inputs)
            if why:
                raise BackendUnavailable(f"{self.name}: backend '{forced}' cannot take these inputs: " + "; ".join(why))
            return match[0]
        all_reasons = {}
        for b in self.backends:
            why = b.reasons(**inputs)
            if not why:
                return b
            all_reasons[b.name] = why
        detail = " | ".join(f"{n}: " + "; ".join(w) for n, w in all_reasons.items())
        raise BackendUnavailable(f"{self.name}: no backend can take these inputs ({detail})")

    def __call__(self, impl: Optional[str] = None, **inputs):
        return self.select(impl, **inputs).run(**inputs)


def _forced_backend(op_name: str, impl: Optional[str]) -> Optional[str]:
    if impl is not None:
        if impl not in BACKENDS:
            raise ValueError(f"{op_name}: impl must be one of {BACKENDS} or None, got {impl!r}")
        return impl
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env == "auto":
        return None
    if "=" not in env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {BACKENDS}, 'auto', or 'op=backend,...'")
        return env
    for item in env.split(","):
        if not item.strip():
            continue
        op, _, name = item.partition("=")
        name = name.strip()
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: backend {name!r} for {op.strip()!r} is not one of {BACKENDS}")
        if op.strip() == op_name:
            return name
    return None


# ---------------------------------------------------------------------------------------------------------
# Reasons shared by many backends.
# ---------------------------------------------------------------------------------------------------------


_TRITON_ERROR: List[Optional[str]] = []  # filled on first use; a plain global so torch.compile traces it


def triton_import_error() -> Optional[str]:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_ERROR.append(None)
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_ERROR.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _TRITON_ERROR[0]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def env_variant(var: str, part: str, choices: Sequence[str], defaults: Mapping[str, str], op: str) -> str:
    """The kernel variant that environment variable ``var`` selects for ``part`` (a backend or one kernel of
    ``op``), read at every call so benchmarks can switch variants in one process.

    Unset or empty: ``defaults[part]``. One name applies to every part; per part, ``part=name,part=name`` (a
    part not named keeps its default). Anything else raises ValueError naming ``var``."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return defaults[part]
    if "=" not in raw:
        chosen = raw
    else:
        parts = {}
        for item in raw.split(","):
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or key not in defaults or value not in choices:
                example = ",".join(f"{k}={choices[-1]}" for k in defaults)
                raise ValueError(f"{op}: cannot read {var}={raw!r}: expected one of {list(choices)}, or per part "
                                 f"({', '.join(defaults)}), e.g. {example!r}")
            parts[key] = value
        chosen = parts.get(part, defaults[part])
    if chosen not in choices:
        raise ValueError(f"{op}: unknown kernel variant {chosen!r} in {var}={raw!r}; expected one of {list(choices)}")
    return chosen


def autotune_enabled() -> bool:
    """False under MOCA_KERNELS_AUTOTUNE=0: every kernel takes its first (default) config instead of timing its
    few candidates on the first call per shape. The test suite sets it on GPUs to keep compile time down."""
    return os.environ.get("MOCA_KERNELS_AUTOTUNE", "1").strip() != "0"


def triton_reasons(*tensors: torch.Tensor) -> List[str]:
    """Why Triton cannot run on these tensors: missing package, or CPU tensors without the interpreter."""
    why = []
    err = triton_import_error()
    if err:
        why.append(err)
    devices = {t.device.type for t in tensors if t is not None}
    if devices - {"cuda", "cpu"}:
        why.append(f"triton runs on cuda tensors (got {sorted(devices)})")
    if "cpu" in devices and not triton_interpret():
        why.append("tensors are on the CPU; Triton runs there only under TRITON_INTERPRET=1")
    if "cuda" in devices and triton_interpret():
        why.append("TRITON_INTERPRET=1 is set but tensors are on cuda")
    why += interpreted_bf16_reasons(*tensors)
    return why


def interpreted_bf16_reasons(*tensors: Optional[torch.Tensor]) -> List[str]:
    """One rule for every op: no interpreted Triton kernel runs on bfloat16 tensors. Under TRITON_INTERPRET=1
    the interpreter's bfloat16 ``tl.dot`` is wrong (masked_attention gave values near 8e8 where the torch
    backend gives 3.4), so automatic dispatch takes the torch backend and a forced triton raises."""
    if triton_interpret() and any(t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu"
                                  for t in tensors):
        return ["bfloat16 under TRITON_INTERPRET=1: the interpreter's bfloat16 tl.dot is wrong (use float32 or "
                "float16 there, or the torch backend)"]
    return []


def cuda_ext_reasons(*tensors: torch.Tensor) -> List[str]:
    """Why the CUDA C++ extension cannot run on these tensors."""
    from . import _ext

    why = []
    if not _ext.available():
        why.append(f"moca_kernels._C is not available ({_ext.unavailable_reason()})")
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            why.append(f"the cuda backend needs CUDA tensors, got a {t.device.type} tensor")
            break
    return why


def same_device_reasons(**tensors: Optional[torch.Tensor]) -> List[str]:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        return ["tensors are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devs.items())]
    return []
