"""Backend choice for every op: cuda > triton > torch, by what the inputs support.

Each op owns an :class:`Op` holding its backends in order of preference. A backend answers
``reasons(**inputs)`` with a list of readable strings saying why it cannot take these inputs (an empty list
means it can). Dispatch takes the first backend with no reasons. A backend can be forced with the op's
``impl=`` argument or the ``MOCA_KERNELS_IMPL`` environment variable; a forced backend that cannot take the
inputs raises :class:`BackendUnavailable` listing its reasons, never a silent fallback.

Kernel variants. A backend may come in variants (other kernels for the same job, prepared but not yet the
measured default): each variant is a backend of its own, with its own reasons, spelled ``backend:variant``.
An op whose backend has several kernels (masked_attention: a forward and a backward kernel) names a variant
per kernel ("part"), joined by ``+``: ``triton:ws+fused`` is the forward ``ws`` with the backward ``fused``.
A bare variant name applies to every part that has a variant of that name (masked_token_loss ``triton:v3``:
both its kernels); ``part.name`` names one part (``triton:fwd.v3+grad.v2``); parts not named keep their
default. ``triton`` alone is every part's default, the only one that automatic dispatch takes.

``MOCA_KERNELS_IMPL`` holds either one backend name for every op (``triton``, no variant) or a comma-separated
list of ``op=backend[:variant]`` pairs (``masked_patch_loss=cuda:v2p,masked_attention=triton:ws+fused``); ops
not named choose automatically.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (the test suite sets it), never silently, and
never on bfloat16 CPU tensors (``interpreted_bf16_reasons``: one rule for every op).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from . import tuning

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "MOCA_KERNELS_IMPL"

# Kernel-variant variables of earlier versions: set, they raise (a silently ignored choice would mislead a
# benchmark). What to write instead:
REMOVED_ENV_VARS = {
    "MOCA_MPL_KERNEL": "MOCA_KERNELS_IMPL=masked_patch_loss=cuda:v2p (or triton:v2)",
    "MOCA_MTL_KERNEL": "MOCA_KERNELS_IMPL=masked_token_loss=triton:v3 (per kernel: triton:fwd.v3+grad.v2)",
    "MOCA_ATTENTION_FWD": "MOCA_KERNELS_IMPL=masked_attention=triton:ws",
    "MOCA_ATTENTION_BWD": "MOCA_KERNELS_IMPL=masked_attention=triton:fused (with a forward variant: triton:ws+fused)",
}


class BackendUnavailable(RuntimeError):
    """Raised when a forced backend cannot take the inputs (or no backend can)."""


@dataclass
class Backend:
    name: str
    reasons: Callable[..., List[str]]
    """reasons(**inputs) -> why this backend cannot take the inputs ([] = it can)."""
    run: Callable
    """run(**inputs) -> the op's result."""
    variant: Mapping[str, str] = field(default_factory=dict)
    """part -> kernel variant this backend runs (empty: no variants)."""
    auto: bool = True
    """Whether automatic dispatch may take it (False for variants other than the defaults)."""
    spelling: str = ""
    """The canonical ``backend[:variant]`` string (set by the Op)."""


def variant_backends(name: str, parts: Mapping[str, Mapping[str, Optional[Callable[..., List[str]]]]],
                     defaults: Mapping[str, str], reasons: Callable[..., List[str]],
                     make_run: Callable[[Dict[str, str]], Callable]) -> List[Backend]:
    """One backend per combination of the parts' variants.

    Args:
        name: the backend ("triton", "cuda").
        parts: part -> {variant name: its own reasons(**inputs) or None}, the default first or not.
        defaults: part -> the default variant (the measured one); that combination is the only automatic one.
        reasons: reasons(**inputs) shared by every variant (the plain backend's).
        make_run: variant dict -> run(**inputs).
    """
    out = []
    names = list(parts)
    for combo in itertools.product(*(list(parts[p]) for p in names)):
        variant = dict(zip(names, combo))
        own = [parts[p][v] for p, v in variant.items() if parts[p][v] is not None]

        def why(_own=own, **inputs):
            w = list(reasons(**inputs))
            for fn in _own:
                w += fn(**inputs)
            return w

        out.append(Backend(name, why, make_run(variant), variant=variant, auto=variant == dict(defaults)))
    return out


class Op:
    """The backends of one public op, in order of preference.

    ``global_env``: whether a single backend name in MOCA_KERNELS_IMPL (``triton``) applies to this op even
    when it has no such backend (then raising); False for internal ops (mask metadata), which follow it only
    when they have that backend."""

    def __init__(self, name: str, backends: Sequence[Backend], global_env: bool = True):
        self.name = name
        self.backends = list(backends)
        self.global_env = global_env
        self.parts: Dict[str, Dict[str, List[str]]] = {}   # backend -> part -> variant names
        self.defaults: Dict[str, Dict[str, str]] = {}
        for b in self.backends:
            assert b.name in BACKENDS, b.name
            for part, value in b.variant.items():
                names = self.parts.setdefault(b.name, {}).setdefault(part, [])
                if value not in names:
                    names.append(value)
            if b.auto and b.variant:
                self.defaults[b.name] = dict(b.variant)
        for b in self.backends:
            b.spelling = self._spell(b)
        spellings = [b.spelling for b in self.backends]
        assert len(set(spellings)) == len(spellings), spellings

    def _spell(self, b: Backend) -> str:
        default = self.defaults.get(b.name, {})
        changed = {p: v for p, v in b.variant.items() if v != default.get(p)}
        tokens = []
        for value in dict.fromkeys(changed.values()):
            offering = {p for p, names in self.parts[b.name].items() if value in names}
            chosen = {p for p, v in changed.items() if v == value}
            tokens += [value] if chosen == offering else [f"{p}.{value}" for p in changed if changed[p] == value]
        return b.name + (":" + "+".join(tokens) if tokens else "")

    def spellings(self) -> List[str]:
        """Every backend and variant this op has, as impl= takes them."""
        return [b.spelling for b in self.backends]

    def not_supported_reasons(self, **inputs) -> Dict[str, List[str]]:
        """For every backend and variant, why it cannot take these inputs ([] = it can)."""
        return {b.spelling: list(b.reasons(**inputs)) for b in self.backends}

    def resolve(self, spec: str) -> Backend:
        """The backend that ``spec`` (``backend[:variant]``, see the module docstring) names; ValueError for a
        malformed spec or an unknown variant, BackendUnavailable when this op has no such backend."""
        name, sep, rest = spec.strip().partition(":")
        name = name.strip()
        if name not in BACKENDS:
            raise ValueError(f"{self.name}: impl must be one of {BACKENDS}, optionally with ':variant', or None; "
                             f"got {spec!r}")
        mine = [b for b in self.backends if b.name == name]
        if not mine:
            raise BackendUnavailable(f"{self.name}: no '{name}' backend (this op has: {', '.join(self.spellings())})")
        parts = self.parts.get(name, {})
        if not sep:
            if not parts:
                return mine[0]
            want = dict(self.defaults[name])
        else:
            if not parts:
                raise ValueError(f"{self.name}: backend '{name}' has no kernel variants, got {spec!r}")
            want, named = dict(self.defaults[name]), {}
            for token in rest.split("+"):
                token = token.strip()
                part, dot, value = token.rpartition(".")
                targets = [part] if dot else [p for p, names in parts.items() if token in names]
                value = value if dot else token
                if dot and (part not in parts or value not in parts[part]):
                    targets = []
                if not targets:
                    choices = "; ".join(f"{p}: {', '.join(n)}" for p, n in parts.items())
                    raise ValueError(f"{self.name}: unknown kernel variant {token!r} in {spec!r} for backend "
                                     f"'{name}' (variants per part: {choices})")
                for p in targets:
                    if named.get(p, value) != value:
                        raise ValueError(f"{self.name}: {spec!r} names two variants for the {p} kernel")
                    named[p] = want[p] = value
        for b in mine:
            if dict(b.variant) == want:
                return b
        raise BackendUnavailable(f"{self.name}: no backend {spec!r} (this op has: {', '.join(self.spellings())})")

    def select(self, impl: Optional[str] = None, **inputs) -> Backend:
        forced = _forced_spec(self, impl)
        if forced is not None:
            backend = self.resolve(forced)
            why = backend.reasons(**inputs)
            if why:
                raise BackendUnavailable(f"{self.name}: backend '{backend.spelling}' cannot take these inputs: "
                                         + "; ".join(why))
            return backend
        all_reasons = {}
        for b in self.backends:
            if not b.auto:
                continue
            why = b.reasons(**inputs)
            if not why:
                return b
            all_reasons[b.spelling] = why
        detail = " | ".join(f"{n}: " + "; ".join(w) for n, w in all_reasons.items())
        raise BackendUnavailable(f"{self.name}: no backend can take these inputs ({detail})")

    def __call__(self, impl: Optional[str] = None, **inputs):
        return self.select(impl, **inputs).run(**inputs)


def _forced_spec(op: Op, impl: Optional[str]) -> Optional[str]:
    for var, instead in REMOVED_ENV_VARS.items():
        if os.environ.get(var, "").strip():
            raise ValueError(f"{var} was removed: kernel variants are backends now; use {instead} or impl=")
    if impl is not None:
        if not isinstance(impl, str):
            raise ValueError(f"{op.name}: impl must be a string such as 'triton' or 'triton:v2', or None; "
                             f"got {impl!r}")
        return impl
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env == "auto":
        return None
    if "=" not in env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {BACKENDS}, 'auto', or 'op=backend[:variant],...' "
                             "(a variant only per op)")
        if not op.global_env and all(b.name != env for b in op.backends):
            return None
        return env
    for item in env.split(","):
        if not item.strip():
            continue
        name, sep, spec = item.partition("=")
        backend = spec.split(":")[0].strip()
        if not sep or backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: cannot read {item.strip()!r}: expected op=backend[:variant] with a "
                             f"backend in {BACKENDS}")
        if name.strip() == op.name:
            return spec.strip()
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
    return tuning.interpret()


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
