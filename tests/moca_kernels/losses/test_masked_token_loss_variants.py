"""masked_token_loss kernel variants (backends "triton:v2", "triton:v3", per kernel "triton:fwd.v3+grad.v2")
against float64; a forced variant that cannot read its inputs raises its reasons.

CPU runs interpret the descriptor kernels (float32 / float16 only); the sm_90 compile check runs every candidate
through Triton's compiler and ptxas in a subprocess (no GPU needed); GPU tests (bf16, every candidate) are marked
``gpu``. Sizes are odd: N, H, V are not multiples of any tile, V spans several forward splits and, with
chunks of 16 columns (tuning setting mtl_vocab_chunk), several backward chunks.
"""


import pytest
import torch

import moca_kernels as mk
from moca_kernels import _alloc, reference, tuning
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import compile_for_sm90, rand
from tests.moca_kernels.losses.test_masked_token_loss import IGNORE, _leaves, check_against_float64, make_inputs

DESC_VARIANTS = ["v2", "v3"]


@pytest.fixture
def kernels():
    from moca_kernels.losses import masked_token_loss_triton as k

    k.last_kernels.clear()
    with tuning.override(autotune=False, mtl_vocab_chunk=16):
        yield k
    tuning.clear()


def whole_chunks():
    """The chunk width the G budget gives (no forced 16-column chunks)."""
    return tuning.override(mtl_vocab_chunk=None)


# --- interpreted (CPU) or compiled (GPU) against float64 --------------------------------------------------


@pytest.mark.parametrize("variant", DESC_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction,with_bias", [("mean", True), ("none", False), ("sum", True)])
def test_variant_matches_float64_at_odd_sizes(variant, dtype, reduction, with_bias, kernels, device):
    # H = 24 is not a multiple of BLOCK_K (the copy zero-fills K past H), V = 37: two splits, three chunks
    labels, dh = check_against_float64("triton:" + variant, 13, 24, 37, dtype, device, reduction, with_bias)
    assert kernels.last_kernels == {"fwd": variant, "grad": variant}  # the descriptor kernels ran, not v1
    assert (labels == IGNORE).any()
    assert torch.equal(dh[labels == IGNORE], torch.zeros_like(dh[labels == IGNORE]))


def test_persistent_grad_kernel_walks_several_tiles_per_program(kernels, device):
    # one chunk of 37 columns x 40 rows = 3 x 3 tiles of 16; v3 runs 3 programs (one per SM on a GPU), so
    # each program takes several tiles, including partial row and column tiles
    with whole_chunks():
        check_against_float64("triton:v3", 40, 24, 37, torch.float32, device, "sum", with_bias=True)
    assert kernels.last_kernels["grad"] == "v3"


def test_per_kernel_choice_mixes_variants(kernels, monkeypatch, device):
    check_against_float64("triton:fwd.v3+grad.v2", 11, 24, 37, torch.float32, device, "mean", with_bias=True)
    assert kernels.last_kernels == {"fwd": "v3", "grad": "v2"}
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "masked_token_loss=triton:grad.v3")  # the forward keeps its default
    check_against_float64(None, 11, 24, 37, torch.float32, device, "none")
    assert kernels.last_kernels == {"fwd": kernels.DEFAULT_VARIANT["fwd"], "grad": "v3"}


def test_large_logits_do_not_overflow_in_the_variants(kernels, device):
    check_against_float64("triton:v3", 7, 24, 37, torch.float32, device, "mean", logit_std=60.0)


@pytest.mark.parametrize("case", ["transposed weight", "unaligned rows"])
def test_inputs_the_copy_engine_cannot_read_refuse_the_variant_and_run_v1_by_default(case, kernels, device):
    """A forced descriptor variant raises its reasons (it ran v1 silently before); the default backend runs
    v1 on the same inputs, correctly."""
    N, H, V = 10, 24, 37
    if case == "transposed weight":  # weight as the transpose of an [H, V] tensor: stride V along H
        dtype = torch.float32
        base = rand(H, V, device=device, scale=0.3)
    else:  # float16 rows of 20 elements: a 40-byte row stride, not a multiple of 16
        H, dtype = 20, torch.float16
        base = rand(V, H, dtype=dtype, device=device, scale=0.3)
    hidden = rand(N, H, dtype=dtype, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::4] = IGNORE
    view = (lambda b: b.t()) if case == "transposed weight" else (lambda b: b)
    h, b = hidden.clone().requires_grad_(), base.clone().requires_grad_()
    why = "stride 37 along H" if case == "transposed weight" else "not 16-byte aligned"
    for impl in ("triton:v2", "triton:fwd.v3", "triton:grad.v2"):
        with pytest.raises(BackendUnavailable, match=f"backend '{impl}' cannot take these inputs: .*{why}"):
            mk.masked_token_loss(h, view(b), labels, reduction="sum", impl=impl)
    assert kernels.last_kernels == {}
    loss = mk.masked_token_loss(h, view(b), labels, reduction="sum", impl="triton")
    loss.backward()
    assert kernels.last_kernels == {"fwd": "v1", "grad": "v1"}
    h64, b64 = hidden.double().requires_grad_(), base.double().requires_grad_()
    ref = reference.masked_token_loss(h64, view(b64), labels, reduction="sum")
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol)


@pytest.mark.parametrize("variant", DESC_VARIANTS)
def test_variant_writes_every_output_element(variant, kernels, device):
    hidden, weight, bias, labels = make_inputs(13, 24, 37, torch.float32, device, with_bias=True)
    h, w, b = _leaves(hidden, weight, bias)
    with _alloc.poisoned():
        loss = mk.masked_token_loss(h, w, labels, bias=b, reduction="none", impl="triton:" + variant)
        loss.sum().backward()
    assert kernels.last_kernels == {"fwd": variant, "grad": variant}
    assert torch.isfinite(loss).all() and (loss[labels == IGNORE] == 0).all()
    for t in (h, w, b):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("impl,match", [("triton:v9", "unknown kernel variant 'v9'"),
                                        ("triton:fwd.v2+bwd.v3", "unknown kernel variant 'bwd.v3'"),
                                        ("triton:fwd.v2+fwd.v3", "names two variants for the fwd kernel"),
                                        ("triton:grad.v7", "unknown kernel variant 'grad.v7'"),
                                        ("cuda:v2", "no 'cuda' backend")])
def test_unknown_kernel_variant_raises(impl, match, kernels, device):
    hidden, weight, _, labels = make_inputs(6, 16, 21, torch.float32, device)
    with pytest.raises((ValueError, BackendUnavailable), match="masked_token_loss: .*" + match):
        mk.masked_token_loss(hidden, weight, labels, impl=impl)


def test_removed_variant_variable_raises(kernels, device, monkeypatch):
    monkeypatch.setenv("MOCA_MTL_KERNEL", "v2")
    hidden, weight, _, labels = make_inputs(6, 16, 21, torch.float32, device)
    with pytest.raises(ValueError, match="MOCA_MTL_KERNEL was removed"):
        mk.masked_token_loss(hidden, weight, labels)


def test_automatic_dispatch_takes_the_default_variants(kernels, device):
    from moca_kernels.losses.masked_token_loss import _OP

    assert [b.spelling for b in _OP.backends if b.auto] == ["triton", "torch"]
    hidden, weight, _, labels = make_inputs(6, 16, 21, torch.float32, device)
    mk.masked_token_loss(hidden, weight, labels, impl="triton")
    assert kernels.last_kernels["fwd"] == kernels.DEFAULT_VARIANT["fwd"] == "v1"


# --- sm_90 compile check (no GPU needed) --------------------------------------------------------------------


SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moca_kernels.losses import masked_token_loss_triton as K
from tools.sm90 import jit_of, ptxas_stats

FLOATS = {"lse_ptr", "gscale_ptr", "inv_scale_ptr", "dbias_ptr", "part_lse_ptr", "target_ptr"}
DIV16 = ("n", "V", "H", "stride_hn", "stride_wv", "v_begin", "v_count")   # multiples of 16 at the headline

def build(kernel, cfg, flags):
    # as launched at the headline shape: bf16, unit stride along H, 16-byte aligned pointers and row strides
    fn = jit_of(kernel)
    kw = cfg.kwargs
    sig, consts = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n == "h_desc":
            sig[n] = f"tensordesc<bf16[{kw['BLOCK_M']}, {kw['BLOCK_K']}]>"
        elif n == "w_desc":
            sig[n] = f"tensordesc<bf16[{kw['BLOCK_V']}, {kw['BLOCK_K']}]>"
        elif n in ("hidden_ptr", "weight_ptr", "bias_ptr", "grad_ptr"):
            sig[n] = "*bf16"
        elif n == "labels_ptr":
            sig[n] = "*i32"
        elif n in FLOATS:
            sig[n] = "*fp32"
        elif n in ("active_ptr", "stats_ptr"):
            sig[n] = "*i8" if n == "active_ptr" else "*i32"
        elif n == "filter_eps":
            sig[n] = "fp32"
        elif fn.params[i].is_constexpr:
            sig[n] = "constexpr"
            consts[n] = kw[n] if n in kw else flags[n]
        elif n in ("stride_hk", "stride_wk"):
            sig[n] = "constexpr"
            consts[n] = 1
        else:
            sig[n] = "i32"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if sig[n].startswith("*") or n in DIV16}
    ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    regs, spill_st, spill_ld = ptxas_stats(ck.asm["ptx"])
    spilled = spill_st + spill_ld
    ttgir = ck.asm["ttgir"]
    return {"regs": regs, "spilled_bytes": spilled, "shared": ck.metadata.shared,
            "tma_loads": ttgir.count("async_tma_copy_global_to_local"), "wgmma": ttgir.count("warp_group_dot "),
            "warp_specialized": "ttg.warp_specialize" in ttgir, "ws": bool(kw["WS"]), "bk": kw["BLOCK_K"]}

fwd = dict(SPLIT_V=4096, HAS_BIAS=False, DOT_PRECISION="tf32", EVEN_K=True)
grad = dict(HAS_BIAS=False, BIAS_GRAD=False, HAS_SCALE=False, FILTER=False, DOT_PRECISION="tf32", EVEN_K=True)
out = {}
only = os.environ.get("MTL_COMPILE_ONLY")   # "v1" adds v1's candidates (bench/NOTES.md table)
for v in ("v2", "v3"):
    for c in K._desc_configs(v):
        kw = c.kwargs
        name = (f"{v} {kw['BLOCK_M']}x{kw['BLOCK_V']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
                f"{' ws' if kw['WS'] else ''}{' flat' if kw['FLATTEN'] else ''}")
        out["fwd " + name] = build(K._FWD_DESC[v], c, fwd)
        out["grad " + name] = build(K._GRAD_DESC[v], c, grad)
    c = K._desc_configs(v)[0]   # the gradient filter (filter_eps=) on each variant's first candidate
    out[f"grad {v} filter"] = build(K._GRAD_DESC[v], c, dict(grad, FILTER=True))
if only == "v1":
    for c in K._tile_configs():
        c.kwargs.setdefault("WS", False)
        name = f"v1 {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_V']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
        out["fwd " + name] = build(K._lse_fwd_kernel, c, fwd)
        out["grad " + name] = build(K._grad_logits_kernel, c, grad)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernels compile for real in other tests")
def test_descriptor_kernels_compile_for_sm90_without_spills():
    """Every v2 / v3 candidate at the headline (bf16, H = 2048): no register spills, operand tiles through TMA,
    wgmma, shared memory within the H100's 227 KiB, and the warp-specialised candidates (present only under
    triton 3.6, the GPU machine's) really split into producer and consumer warps. For the GPU machine's triton
    run with PYTHONPATH pointing at an unpacked triton 3.6 wheel (bench/NOTES.md)."""
    import triton

    result = compile_for_sm90(["-c", SCRIPT])
    names = " | ".join(result)
    for want in ("fwd v2 128x128x64 w8", "grad v2 128x256x64", "fwd v3 .*flat", "grad v3 .*flat", "grad v2 filter",
                 "grad v3 filter"):
        assert __import__("re").search(want, names), f"{want!r} not compiled: {names}"
    if triton.__version__.startswith("3.6"):
        assert " ws" in names, "triton 3.6 should offer the warp-specialised candidates"
    for name, r in result.items():
        assert r["spilled_bytes"] == 0, f"{name} spills: {r}"
        assert r["tma_loads"] > 0 and r["wgmma"] >= 1, f"{name}: operand tiles not on TMA / wgmma: {r}"
        assert r["shared"] <= 227 * 1024, f"{name} needs {r['shared']} B of shared memory"
        assert r["warp_specialized"] == r["ws"], f"{name}: warp specialisation {r}"


# --- GPU (compiled, bf16) ----------------------------------------------------------------------------------


def _candidates(variant):
    from moca_kernels.losses import masked_token_loss_triton as k

    return range(len(k._desc_configs(variant)))


@pytest.mark.gpu
@pytest.mark.parametrize("variant,index", [(v, i) for v in DESC_VARIANTS for i in (0, 1, 2, 3, 4)])
def test_gpu_every_candidate_bf16_matches_float64(variant, index, kernels):
    """Each candidate alone (the autotuner may pick any of them on the GPU): bf16 within twice PyTorch's bf16
    error, H = 200 (not a multiple of 64: K past H zero-filled), V = 5000 (two splits), 3 chunks of 2048."""
    if index >= len(_candidates(variant)):
        pytest.skip(f"{variant} has {len(_candidates(variant))} candidates under this triton")
    cfg = kernels._desc_configs(variant)[index]
    if cfg.kwargs["BLOCK_K"] != 64:
        pytest.skip("the float32 candidate (128-byte K slices in float32)")
    tuning.clear()
    with tuning.override(mtl_vocab_chunk=2048, mtl_desc_config=index):
        check_against_float64("triton:" + variant, 300, 200, 5000, torch.bfloat16, "cuda", "mean", with_bias=True)
    assert kernels.last_kernels == {"fwd": variant, "grad": variant}


@pytest.mark.gpu
@pytest.mark.parametrize("variant,dtype", [("v2", torch.float16), ("v3", torch.float32)])
def test_gpu_variant_fp16_and_fp32_match_float64(variant, dtype, kernels):
    # float16: G pre-scaled, Triton backward GEMMs; float32: the 64 x 128 x 32 candidate (128-byte K slices)
    with whole_chunks():
        check_against_float64("triton:" + variant, 257, 192, 4099, dtype, "cuda", "sum", with_bias=True)
    assert kernels.last_kernels == {"fwd": variant, "grad": variant}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", DESC_VARIANTS)
def test_gpu_variant_qwen_vocabulary_bf16(variant, kernels):
    with whole_chunks():
        check_against_float64("triton:" + variant, 384, 2048, 151936, torch.bfloat16, "cuda", "mean", ignored=0.6)
    assert kernels.last_kernels == {"fwd": variant, "grad": variant}
