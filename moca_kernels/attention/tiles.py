"""Tile sizes and tuning candidates of masked_attention's Triton kernels.

Owner tile sizes (query tile of forward/dQ, key tile of dK/dV) fix the metadata tables, so they are chosen from
static facts only (device type, dtype, head dim): :func:`plan`. The tile size each loop walks, warps and stages
are candidates timed on the first GPU call per (kernel, head dim, dtype, group size, owner tile) by
``tuning.pick``, never per T. Every knob (``MOCA_ATTENTION_*``, the tests' forced tiles) is a ``tuning``
setting: ``tuning.override(attention_test_tiles=dict(q_tile=32, k_tile=16, fwd_n=16, dkdv_m=32, dq_n=16,
split=2))`` forces owner tiles, walked tiles and the GQA group split (interpreter tests).

Register and spill counts of the GPU candidates were checked by compiling for sm_90a with triton 3.6 (the
GPU machine's) and 3.9 (``bench/compile_attention_fwd.py``, ``bench/NOTES.md``).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import triton

from .. import tuning

LOG2E = math.log2(math.e)
OP = "masked_attention"   # first element of every tuning key of these kernels


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _forced():
    return tuning.get("attention_test_tiles")


def plan(device: torch.device, dtype: torch.dtype, head_dim: int) -> Tuple[int, int]:
    """(q_tile, k_tile): the owner tile sizes for these inputs."""
    forced = _forced()
    if forced is not None:
        return forced["q_tile"], forced["k_tile"]
    if device.type != "cuda":   # interpreted: tiny tiles keep the interpreter fast and exercise many tiles
        return 16, 16
    tiles = tuning.get("attention_tiles")   # "q_tile,k_tile" (sweeps)
    if tiles is not None and dtype != torch.float32:
        return tiles
    if dtype == torch.float32:   # correctness path (tf32x3): small tiles keep it free of spills
        return (64, 64) if head_dim <= 64 else (16, 16)
    return 128, 128


def _keep(cands):
    return tuning.limit(cands, tuning.get("attention_tune"))


def candidates(kind: str, dtype: torch.dtype, bd: int, device: torch.device, variant: str = "base"):
    """(walked tile, num_warps, num_stages) candidates of the base kernels ("fwd", "dkdv", "dq"); the first is
    the default. MOCA_ATTENTION_TUNE=N keeps the first N (0 or 1: no timing, one compile per kernel)."""
    cands = all_candidates(kind, dtype, bd, device)
    if variant != "base" and kind == "dkdv" and device.type == "cuda" and dtype != torch.float32 and bd > 64:
        # with unmasked loads the 64-row walk compiles without spills at 3 stages (triton 3.6, sm_90; NOTES.md)
        cands = [(64, 8, 3)] + [c for c in cands if c != (64, 8, 3)]
    return _keep(cands)


def all_candidates(kind, dtype, bd, device):
    forced = _forced()
    if forced is not None:
        return [(forced[{"fwd": "fwd_n", "dkdv": "dkdv_m", "dq": "dq_n"}[kind]], 4, 1)]
    if device.type != "cuda":
        return [(16, 4, 1)]
    if dtype == torch.float32:
        return [(32, 4, 2)] if bd <= 64 else [(16, 4, 2)]
    # The first one spills nothing; FlexAttention's H100 defaults are fwd 128 x 64 (8 warps, 3 stages),
    # bwd 64 x 128.
    if kind == "fwd":    # 128-row query tiles walking key tiles
        cands = [(64, 8, 2), (64, 8, 3), (128, 8, 3)] if bd > 64 else [(128, 8, 3), (64, 4, 3), (128, 8, 2)]
    elif kind == "dkdv":   # 128-key tiles walking query tiles
        cands = [(32, 8, 3), (64, 8, 2), (64, 8, 3)] if bd > 64 else [(64, 8, 3), (32, 8, 3), (64, 8, 2)]
    else:   # dq
        cands = [(64, 8, 3), (32, 8, 3), (64, 8, 2)] if bd > 64 else [(64, 8, 3), (32, 8, 3), (32, 4, 3)]
    if tuning.get("attention_extra"):   # a wider search (bench/sweep_attention.py)
        extra = {"fwd": [(128, 8, 2), (32, 4, 3), (64, 4, 3)], "dkdv": [(32, 4, 3), (64, 4, 3), (16, 4, 4), (32, 8, 4)],
                 "dq": [(32, 4, 3), (64, 4, 3), (128, 8, 2)]}[kind]
        cands = cands + [c for c in extra if c not in cands]
    return cands


def fused_candidates(dtype: torch.dtype, bd: int, device: torch.device):
    """(dK/dV walked rows, dQ walked keys, num_warps, num_stages) of the fused backward kernel; the first is the
    default (FlexAttention's H100 backward walks 64 / 64 with 8 warps, 3 stages). MOCA_ATTENTION_TUNE as
    :func:`candidates`."""
    forced = _forced()
    if forced is not None:
        cands = [(forced["dkdv_m"], forced["dq_n"], 4, 1)]
    elif device.type != "cuda":
        cands = [(16, 16, 4, 1)]
    elif dtype == torch.float32:
        cands = [(32, 32, 4, 2)] if bd <= 64 else [(16, 16, 4, 2)]
    elif bd > 64:   # sm_90, triton 3.6, EVEN_T: the first spills nothing; 64 / 64 spills 132 B (2 stages: 56 B)
        cands = [(32, 64, 8, 3), (64, 64, 8, 3), (64, 64, 8, 2)]
    else:           # D <= 64: all three spill-free
        cands = [(64, 64, 8, 3), (32, 64, 8, 3), (64, 64, 8, 2)]
    return _keep(cands)


def fwd_desc_candidates(variant: str, dtype: torch.dtype, bd: int, device: torch.device, q_tile: int):
    """(query rows per program, walked key tile, num_warps, num_stages) of the descriptor forward kernel
    (variants "ws" and "tma"); the first is the default. MOCA_ATTENTION_TUNE as :func:`candidates`."""
    return _keep(fwd_desc_all_candidates(variant, dtype, bd, device, q_tile))


def fwd_desc_all_candidates(variant, dtype, bd, device, q_tile):
    forced = _forced()
    if forced is not None:   # interpreter tests: two programs per owner tile where it is large enough
        return [(q_tile // 2 if q_tile >= 32 else q_tile, forced["fwd_n"], 4, 1)]
    if device.type != "cuda":
        return [(q_tile, 16, 4, 1)]
    # Compiled for sm_90a with triton 3.6 and 3.9: none spills. ws: warp specialization applies only with 4
    # warps (it adds a producer and a second consumer warp group: 12 warps, 168 registers each); Triton's
    # Hopper attention tutorial searches BLOCK_M 64/128, BLOCK_N 32/64/128, 2-4 stages.
    if variant == "ws":
        cands = [(128, 64, 4, 3), (128, 128, 4, 2), (128, 64, 4, 2), (64, 64, 4, 3)]
    else:   # tma: 138 registers at (128, 64, 8, 3); (64, 64, 8, 3) at 108-110 fits two programs per SM
        cands = [(128, 64, 8, 3), (64, 64, 8, 3), (128, 128, 8, 2)]
    cands = [c for c in cands if c[0] <= q_tile and q_tile % c[0] == 0]
    return cands or [(q_tile, 64, 4 if variant == "ws" else 8, 3)]


_SM_COUNT: Dict[int, int] = {}


def group_split(programs: int, group: int, device: torch.device) -> int:
    """Into how many programs the dK/dV kernel splits a GQA group. It runs one program per (key tile, key/value
    head); with few key/value heads that can be too few to fill the GPU evenly (2 heads x 128 tiles on 132 SMs:
    the longest programs set the end); below ``attention_min_dkdv_programs`` per SM the group is split."""
    forced = _forced()
    if forced is not None and "split" in forced:
        return max(1, min(group, forced["split"]))
    if device.type != "cuda" or group == 1:
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = tuning.get("attention_min_dkdv_programs") * _SM_COUNT[idx]
    return max(1, min(group, -(-want // programs)))


def dot_prec(dtype: torch.dtype, device: torch.device) -> str:
    """float32 inputs: exact products when interpreted (the CPU tests' oracle comparisons); on a GPU three TF32
    products per dot (tf32x3, about float32 accuracy on tensor cores: the exact path is an FMA loop that
    spills tens of KB per thread). 16-bit inputs: ignored."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if device.type != "cuda" else "tf32x3"


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset (row * stride + head * stride + d) of these [T, H, D] tensors, or of their
    float32 [T, H, D] dQ accumulator, can reach 2^31."""
    return max((t.shape[0] + 1) * t.stride(0) + t.shape[1] * t.stride(1) for t in tensors) >= 2**31 - 1


def unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
