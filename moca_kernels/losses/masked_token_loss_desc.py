"""Triton kernels of masked_token_loss, variants v2 and v3: operand tiles through tensor descriptors (TMA on
sm_90), warp-specialised (v2 candidates on triton 3.6) or with the tile loop flattened (v3); see
``masked_token_loss_triton.py`` for the variants and the launchers.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .. import tuning
from ..tuning import autotune_enabled
from .masked_token_loss_kernels import _INTERPRET, _SMEM_LIMIT, _lse_step, _store_g_tile, _swizzle

VARIANTS = ("v1", "v2", "v3")

# ---------------------------------------------------------------------------------------------------------
# Variants v2 / v3: operand tiles through tensor descriptors (TMA on sm_90), warp-specialised or flattened loops.
# ---------------------------------------------------------------------------------------------------------


# Warp-specialised K loops compile for sm_90 under triton 3.6 (the GPU machine's); triton 3.9 stops with "descriptor
# block and tensor must have the same number of elements" in its sm_90 warp specialisation, so there v2 leaves them out.
_WS_COMPILES = tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


def _desc_configs(variant: str):
    """Candidates of the descriptor kernels: (BLOCK_M, BLOCK_V, BLOCK_K, GROUP_M) plus WS (warp-specialised K
    loop) and FLATTEN (tile loop flattened with the K loop; Triton does not combine it with WS on sm_90).
    Checked for sm_90 with triton 3.6 and 3.9 (registers, spills, shared memory, whether the warp
    specialisation happened: on sm_90 it does with 4 warps, one consumer warp group, and not with 8; NOTES.md).
    The last candidate has 128-byte K slices in float32 (the only one ``_prune_desc`` keeps for float32)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_V": 16, "BLOCK_K": 16, "GROUP_M": 2, "WS": variant == "v2",
                               "FLATTEN": variant == "v3"}, num_warps=1, num_stages=1, pre_hook=_set_block_shapes)]
    if variant == "v2":
        shapes = [(128, 128, 64, 8, 4, False)]
        if _WS_COMPILES:
            shapes += [(128, 128, 64, 4, 4, True), (128, 128, 64, 4, 3, True)]
        shapes += [(128, 256, 64, 8, 3, False), (64, 128, 32, 4, 3, False)]
    else:
        shapes = [(128, 128, 64, 8, 4, False), (128, 256, 64, 8, 3, False), (64, 128, 32, 4, 3, False)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_M": 16, "WS": ws,
                           "FLATTEN": variant == "v3"}, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)
            for bm, bv, bk, warps, stages, ws in shapes]


def _set_block_shapes(nargs):
    """Config pre-hook: the descriptors' block shapes follow the config's tile."""
    nargs["h_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_K"]]


def _prune_desc(configs, named_args, **kwargs):
    """Candidates whose pipelined operand tiles fit in shared memory and whose K slice is 128 bytes (BLOCK_K 64
    for 16-bit types, 32 for float32); with autotuning off the first of them; tuning setting mtl_desc_config
    (tests on a GPU): that index of the variant's candidates alone."""
    forced = tuning.get("mtl_desc_config")
    if forced is not None:
        return [configs[forced]]
    esize = named_args["ESIZE"]
    fit = [c for c in configs
           if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_V"]) * c.kwargs["BLOCK_K"] * esize <= _SMEM_LIMIT
           and c.kwargs["BLOCK_K"] * esize == 128]
    fit = fit or [min(configs, key=lambda c: c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_V"]) * c.kwargs["BLOCK_K"])]
    return fit if autotune_enabled() else fit[:1]


@triton.jit
def _logits_tile_desc(h_desc, w_desc, bias_ptr, row0, col0, cols, col_ok, H,
                      HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, WS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """S[row0:row0+BLOCK_M, col0:col0+BLOCK_V] (+ bias[cols]) in float32 from descriptor tiles; rows past n,
    columns past V and K past H come zero-filled from the copy (no masks in the loop)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in tl.range(0, H, BLOCK_K, warp_specialize=WS):
        a = h_desc.load([row0, k0])    # [BLOCK_M, BLOCK_K]
        b = w_desc.load([col0, k0])    # [BLOCK_V, BLOCK_K]
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


def _lse_fwd_desc_kernel(
    h_desc,          # descriptor of hidden [n, H], block [BLOCK_M, BLOCK_K]
    w_desc,          # descriptor of weight [V, H], block [BLOCK_V, BLOCK_K]
    bias_ptr, labels_ptr, part_lse_ptr, target_ptr,   # as in _lse_fwd_kernel
    n, V, H, n_splits, ESIZE,                         # ESIZE: element size (autotune key and pruning only)
    SPLIT_V: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WS: tl.constexpr, FLATTEN: tl.constexpr,
):
    """_lse_fwd_kernel's work (BLOCK_M rows x one vocabulary split) on descriptor tiles; FLATTEN fuses the walk
    over the split's tiles with the K loop so one tile's epilogue overlaps the next tile's first copies."""
    pid_m, pid_s = _swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), n_splits, GROUP_M)
    row0 = pid_m * BLOCK_M
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_start = pid_s * SPLIT_V
    v_end = tl.minimum(v_start + SPLIT_V, V)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in tl.range(v_start, v_end, BLOCK_V, flatten=FLATTEN):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        s = _logits_tile_desc(h_desc, w_desc, bias_ptr, row0, v0, cols, col_ok, H,
                              HAS_BIAS, DOT_PRECISION, WS, BLOCK_M, BLOCK_V, BLOCK_K)
        m_i, l_i, target = _lse_step(s, cols, col_ok, label, m_i, l_i, target)
    tl.store(part_lse_ptr + rows * n_splits + pid_s, m_i + tl.log(l_i), mask=row_ok)
    hit = row_ok & (label >= v_start) & (label < v_end)
    tl.store(target_ptr + rows, target, mask=hit)


def _grad_logits_desc_kernel(
    h_desc, w_desc,  # descriptors of hidden [n, H] and weight [V, H]
    bias_ptr, labels_ptr, lse_ptr, gscale_ptr, inv_scale_ptr, grad_ptr, dbias_ptr,   # as in _grad_logits_kernel
    filter_eps, active_ptr, stats_ptr,                                               # as in _grad_logits_kernel
    n, V, H, v_begin, v_count, ESIZE,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WS: tl.constexpr, FLATTEN: tl.constexpr,
):
    """_grad_logits_kernel's G tiles on descriptor tiles. Each program walks tiles pid, pid + programs, ...;
    v2 launches one program per tile (one trip), v3 one per SM with FLATTEN (persistent, the next tile's copies
    overlap this tile's epilogue)."""
    num_m = tl.cdiv(n, BLOCK_M)
    num_v = tl.cdiv(v_count, BLOCK_V)
    for tile in tl.range(tl.program_id(0), num_m * num_v, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_v = _swizzle(tile, num_m, num_v, GROUP_M)
        row0 = pid_m * BLOCK_M
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)   # column within the chunk
        cols = v_begin + local
        row_ok = rows < n
        col_ok = local < v_count
        s = _logits_tile_desc(h_desc, w_desc, bias_ptr, row0, v_begin + pid_v * BLOCK_V, cols, col_ok, H,
                              HAS_BIAS, DOT_PRECISION, WS, BLOCK_M, BLOCK_V, BLOCK_K)
        _store_g_tile(s, rows, cols, local, row_ok, col_ok, v_count, labels_ptr, lse_ptr, gscale_ptr, inv_scale_ptr,
                      grad_ptr, dbias_ptr, filter_eps, active_ptr, stats_ptr, BIAS_GRAD, HAS_SCALE, FILTER)


def _desc_kernel(fn, variant: str, **extra):
    return triton.autotune(configs=_desc_configs(variant), key=["H", "V", "ESIZE"],
                           prune_configs_by={"early_config_prune": _prune_desc}, **extra)(triton.jit(fn))


# One autotuned kernel per (variant, kernel): each variant keeps its own candidates and its own tuned choice.
_FWD_DESC = {v: _desc_kernel(_lse_fwd_desc_kernel, v) for v in ("v2", "v3")}
_GRAD_DESC = {v: _desc_kernel(_grad_logits_desc_kernel, v,
                              restore_value=["dbias_ptr", "stats_ptr", "active_ptr"])
              for v in ("v2", "v3")}


@tuning.on_clear
def reset_tuning() -> None:
    """Forget every descriptor kernel's tuned choice (``tuning.clear()`` calls it)."""
    for kernel in (*_FWD_DESC.values(), *_GRAD_DESC.values()):
        kernel.cache.clear()


def descriptor_reasons(hidden: torch.Tensor, weight: torch.Tensor) -> List[str]:
    """Why the descriptor kernels (v2, v3) cannot read hidden [N, H] and weight [V, H] through the copy engine:
    a stride along H other than 1, a row stride or base address not 16-byte aligned. Checked on the caller's
    tensors: the counted rows of hidden, when compacted, are a copy with rows of H values, so H itself must
    give 16-byte rows too."""
    why = []
    for name, t in (("hidden", hidden), ("weight", weight)):
        esize = t.element_size()
        if t.stride(1) != 1:
            why.append(f"{name} has stride {t.stride(1)} along H; the descriptor kernels need 1")
        elif (t.stride(0) * esize) % 16 or t.data_ptr() % 16:
            why.append(f"{name}'s rows or base address are not 16-byte aligned (TMA)")
    if (hidden.shape[1] * hidden.element_size()) % 16:
        why.append(f"rows of H = {hidden.shape[1]} values are not a multiple of 16 bytes (TMA)")
    return why


def _descriptor(t: torch.Tensor):
    """A tensor descriptor of the 2-D ``t`` (block shape set per config), or None where the copy engine cannot
    read it: a stride along H other than 1, a row stride or base address not 16-byte aligned."""
    esize = t.element_size()
    if t.stride(1) != 1 or (t.stride(0) * esize) % 16 or t.data_ptr() % 16 or t.shape[0] == 0:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1])


def _descriptors(variant: str, hidden: torch.Tensor, weight: torch.Tensor):
    """(hidden descriptor, weight descriptor) for a descriptor variant, (None, None) for v1. A tensor the copy
    engine cannot read raises (the op's reasons refuse such inputs before any kernel runs)."""
    if variant not in VARIANTS:
        raise ValueError(f"masked_token_loss: unknown kernel variant {variant!r}; expected one of {VARIANTS}")
    if variant == "v1":
        return None, None
    hd, wd = _descriptor(hidden), _descriptor(weight)
    if hd is None or wd is None:
        raise RuntimeError(f"masked_token_loss: kernel variant {variant} cannot read these tensors: "
                           + "; ".join(descriptor_reasons(hidden, weight)))
    return hd, wd
