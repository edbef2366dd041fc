"""masked_attention's forward variants (backends "triton:ws" and "triton:tma" besides "triton"): the output,
the LSE and the gradients (the backward reads the forward's LSE) against the float64 reference, interpreted in
float32 / float16 (every mask kind, GQA groups 1 and 3, head dims 64 / 80 / 128, T a multiple of the 16-token
interpreted tiles and not, query tiles split over two programs); poisoned outputs; a bad value; a forced
variant that cannot run raises its reasons; and, without a GPU, that the ws kernel's first config compiles for sm_90 warp-specialized, without spills."""

import os
import random

import pytest
import torch

import moca_kernels as mk
from moca_kernels import _alloc, tuning
from moca_kernels.attention import tiles
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import compile_for_sm90, rand

from .helpers import random_mask
from .test_masked_attention import check_against_float64, use_tiles

VARIANTS = ("ws", "tma")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# kind, Hq, Hkv, D, dtype, T (48, 64: multiples of the 16-token interpreted tiles; 37, 45: not), lse_grad
CASES = [
    ("documents", 3, 1, 128, torch.float16, 48, False),
    ("mixed", 6, 2, 80, torch.float32, 37, True),
    ("causal", 3, 3, 64, torch.float32, 64, False),
    ("mixed", 3, 1, 64, torch.float16, 45, False),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind,Hq,Hkv,D,dtype,T,lse_grad", CASES)
def test_forward_variant_matches_float64(variant, kind, Hq, Hkv, D, dtype, T, lse_grad, device):
    check_against_float64(kind, Hq, Hkv, D, dtype, T, seed=T * 5 + Hq, deterministic=T % 2 == 1, device=device,
                          lse_grad=lse_grad, impl="triton:" + variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_variant_with_query_tile_split_over_two_programs(variant, device):
    """32-row owner tiles read by two 16-row programs each (the tables stay those of the owner tile), 16-key
    walk; T = 71 leaves a last owner tile with one real row in its first half and none in its second."""
    if device.type == "cuda":
        pytest.skip("tile overrides are an interpreter check")
    with use_tiles(q_tile=32, k_tile=16, fwd_n=16, dkdv_m=32, dq_n=16):
        assert tiles.fwd_desc_candidates(variant, torch.float32, 128, device, 32)[0][0] == 16
        check_against_float64("mixed", 6, 2, 128, torch.float32, 71, seed=3, deterministic=False, device=device,
                              lse_grad=True, impl="triton:" + variant)
        check_against_float64("causal", 3, 1, 64, torch.float16, 65, seed=4, deterministic=True, device=device,
                              impl="triton:" + variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_variant_writes_every_output_element(variant, device):
    mask = random_mask(random.Random(8), 43, "mixed", device=device)
    q, k, v = (rand(43, h, 80, device=device) for h in (6, 2, 2))
    with _alloc.poisoned():
        out, lse = mk.masked_attention(q, k, v, mask, return_lse=True, impl="triton:" + variant)
    assert torch.isfinite(out).all(), "out has unwritten (NaN) elements"
    assert torch.isfinite(lse).all(), "lse has unwritten (NaN) elements"


def test_each_variant_runs_its_own_kernel_in_one_process(device, monkeypatch):
    """The same inputs through base, ws and tma in one process (impl= and MOCA_KERNELS_IMPL): each variant
    launches its own kernel (its own tuning key) and they agree to float32 rounding."""
    if device.type == "cuda":
        pytest.skip("interpreter check (exact float32 products)")
    mask = random_mask(random.Random(9), 40, "documents", device=device)
    q, k, v = (rand(40, h, 64, device=device) for h in (3, 1, 1))
    outs = {}
    for variant in ("base", "ws", "tma"):
        key = (tiles.OP, "fwd" if variant == "base" else "fwd_" + variant, 64, torch.float32, 3, 16, device)
        tuning.CACHE.pop(key, None)
        if variant == "tma":   # the environment variable spells it the same way
            monkeypatch.setenv("MOCA_KERNELS_IMPL", "masked_attention=triton:tma")
            outs[variant] = mk.masked_attention(q, k, v, mask, return_lse=True)
        else:
            outs[variant] = mk.masked_attention(q, k, v, mask, return_lse=True, impl="triton:" + variant)
        assert key in tuning.CACHE, variant
    for variant in ("ws", "tma"):
        for a, b in zip(outs[variant], outs["base"]):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_automatic_dispatch_takes_the_measured_default_forward():
    from moca_kernels.attention.op import _OP

    assert [b.spelling for b in _OP.backends if b.auto] == ["triton", "torch"]
    assert _OP.resolve("triton").variant == {"fwd": "base", "bwd": "base"}


@pytest.mark.parametrize("impl", ["triton:fa3", "triton:fwd.even", "triton:ws+tma", "torch:ws"])
def test_unknown_forward_variant_raises(impl, device):
    mask = mk.AttentionMask.from_seqlens([8], device=device)
    q = rand(8, 2, 16, device=device)
    with pytest.raises(ValueError, match="masked_attention"):
        mk.masked_attention(q, q, q, mask, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_forced_forward_variant_that_cannot_run_raises_its_reasons(variant):
    """float32 on the GPU and a misaligned view: the descriptor kernel refuses, naming why; never the base
    kernel in its place."""
    mask = mk.AttentionMask.from_seqlens([64], device="cuda")
    q = rand(64, 2, 64, device="cuda")
    with pytest.raises(BackendUnavailable, match=f"triton:{variant}.*float16 / bfloat16"):
        mk.masked_attention(q, q, q, mask, impl="triton:" + variant)
    wide = rand(64, 2, 65, device="cuda", dtype=torch.bfloat16)[..., 1:]   # base address 2 bytes off
    with pytest.raises(BackendUnavailable, match="16-byte"):
        mk.masked_attention(wide, wide, wide, mask, impl="triton:" + variant)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernels compile for real in other tests")
def test_ws_forward_compiles_for_sm90_warp_specialized_without_spills():
    """bench/compile_attention_fwd.py on the ws kernel's first config (bf16, D = 128): Triton splits the loop
    into warp groups (ttg.warp_specialize, 12 warps), the loads are TMA, the dots wgmma, nothing spills.
    With PYTHONPATH at an unpacked triton 3.6 wheel this checks the GPU machine's compiler."""
    r = compile_for_sm90([os.path.join(ROOT, "bench", "compile_attention_fwd.py"), "--variants",
                           "ws", "--first"])
    if "error" in r and "ptxas" in r["error"]:
        pytest.skip(f"no usable ptxas here: {r['error']}")
    assert "error" not in r, f"the ws kernel does not compile: {r}"
    assert r["warp_specialize"] and r["total_warps"] == 12, f"not warp-specialized: {r}"
    assert r["spill_st"] == 0 and r["spill_ld"] == 0, f"spills: {r}"
    assert r["tma_loads"] > 0 and r["wgmma"] >= 2, f"loads not TMA or dots not wgmma: {r}"
    assert r["shared_kb"] <= 227, f"needs {r['shared_kb']} KB of shared memory"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_forward_variant_bf16_within_twice_torch_bf16_error(variant):
    """bf16 on the GPU through the descriptor kernel (checked: its tuning key appears), one config; T = 2048 and
    2001 (a padded copy of the spans), D = 128 and 80 (TMA zero-fills the columns past D), GQA 8 and 3."""
    dev = torch.device("cuda")
    with tuning.override(attention_tune=0):
        check_against_float64("documents", 16, 2, 128, torch.bfloat16, 2048, seed=1, deterministic=False, device=dev,
                              impl="triton:" + variant)
        check_against_float64("mixed", 6, 2, 80, torch.bfloat16, 2001, seed=2, deterministic=True, device=dev,
                              lse_grad=True, impl="triton:" + variant)
    keys = [k for k in tuning.cached(tiles.OP) if k[1] == "fwd_" + variant]
    assert {k[2] for k in keys} >= {128, 80}, f"the {variant} kernel did not run: {keys}"
