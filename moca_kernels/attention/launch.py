"""Launchers of masked_attention's Triton kernels: forward and backward, per kernel variant.

The variant is the backend's (``op.py`` makes each a backend of the op: ``impl="triton:ws+fused"``), passed
here as a string; this module never reads the environment. Configurations come from ``tiles.py`` and are tuned
by ``tuning.pick``.

Forward variants (part "fwd"; the default stays "base" until an H100 run says otherwise):
  base  ``_fwd_kernel``: three loops (partial tiles masked, full tiles unmasked, partial tiles), pointer loads
        (cp.async), 8 warps;
  ws    ``_fwd_ws_kernel`` with WS: one loop over every non-empty key tile, all loads through tensor descriptors
        (TMA), warp-specialized by Triton (a producer warp group, two consumer warp groups: 12 warps);
  tma   the same kernel without warp specialization (separates the gain of WS from that of TMA / one loop).
  ws and tma need what tensor descriptors need (:func:`descriptor_reasons`).

Backward variants (part "bwd"; default "base"):
  base   two launches (dK/dV, then dQ by atomics or by its own kernel), loads masked at T;
  even   base, plus unmasked loads in the walked loops when T is a multiple of the walked tile (EVEN_T), and
         the dK/dV kernel's 64-row walk first among its candidates (it spills without EVEN_T);
  fused  even, with dK/dV and dQ programs in one launch (``_bwd_fused_kernel``; no atomics, deterministic).

dQ of base / even: either float32 atomics from the dK/dV kernel or a separate kernel per query tile (no
atomics, bitwise reproducible: the deterministic mode); the non-deterministic default takes whichever was
faster on the first call (``MOCA_ATTENTION_DQ`` forces one).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from .. import _alloc, tuning
from .kernels_bwd import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_fused_kernel
from .kernels_fwd import _fwd_kernel, _fwd_ws_kernel
from .metadata import n_tiles
from .tiles import (LOG2E, OP, block_d, candidates, dot_prec, fused_candidates, fwd_desc_candidates, group_split,
                    needs_int64, unit_last)

FWD_VARIANTS = ("base", "ws", "tma")
BWD_VARIANTS = ("base", "even", "fused")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, tables: torch.Tensor,
            scale: float, q_tile: int, variant: str = "base") -> Tuple[torch.Tensor, torch.Tensor]:
    """out [T, Hq, D] (q's dtype), lse [Hq, T] float32. tables: the mask's flat tables for (q_tile, *).
    variant: "base", "ws" or "tma" (the caller checked :func:`descriptor_reasons` for the last two)."""
    if variant not in FWD_VARIANTS:
        raise ValueError(f"masked_attention: unknown forward variant {variant!r}; expected one of {FWD_VARIANTS}")
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = _alloc.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(Hq, T, dtype=torch.float32, device=q.device)
    bd = block_d(D)
    grid = (Hq, n_tiles(T, q_tile))

    def launch(cfg):
        walk, warps, stages = cfg
        _fwd_kernel[grid](
            q, k, v, out, lse, spans, tables, T, group, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=bd, EVEN_D=D == bd, BLOCK_M=q_tile, BLOCK_N=walk, DOT_PREC=dot_prec(q.dtype, q.device),
            OFFS64=needs_int64(q, k, v, out),
            num_warps=warps, num_stages=stages)

    if variant != "base":
        why = descriptor_reasons(q, k, v, spans)
        if why:   # the op's reasons said otherwise: never run another kernel than the one asked for
            raise RuntimeError(f"masked_attention: forward variant {variant!r} cannot run: " + "; ".join(why))
        _forward_desc(q, k, v, out, lse, spans, tables, scale, q_tile, variant)
        return out, lse
    key = (OP, "fwd", D, q.dtype, group, q_tile, q.device)
    launch(tuning.pick(key, candidates("fwd", q.dtype, bd, q.device), launch))
    return out, lse

def descriptor_reasons(q, k, v, spans) -> List[str]:
    """Why the descriptor forward kernel (variants "ws", "tma") cannot read these: nothing when interpreted;
    on a GPU it takes 16-bit inputs (the float32 path keeps the base kernel's small tiles) whose base addresses
    are 16-byte aligned and whose row and head strides are multiples of 16 bytes (TMA's rules; a last-dim
    stride other than 1 is copied first, and the copy is aligned)."""
    if q.device.type != "cuda":
        return []
    if q.dtype not in (torch.float16, torch.bfloat16):
        return [f"the descriptor forward kernel takes float16 / bfloat16 on a GPU, got {q.dtype}"]
    why = []
    size = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            continue
        if t.data_ptr() % 16:
            why.append(f"{name}'s base address is not 16-byte aligned (TMA)")
        if (t.stride(0) * size) % 16 or (t.stride(1) * size) % 16:
            why.append(f"{name}'s strides {tuple(t.stride())} are not multiples of 16 bytes (TMA)")
    if spans.data_ptr() % 16 or not spans.is_contiguous():
        why.append("the mask's spans are not a contiguous 16-byte aligned tensor (TMA)")
    return why


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors live in a global scratch buffer that Triton asks an allocator for; give
    it torch's (caching) allocator unless the caller set one. The setting is per thread (a ContextVar)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_scratch)


def _forward_desc(q, k, v, out, lse, spans, tables, scale, q_tile, variant):
    """Forward variants "ws" / "tma" (_fwd_ws_kernel) into out and lse."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    bd = block_d(D)
    if q.device.type == "cuda":
        _ensure_allocator()

    spans = spans.view(2, T)
    if T % 4:   # a descriptor's row stride must be a multiple of 16 bytes: a padded copy (odd T only)
        spans = torch.nn.functional.pad(spans, (0, 4 - T % 4))
    stride_s = spans.stride(0)

    def launch(cfg):
        block_m, walk, warps, stages = cfg
        _fwd_ws_kernel[(Hq, n_tiles(T, q_tile) * (q_tile // block_m))](
            q, k, v, out, lse, spans, tables, T, group, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            stride_s,
            HEAD_DIM=D, BLOCK_D=bd, Q_TILE=q_tile, BLOCK_M=block_m, BLOCK_N=walk,
            DOT_PREC=dot_prec(q.dtype, q.device), WS=variant == "ws", num_warps=warps, num_stages=stages)

    key = (OP, "fwd_" + variant, D, q.dtype, group, q_tile, q.device)
    launch(tuning.pick(key, fwd_desc_candidates(variant, q.dtype, bd, q.device, q_tile), launch))


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, dlse: Optional[torch.Tensor], spans: torch.Tensor, tables: torch.Tensor, scale: float,
             q_tile: int, k_tile: int, deterministic: bool, variant: str = "base"
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (input dtypes). variant: "base", "even" or "fused" (module docstring).

    Two ways to get dQ: "separate" (a dQ kernel per query tile after the dK/dV kernel: no atomics, bitwise
    reproducible, but the scores are formed twice: 7 matmuls per tile pair instead of 5) and "atomic" (the
    dK/dV kernel adds each key tile's share of dQ into a float32 buffer with atomics). ``deterministic``
    forces "separate"; otherwise the faster one is used (:func:`_dq_strategy`)."""
    if variant not in BWD_VARIANTS:
        raise ValueError(f"masked_attention: unknown backward variant {variant!r}; expected one of {BWD_VARIANTS}")
    q, k, v, out, do = (unit_last(t) for t in (q, k, v, out, do))
    T, Hq, D = q.shape
    dev = q.device
    bd = block_d(D)
    delta = torch.empty(Hq, T, dtype=torch.float32, device=dev)
    dlse_c = dlse.contiguous() if dlse is not None else None
    block = 64 if bd <= 128 else 32
    _bwd_delta_kernel[(Hq, triton.cdiv(T, block))](
        out, do, dlse_c if dlse_c is not None else delta, delta, T,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=block, HAS_DLSE=dlse_c is not None, num_warps=4)

    if variant == "fused":
        return _backward_fused(do, q, k, v, lse, delta, spans, tables, scale, q_tile, k_tile)
    run = lambda strategy: _backward_from_delta(do, q, k, v, out, lse, delta, spans, tables, scale,  # noqa: E731
                                                q_tile, k_tile, strategy, variant)
    if deterministic:
        return run("separate")
    return run(_dq_strategy(q, k, q_tile, k_tile, run, variant))


def _dq_strategy(q, k, q_tile, k_tile, run, variant="base") -> str:
    """"atomic" or "separate": MOCA_ATTENTION_DQ when set; "atomic" off the GPU, with MOCA_ATTENTION_TUNE <= 1
    or autotuning off; else the faster of the two, timed once per (head dim, dtype, group, tiles, variant)."""
    forced = tuning.get("attention_dq")
    if forced is not None:
        return forced
    tune = tuning.get("attention_tune")
    if q.device.type != "cuda" or (tune is not None and tune <= 1) or not tuning.autotune_enabled():
        return "atomic"
    key = (OP, "dq_strategy", q.shape[2], q.dtype, q.shape[1] // k.shape[1], q_tile, k_tile, variant, q.device)
    if key not in tuning.CACHE:
        for strategy in ("atomic", "separate"):
            run(strategy)   # compile and tune its kernels outside the timing
    return tuning.pick(key, ["atomic", "separate"], run)


def _backward_from_delta(do, q, k, v, out, lse, delta, spans, tables, scale, q_tile, k_tile, strategy,
                         variant="base"):
    even = variant != "base"   # EVEN_T where T is a multiple of the walked tile
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    bd = block_d(D)
    dev = q.device
    prec = dot_prec(q.dtype, q.device)
    offs64 = needs_int64(q, k, v, out, do)
    nq = n_tiles(T, q_tile)
    q_tables = tables[:5 * nq]
    k_tables = tables[5 * nq:]

    split = group_split(Hkv * n_tiles(T, k_tile), group, dev)
    heads_per_prog = triton.cdiv(group, split)
    split = triton.cdiv(group, heads_per_prog)
    if split == 1:
        dk = _alloc.empty(T, Hkv, D, dtype=k.dtype, device=dev)
        dv = _alloc.empty(T, Hkv, D, dtype=v.dtype, device=dev)
    else:   # float32 partial sums over parts of the group, summed below (fixed order: deterministic)
        dk = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
        dv = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
    atomic = strategy == "atomic"
    if atomic:
        dq_acc = torch.zeros(T, Hq, D, dtype=torch.float32, device=dev)
    else:
        dq_acc = delta   # unused pointer
        dq = _alloc.empty(T, Hq, D, dtype=q.dtype, device=dev)

    def launch_dkdv(cfg):
        walk, warps, stages = cfg
        _bwd_dkdv_kernel[(Hkv * split, n_tiles(T, k_tile))](
            q, k, v, do, lse, delta, dk, dv, dq_acc, spans, k_tables, T, group, split, heads_per_prog,
            scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(-4) if split > 1 else 0, dk.stride(-3), dk.stride(-2),
            dv.stride(-4) if split > 1 else 0, dv.stride(-3), dv.stride(-2),
            dq_acc.stride(0) if atomic else 0, dq_acc.stride(1) if atomic else 0,
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=walk, BLOCK_N=k_tile, ATOMIC_DQ=atomic, DOT_PREC=prec, OFFS64=offs64,
            EVEN_T=even and T % walk == 0, num_warps=warps, num_stages=stages)

    key = (OP, "dkdv", D, q.dtype, group, split, k_tile, atomic, variant, dev)
    timing = key not in tuning.CACHE
    cfg = tuning.pick(key, candidates("dkdv", q.dtype, bd, dev, variant), launch_dkdv,
                      before_each=(lambda: dq_acc.zero_()) if atomic else None)
    if atomic and timing:
        dq_acc.zero_()   # timing runs (if any) added into it
    launch_dkdv(cfg)
    if split > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)

    if atomic:
        dq = dq_acc.to(q.dtype)
    else:
        def launch_dq(cfg):
            walk, warps, stages = cfg
            _bwd_dq_kernel[(Hq, nq)](
                q, k, v, do, lse, delta, dq, spans, q_tables, T, group, scale * LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                HEAD_DIM=D, BLOCK_D=bd, EVEN_D=D == bd, BLOCK_M=q_tile, BLOCK_N=walk, DOT_PREC=prec, OFFS64=offs64,
                EVEN_T=even and T % walk == 0, num_warps=warps, num_stages=stages)

        key = (OP, "dq", D, q.dtype, group, q_tile, variant, dev)
        launch_dq(tuning.pick(key, candidates("dq", q.dtype, bd, dev, variant), launch_dq))
    return dq, dk, dv


def _backward_fused(do, q, k, v, lse, delta, spans, tables, scale, q_tile, k_tile):
    """Backward variant "fused": one launch of _bwd_fused_kernel (dK/dV programs first, then dQ programs)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    bd = block_d(D)
    dev = q.device
    nq, nk = n_tiles(T, q_tile), n_tiles(T, k_tile)
    q_tables, k_tables = tables[:5 * nq], tables[5 * nq:]
    # the dQ programs already fill the GPU, so the group is split only when both kinds together are too few
    split = group_split(Hkv * nk + Hq * nq, group, dev)
    heads_per_prog = triton.cdiv(group, split)
    split = triton.cdiv(group, heads_per_prog)
    if split == 1:
        dk = _alloc.empty(T, Hkv, D, dtype=k.dtype, device=dev)
        dv = _alloc.empty(T, Hkv, D, dtype=v.dtype, device=dev)
    else:
        dk = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
        dv = _alloc.empty(split, T, Hkv, D, dtype=torch.float32, device=dev)
    dq = _alloc.empty(T, Hq, D, dtype=q.dtype, device=dev)
    n_dkdv = Hkv * split * nk
    offs64 = needs_int64(q, k, v, do)

    def launch(cfg):
        dkdv_walk, dq_walk, warps, stages = cfg
        _bwd_fused_kernel[(n_dkdv + Hq * nq,)](
            q, k, v, do, lse, delta, dk, dv, dq, spans, k_tables, q_tables,
            T, group, Hq, split, heads_per_prog, n_dkdv, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(-4) if split > 1 else 0, dk.stride(-3), dk.stride(-2),
            dv.stride(-4) if split > 1 else 0, dv.stride(-3), dv.stride(-2), dq.stride(0), dq.stride(1),
            HEAD_DIM=D, BLOCK_D=bd, K_TILE=k_tile, DKDV_WALK=dkdv_walk, Q_TILE=q_tile, DQ_WALK=dq_walk,
            DOT_PREC=dot_prec(q.dtype, dev), OFFS64=offs64, EVEN_T=T % dkdv_walk == 0 and T % dq_walk == 0,
            num_warps=warps, num_stages=stages)

    key = (OP, "fused", D, q.dtype, group, split, q_tile, k_tile, dev)
    launch(tuning.pick(key, fused_candidates(q.dtype, bd, dev), launch))
    if split > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dq, dk, dv
