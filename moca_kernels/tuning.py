"""Tuning of the kernel library: its settings, its one tuner and cache, its one override.

Settings. Every knob the kernels read is a :class:`Setting` in ``SETTINGS``: a name, the environment variable
that sets it (or none: settable only through :func:`override`), a default and a parser. :func:`get` answers, in
order, the innermost :func:`override` that names the setting, the environment variable (read at each call, so
a process can change it between calls; a value that does not parse raises ValueError naming the variable), the
default. This module is the only place in ``moca_kernels`` that reads the environment, apart from
``dispatch.py``'s ``MOCA_KERNELS_IMPL`` (the backend and variant choice). ``TRITON_INTERPRET`` is Triton's own
variable; the library reads it (:func:`interpret`) to decide where Triton may run and to shrink its tiles.

Tuner. :func:`pick` times a kernel's candidate configurations once per key (never keyed by a sequence length)
with ``triton.testing.do_bench`` and caches the fastest in ``CACHE``; with one candidate, under the interpreter
or with autotuning off (``MOCA_KERNELS_AUTOTUNE=0``) it takes the first (default) candidate without timing.
Kernels tuned by ``@triton.autotune`` keep Triton's cache; their pruning functions take their on/off switch
from :func:`autotune_enabled`, and they register a cache-clearing function with :func:`on_clear`, so
:func:`clear` forgets every tuned choice.

Time budget. :func:`pick` gives each candidate ``warmup`` = 3 ms then ``rep`` = 15 ms of timed launches
(masked_patch_loss: 5 and 20) and compares their means: ~20-25 ms of GPU time per candidate plus its compile, once
per key and process (masked_attention's backward: up to 3 candidates per kernel, ``attention_tune`` fewer). For a
~1 ms kernel that is a mean over ~15 launches: candidates within ~3% of each other may be picked either way, which
costs at most that much. The tuner picks configurations, never a default variant: those decisions time whole ops
with bench/harness.py's timer (CUDA graphs below 2 ms) by bench/NOTES.md's decision table. ``@triton.autotune``
kernels use Triton's own budget (``do_bench`` with 25 ms warm-up and 100 ms timed per config).

Override. ``with tuning.override(autotune=False, mtl_vocab_chunk=16): ...`` sets settings for the calls inside
it (tests, benchmarks); overrides nest, the innermost wins. Setting ``None`` in an override hides the
environment variable and restores the default.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence


def _flag(raw: str) -> bool:
    if raw in ("0", "1"):
        return raw == "1"
    raise ValueError("expected 0 or 1")


def _count(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError("expected a whole number >= 0")
    return int(raw)


def _positive(raw: str) -> int:
    value = _count(raw)
    if value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


def _choice(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in values:
            raise ValueError(f"expected one of {list(values)}")
        return raw
    return parse


def _tile_pair(raw: str):
    parts = raw.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError("expected 'q_tile,k_tile', two positive whole numbers")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Setting:
    name: str
    env: Optional[str]
    default: Any
    parse: Optional[Callable[[str], Any]]
    doc: str


SETTINGS: Dict[str, Setting] = {s.name: s for s in [
    Setting("autotune", "MOCA_KERNELS_AUTOTUNE", True, _flag,
            "0: every kernel takes its first (default) configuration instead of timing its candidates on the "
            "first GPU call per shape (the test suite sets it on GPUs)"),
    Setting("attention_tune", "MOCA_ATTENTION_TUNE", None, _count,
            "masked_attention: time only the first N candidates per kernel (0 or 1: no timing, and the dQ "
            "strategy is 'atomic')"),
    Setting("attention_dq", "MOCA_ATTENTION_DQ", None, _choice("atomic", "separate"),
            "masked_attention's non-deterministic backward: 'atomic' or 'separate' dQ instead of the faster of "
            "the two timed on the first call"),
    Setting("attention_tiles", "MOCA_ATTENTION_TILES", None, _tile_pair,
            "masked_attention on a GPU, 16-bit inputs: owner tiles 'q_tile,k_tile' instead of 128,128 (sweeps)"),
    Setting("attention_extra", "MOCA_ATTENTION_EXTRA", False, _flag,
            "1: masked_attention's base kernels time a wider set of candidates (sweeps)"),
    Setting("attention_min_dkdv_programs", "MOCA_ATTENTION_MIN_DKDV_PROGRAMS", 3, _positive,
            "masked_attention backward: below this many dK/dV programs per SM a GQA group is split over programs"),
    Setting("mtl_bwd_gemm", "MOCA_MTL_BWD_GEMM", "auto", _choice("auto", "triton"),
            "masked_token_loss backward GEMMs: 'auto' (cuBLAS where it accumulates in float32, else Triton) or "
            "'triton'"),
    # Settable only through override() (tests and benchmarks):
    Setting("attention_test_tiles", None, None, None,
            "masked_attention: dict(q_tile, k_tile, fwd_n, dkdv_m, dq_n[, split]): owner tiles, walked tiles "
            "and GQA split forced (interpreter tests)"),
    Setting("mtl_vocab_chunk", None, None, None,
            "masked_token_loss backward: G chunk width in columns (tests: several chunks at a tiny V)"),
    Setting("mtl_g_chunk_bytes", None, 48 * 2**20, None,
            "masked_token_loss backward: the G chunk budget in bytes (benchmark sweeps)"),
    Setting("mtl_desc_config", None, None, None,
            "masked_token_loss descriptor kernels (v2, v3): run only this index of the variant's candidates"),
]}

_OVERRIDES: List[Dict[str, Any]] = []


def interpret() -> bool:
    """Whether Triton runs interpreted (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get(name: str) -> Any:
    """The current value of setting ``name`` (override, else environment variable, else default)."""
    setting = SETTINGS[name]
    for layer in reversed(_OVERRIDES):
        if name in layer:
            return setting.default if layer[name] is None else layer[name]
    if setting.env is not None:
        raw = os.environ.get(setting.env, "").strip()
        if raw:
            try:
                return setting.parse(raw)
            except ValueError as exc:
                raise ValueError(f"cannot read {setting.env}={raw!r}: {exc} ({setting.doc})") from None
    return setting.default


def autotune_enabled() -> bool:
    """False under ``MOCA_KERNELS_AUTOTUNE=0`` or ``override(autotune=False)``: first configurations only."""
    return bool(get("autotune"))


@contextlib.contextmanager
def override(**settings: Any) -> Iterator[None]:
    """Set settings (by name, see ``SETTINGS``) for the calls inside the ``with`` block. Tuned choices made
    inside are cached as usual: call :func:`clear` when the override changes which candidates exist."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"tuning.override: unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
    _OVERRIDES.append(dict(settings))
    try:
        yield
    finally:
        _OVERRIDES.pop()


def limit(candidates: Sequence, keep: Optional[int] = None) -> list:
    """The candidates a tuner may time: the first only with autotuning off, the first ``keep`` (at least one)
    when ``keep`` is given, else all."""
    cands = list(candidates)
    if not autotune_enabled():
        return cands[:1]
    return cands[:max(1, keep)] if keep is not None else cands


# ---------------------------------------------------------------------------------------------------------
# The tuner and its cache
# ---------------------------------------------------------------------------------------------------------

CACHE: Dict[tuple, Any] = {}
_CLEAR_HOOKS: List[Callable[[], None]] = []


def on_clear(fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn`` to run on :func:`clear` (e.g. an ``@triton.autotune`` kernel's ``cache.clear``)."""
    _CLEAR_HOOKS.append(fn)
    return fn


def clear() -> None:
    """Forget every tuned choice: ``CACHE`` and the caches registered with :func:`on_clear`."""
    CACHE.clear()
    for fn in _CLEAR_HOOKS:
        fn()


def pick(key: tuple, candidates: Sequence, launch: Callable[[Any], Any],
         before_each: Optional[Callable[[], None]] = None, warmup: int = 3, rep: int = 15) -> Any:
    """The fastest of ``candidates`` for ``key``, timed once by launching each (``launch(candidate)``) with
    ``triton.testing.do_bench`` and cached in ``CACHE[key]``. ``before_each`` runs before every timed launch
    (e.g. to zero an accumulator). One candidate, the interpreter or autotuning off: the first, untimed. A
    candidate that fails to compile or launch (too much shared memory on this GPU) is skipped; if all fail,
    the first one's error is raised."""
    if key in CACHE:
        return CACHE[key]
    if len(candidates) == 1 or interpret() or not autotune_enabled():
        CACHE[key] = candidates[0]
        return CACHE[key]
    from triton.testing import do_bench

    best, best_ms, errors = None, float("inf"), []
    for cfg in candidates:
        def run(cfg=cfg):
            if before_each is not None:
                before_each()
            launch(cfg)
        try:
            ms = do_bench(run, warmup=warmup, rep=rep)
        except Exception as exc:  # out of resources on this GPU, or a config this triton cannot compile
            errors.append(exc)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise errors[0]
    CACHE[key] = best
    return best


def cached(kind: str) -> Dict[tuple, Any]:
    """The tuned choices whose key starts with ``kind`` (benchmarks report them)."""
    return {k: v for k, v in CACHE.items() if k and k[0] == kind}
