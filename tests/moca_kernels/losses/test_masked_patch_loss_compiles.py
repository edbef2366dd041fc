"""masked_patch_loss's Triton forward kernels (v1 and v2) compile for sm_90 (H100) on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so rules only the compiler enforces (constexpr
branches that define tiles, loop pipelining, layouts) would first fail on the GPU. This compiles every v2
candidate at the headline shape (P = 1176, bf16, mask, norm_pix, gradient) plus v2 without a tail tile (P = 1024)
and with a tiny tail (P = 37, fp16), in a subprocess without TRITON_INTERPRET, and checks that the bf16 rows are
read with 16-byte loads when P is divisible by 8 (P is a compile-time constant) and never element by element.
"""

import re

import pytest
import torch

from tests.helpers import compile_for_sm90

SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moca_kernels.losses import masked_patch_loss_triton as K
from tools.sm90 import jit_of

def build(kernel, dtype, consts, num_warps):
    fn = jit_of(kernel)
    types = {"pred_ptr": dtype, "target_ptr": dtype, "mask_ptr": "*u8", "count_ptr": "*i32", "grad_ptr": dtype,
             "row_loss_ptr": "*fp32", "N": "i32", "eps": "fp32", "weight": "fp32"}
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if n.endswith("_ptr")}
    ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps))
    ptx = ck.asm["ptx"]
    return {"shared": ck.metadata.shared,
            "loads_16B": len(re.findall(r"ld\.global[^;\n]*\.v4\.b32", ptx)),
            "loads_2B": len(re.findall(r"ld\.global[^;\n]*\.(?:b16|u16) ", ptx)),
            "async_copies": ck.asm["ttgir"].count("async_copy_global_to_local")}

flags = dict(HAS_MASK=True, NORM_PIX=True, WRITE_GRAD=True)
out = {}
for P, dtype in ((1176, "*bf16"), (1024, "*bf16"), (37, "*fp16")):
    head, tail = K.head_tail(P)
    cfgs = K._configs_v2(P) if P == 1176 else K._configs_v2(P)[:1]
    for rows, warps, per_sm, stages in cfgs:
        out[f"v2 P={P} {dtype} rows={rows} warps={warps} stages={stages}"] = build(
            K._masked_patch_loss_fwd_v2_kernel, dtype,
            dict(flags, P=P, HEAD=head, TAIL=tail, ROWS=rows, NUM_STAGES=stages), warps)
rows, block, single, warps = K._configs(1176)[0]
out["v1 P=1176 *bf16"] = build(K._masked_patch_loss_fwd_kernel, "*bf16",
                               dict(flags, P=1176, ROWS=rows, BLOCK_P=block, SINGLE_TILE=single), warps)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernels compile for real in other tests")
def test_forward_kernels_compile_for_sm90_with_16_byte_loads():
    result = compile_for_sm90(["-c", SCRIPT])
    names = " | ".join(result)
    for want in ("v1 P=1176", "v2 P=1176 .*stages=1", "v2 P=1176 .*stages=2", "v2 P=1024", "v2 P=37"):
        assert re.search(want, names), f"{want!r} not compiled: {names}"
    for name, r in result.items():
        assert r["shared"] <= 227 * 1024, f"{name} needs {r['shared']} B of shared memory"
        if "P=37" in name:  # rows of 37 elements start at any address: element loads are right there
            continue
        assert r["loads_2B"] == 0, f"{name} reads 16-bit elements one by one: {r}"
        if "stages=2" not in name:  # a pipelined loop reads through cp.async instead
            assert r["loads_16B"] > 0, f"{name} has no 16-byte loads: {r}"
        if "stages=2" in name:
            assert r["async_copies"] > 0, f"{name}: the loop over row blocks is not pipelined: {r}"
