"""Every op against its peers (pytest-benchmark; bench/conftest.py says how to run and compare).

GPU groups use the shapes of the scripts' ``--quick`` runs (the headline shapes); CPU groups use small shapes
and the ops' torch backends, so they run on any machine in seconds. Peers come from the scripts' case builders.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moca_kernels as mk
from bench import bench_attention as attn
from bench import bench_info_nce as nce
from bench import bench_masked_patch_loss as mpl
from bench import bench_masked_token_loss as mtl
from bench.conftest import need_cuda
from bench.harness import Case
from moca_kernels import reference


def _pick(cases, peer):
    """The case named ``peer`` among a builder's cases (a builder leaves out cases its machine cannot run)."""
    for case in cases:
        if case.name == peer:
            return case
    pytest.skip(f"{peer}: not among this machine's cases")


def _names(cases):
    return [case.name for case in cases]


# ------------------------------------------------------------------------------------------------ attention

ATTN_GPU = dict(T=sum(attn.HEADLINE_DOCS), Hq=16, Hkv=2, D=128)
ATTN_PEERS = {  # name -> builder(mask, shape, backward)
    "moca triton": attn.case_moca,
    "moca triton deterministic": lambda m, s, b: attn.case_moca(m, s, b, deterministic=True),
    "FlexAttention (compiled)": attn.case_flex,
    "torch varlen_attn": attn.case_varlen,
    "xformers memory_efficient_attention": attn.case_xformers,
    "SDPA flash, unmasked T (more work)": lambda m, s, b: attn.case_sdpa_flash_unmasked(s, b),
    "SDPA efficient + dense mask": attn.case_sdpa_dense,
}


@pytest.mark.parametrize("peer", list(ATTN_PEERS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kind", ["documents", "mixed"])
def test_attention_gpu(time_case, kind, mode, peer):
    need_cuda()
    if kind == "mixed" and peer in ("torch varlen_attn", "xformers memory_efficient_attention"):
        pytest.skip(f"{peer}: no block-causal (mixed) masks")
    if mode == "fwd" and peer == "moca triton deterministic":
        pytest.skip("deterministic changes the backward only")
    mask = attn.build_mask(kind, attn.HEADLINE_DOCS, "cuda")
    shape = (*ATTN_GPU.values(), torch.bfloat16, "cuda")
    case = Case(peer, ATTN_PEERS[peer](mask, shape, mode == "fwd+bwd"))
    time_case(case, f"masked_attention {kind} {mode} " + " ".join(f"{k}={v}" for k, v in ATTN_GPU.items()),
              pairs=attn.allowed_pairs(mask))


ATTN_CPU_DOCS = [d // 64 for d in attn.HEADLINE_DOCS]   # the CPU smoke shape of bench_attention.py


@pytest.mark.parametrize("peer", ["moca torch (reference)", "SDPA + dense mask (math)",
                                  "xformers memory_efficient_attention"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_torch_cpu(time_case, mode, peer):
    """xformers' row: a time where its kernels run on CPU, else a skip that says why."""
    mask = attn.build_mask("documents", ATTN_CPU_DOCS, "cpu")
    shape = (sum(ATTN_CPU_DOCS), 4, 2, 64, torch.float32, "cpu")
    backward = mode == "fwd+bwd"
    if peer.startswith("moca"):
        setup = attn.case_moca(mask, shape, backward, impl="torch")
    elif peer.startswith("xformers"):
        setup = attn.case_xformers(mask, shape, backward)
    else:
        def setup():
            q, k, v, do = attn.inputs(*shape, layout="bhsd")
            k, v = (t.repeat_interleave(2, 1).contiguous() for t in (k, v))
            dense = mask.to_dense()
            return attn.timed(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense),
                              q, k, v, do, backward)
    time_case(Case(peer, setup), f"masked_attention cpu documents {mode} T={shape[0]} Hq=4 Hkv=2 D=64 fp32")


@pytest.mark.parametrize("peer", _names(attn.metadata_cases("mixed", ATTN_CPU_DOCS, "cpu")))
@pytest.mark.parametrize("kind", ["documents", "mixed"])
def test_attention_metadata_cpu(time_case, kind, peer):
    case = _pick(attn.metadata_cases(kind, ATTN_CPU_DOCS, "cpu"), peer)
    time_case(case, f"attention metadata cpu {kind} T={sum(ATTN_CPU_DOCS)} tiles 128x128")


@pytest.mark.parametrize("peer", _names(attn.metadata_cases("mixed", attn.HEADLINE_DOCS, "cpu"))
                         + ["moca metadata, CUDA (spans + tables)", "FlexAttention create_block_mask"])
@pytest.mark.parametrize("kind", ["documents", "mixed"])
def test_attention_metadata_gpu(time_case, kind, peer):
    need_cuda()
    case = _pick(attn.metadata_cases(kind, attn.HEADLINE_DOCS, "cuda"), peer)
    time_case(case, f"attention metadata {kind} T={sum(attn.HEADLINE_DOCS)} tiles 128x128")


# ------------------------------------------------------------------------------------------------ masked_patch_loss

# op -> (its script's case builder (shape, dtype, device), the GPU shape); CPU calls at a tiny shape name the peers
LOSS_GPU = {
    "masked_patch_loss": (lambda s, dtype, dev: mpl.cases_for(s["N"], s["P"], dtype, dev, smoke=dev == "cpu"),
                          dict(N=262144, P=1176)),
    "masked_token_loss": (lambda s, dtype, dev: mtl.cases_for(s["N"], s["H"], s["V"], dtype, dev),
                          dict(N=8192, H=2048, V=151936)),
}
TINY = dict(N=8, P=8, H=8, V=8)


@pytest.mark.parametrize("op, peer", [(op, name) for op, (cases, _) in LOSS_GPU.items()
                                      for name in _names(cases(TINY, torch.float32, "cpu"))])
def test_loss_gpu(time_case, op, peer):
    need_cuda()
    cases, shape = LOSS_GPU[op]
    case = _pick(cases(shape, torch.bfloat16, "cuda"), peer)
    time_case(case, f"{op} fwd+bwd bf16 " + " ".join(f"{k}={v}" for k, v in shape.items()))


@pytest.mark.parametrize("peer", ["naive torch (fp32 math)", "moca torch"])
def test_masked_patch_loss_torch_cpu(time_case, peer):
    N, P = 4096, 768
    if peer.startswith("naive"):
        fn = lambda p, t, m: reference.masked_patch_loss(p, t, m, norm_pix=True)  # noqa: E731
    else:
        fn = lambda p, t, m: mk.masked_patch_loss(p, t, m, norm_pix=True, impl="torch")  # noqa: E731
    time_case(Case(peer, mpl.make_setup(fn, N, P, torch.float32, "cpu")),
              f"masked_patch_loss cpu fwd+bwd fp32 N={N} P={P}")


@pytest.mark.parametrize("peer", ["naive torch (logits materialised)", "moca torch"])
def test_masked_token_loss_torch_cpu(time_case, peer):
    N, H, V = 256, 128, 8192
    fn, settings = (mtl.naive, None) if peer.startswith("naive") else mtl.moca("torch")
    time_case(Case(peer, mtl.make_setup(fn, N, H, V, torch.float32, "cpu", settings=settings)),
              f"masked_token_loss cpu fwd+bwd fp32 N={N} H={H} V={V}")


# ------------------------------------------------------------------------------------------------ info_nce

NCE_D = 2048
NCE_SWEEP = (4096, 8192, 16384, 65536, 131072, 262144)


def pytest_generate_tests(metafunc):
    """``--sweep`` adds info_nce's scaling shapes (moca triton only, as bench_info_nce.py --sweep)."""
    if "nce_b" in metafunc.fixturenames:
        sizes = [32768] + (list(NCE_SWEEP) if metafunc.config.getoption("--sweep") else [])
        metafunc.parametrize("nce_b", sizes, ids=[f"B{b}" for b in sizes])


@pytest.mark.parametrize("peer", _names(nce.headline_cases(8, 8, 8, "cpu")))
def test_info_nce_gpu(time_case, nce_b, peer):
    need_cuda()
    if nce_b != 32768 and peer != "moca triton":
        pytest.skip("the scaling sweep times moca triton only")
    case = _pick(nce.headline_cases(nce_b, nce_b, NCE_D, "cuda"), peer)
    time_case(case, f"info_nce fwd+bwd bf16 B=M={nce_b} D={NCE_D}")


@pytest.mark.parametrize("peer", ["naive fp32 (logits materialised)", "moca torch"])
def test_info_nce_torch_cpu(time_case, peer):
    B, D = 1024, 256
    fn = nce.naive if peer.startswith("naive") else (lambda q, d: mk.info_nce(q, d, nce.TEMPERATURE, impl="torch"))
    time_case(Case(peer, nce.make_setup(fn, B, B, D, torch.float32, "cpu")), f"info_nce cpu fwd+bwd fp32 B=M={B} D={D}")
