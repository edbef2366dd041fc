"""masked_attention's backward variants (backends "triton:even" and "triton:fused" besides "triton"): every
variant's gradients against the float64 reference (interpreted, float32 / float16; sequence lengths that are
and are not multiples of the walked tiles, so both the unmasked EVEN_T loads and the masked ones run), the
fused kernel with a split GQA group, a forward and a backward variant together, poisoned outputs, a bad value;
and, without a GPU, that the variants'
first configs compile for sm_90 without register spills and with pipelined main loops."""

import random

import pytest
import torch

import moca_kernels as mk
from moca_kernels import _alloc, tuning
from moca_kernels.attention import tiles
from tests.helpers import compile_for_sm90, rand

from .helpers import random_mask
from .test_masked_attention import check_against_float64, use_tiles

VARIANTS = ("even", "fused")

# kind, Hq, Hkv, D, dtype, T (48 and 64: multiples of the 16-token interpreted tiles; 37, 45: not), deterministic
CASES = [
    ("documents", 3, 1, 64, torch.float32, 48, False),
    ("mixed", 7, 1, 80, torch.float16, 37, False),
    ("causal", 6, 2, 128, torch.float32, 64, True),
    ("mixed", 4, 4, 64, torch.float16, 45, True),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind,Hq,Hkv,D,dtype,T,deterministic", CASES)
def test_backward_variant_matches_float64(variant, kind, Hq, Hkv, D, dtype, T, deterministic, device):
    check_against_float64(kind, Hq, Hkv, D, dtype, T, seed=T * 7 + Hq, deterministic=deterministic, device=device,
                          lse_grad=kind == "mixed", impl="triton:" + variant)


def test_forward_and_backward_variant_together(device):
    """impl="triton:ws+fused": the ws forward and the fused backward in one call, against float64."""
    check_against_float64("mixed", 6, 2, 64, torch.float32, 45, seed=12, deterministic=False, device=device,
                          lse_grad=True, impl="triton:ws+fused")


@pytest.mark.parametrize("split", [2, 3])
def test_fused_backward_with_split_group_and_other_walks(split, device):
    """The fused kernel with the GQA group split over programs (float32 partial sums) and walked tiles other
    than the owner tiles (dK/dV walks 32 rows under 16-key owner tiles, dQ walks 32 keys)."""
    if device.type == "cuda":
        pytest.skip("tile overrides are an interpreter check")
    with use_tiles(q_tile=32, k_tile=16, fwd_n=16, dkdv_m=32, dq_n=32, split=split):
        check_against_float64("mixed", 7, 1, 64, torch.float32, 64, seed=split, deterministic=False, device=device,
                              impl="triton:fused")


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_variant_writes_every_gradient_element(variant, device):
    mask = random_mask(random.Random(4), 48, "mixed", device=device)
    q, k, v = (rand(48, h, 64, device=device).requires_grad_() for h in (4, 2, 2))
    forced = use_tiles(*tiles.plan(device, torch.float32, 64), 16, 16, 16, split=2)
    with _alloc.poisoned(), forced:
        out = mk.masked_attention(q, k, v, mask, impl="triton:" + variant)
        out.sum().backward()
    for name, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("env", ["masked_attention=triton:v9", "masked_attention=triton:fused+even"])
def test_unknown_backward_variant_raises(env, device, monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", env)
    mask = mk.AttentionMask.from_seqlens([8], device=device)
    q = rand(8, 2, 16, device=device)
    with pytest.raises(ValueError, match="masked_attention.*triton:"):
        mk.masked_attention(q, q, q, mask)


def test_backward_variant_is_fixed_by_the_forward(device, monkeypatch):
    """The backward runs the variant chosen when the forward ran, whatever MOCA_KERNELS_IMPL says by then:
    the fused kernel's tuning key appears only for the call that asked for it."""
    if device.type == "cuda":
        pytest.skip("interpreter check")
    mask = random_mask(random.Random(5), 32, "documents", device=device)
    q = rand(32, 2, 64, device=device).requires_grad_()
    tuning.CACHE.clear()
    out = mk.masked_attention(q, q, q, mask, impl="triton:fused")
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "masked_attention=triton")
    out.sum().backward()
    assert [k[1] for k in tuning.cached(tiles.OP)] == ["fwd", "fused"]


SCRIPT = r"""
import json, os, re, subprocess, tempfile
import torch
import triton
from moca_kernels.attention import kernels_bwd, tiles
from tools.sm90 import compile_sm90, ptxas_stats

def build(kernel, ptrs, consts, warps, stages):
    ck = compile_sm90(kernel, ptrs, consts, warps, stages)
    regs, spill_st, spill_ld = ptxas_stats(ck.asm["ptx"])
    spilled = spill_st + spill_ld
    return {"regs": regs, "spilled_bytes": spilled, "shared": ck.metadata.shared,
            "async_copies": ck.asm["ttgir"].count("async_copy_global_to_local"),
            "wgmma": ck.asm["ttgir"].count("warp_group_dot ")}

bf = "*bf16"
common = dict(Q=bf, K=bf, V=bf, dO=bf, Lse="*fp32", Delta="*fp32", Spans="*i32")
cuda = torch.device("cuda")
walk, warps, stages = tiles.candidates("dkdv", torch.bfloat16, 128, cuda, "even")[0]
# as launched at the headline shape (Hkv = 2: the group is split, float32 partial dK / dV)
out = {"dkdv_even": build(kernels_bwd._bwd_dkdv_kernel, dict(common, dK="*fp32", dV="*fp32", DQacc="*fp32", KTable="*i32"),
                          dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=walk, BLOCK_N=128, ATOMIC_DQ=False,
                               DOT_PREC="tf32", OFFS64=False, EVEN_T=True), warps, stages)}
dkdv_walk, dq_walk, warps, stages = tiles.fused_candidates(torch.bfloat16, 128, cuda)[0]
out["fused"] = build(kernels_bwd._bwd_fused_kernel, dict(common, dK=bf, dV=bf, dQ=bf, KTable="*i32", QTable="*i32"),
                     dict(HEAD_DIM=128, BLOCK_D=128, K_TILE=128, DKDV_WALK=dkdv_walk, Q_TILE=128, DQ_WALK=dq_walk,
                          DOT_PREC="tf32", OFFS64=False, EVEN_T=True), warps, stages)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernels compile for real in other tests")
def test_variant_kernels_compile_for_sm90_without_spills():
    """The first config of the "even" dK/dV kernel and of the fused kernel at D = 128, bf16: no spills under
    triton 3.6 (which the base dK/dV kernel has at a 64-row walk), main loops on wgmma and software-pipelined.
    Run it against the GPU machine's triton with PYTHONPATH pointing at an unpacked triton 3.6 wheel."""
    triton = pytest.importorskip("triton")
    result = compile_for_sm90(["-c", SCRIPT], drop_env=("MOCA_KERNELS_IMPL",))
    # triton 3.6 (the GPU machine's) allocates these without spills; 3.9 (this machine's) spills a few bytes
    # (dK/dV 68, fused 80; the base dK/dV kernel at a 64-row walk: 156 B under 3.6). With bf16 dK / dV outputs
    # (no group split) the 64-row dK/dV walk spills 52 B under 3.6 too: bench/NOTES.md.
    limit = 0 if triton.__version__.startswith("3.6") else 96
    for name, r in result.items():
        assert r["spilled_bytes"] <= limit, f"{name} spills: {r}"
        assert r["async_copies"] > 0 and r["wgmma"] >= 4, f"{name} main loop not pipelined on wgmma: {r}"
        assert r["shared"] <= 227 * 1024, f"{name} needs {r['shared']} B of shared memory"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_backward_variant_bf16_within_twice_torch_bf16_error(variant):
    """bf16 on the GPU, one config per kernel; T = 2048 (the unmasked EVEN_T loads) and 2001 (masked)."""
    dev = torch.device("cuda")
    with tuning.override(attention_tune=0):
        check_against_float64("documents", 16, 2, 128, torch.bfloat16, 2048, seed=1, deterministic=False, device=dev,
                              impl="triton:" + variant)
        check_against_float64("mixed", 8, 2, 128, torch.bfloat16, 2001, seed=2, deterministic=True, device=dev,
                              lse_grad=True, impl="triton:" + variant)
