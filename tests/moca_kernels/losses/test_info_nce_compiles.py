"""info_nce's Triton kernels compile for sm_90 (H100) on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: rules only the compiler enforces (no
non-constexpr globals, dot shapes, layouts, shared memory) would otherwise first fail on the GPU. This runs
Triton's frontend and backend (to PTX and a cubin) for one configuration per kernel, in a subprocess without
TRITON_INTERPRET, and checks the 16-bit main loops are software-pipelined (asynchronous copies).
"""


import pytest
import torch

from tests.helpers import compile_for_sm90

SCRIPT = r"""
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moca_kernels.losses import info_nce_triton as K
from tools.sm90 import jit_of

def build(kernel, types, consts, divisible, num_warps, num_stages):
    fn = jit_of(kernel)
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in fn.arg_names}
    ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages))
    return {"shared": ck.metadata.shared, "async_copies": ck.asm["ttgir"].count("async_copy_global_to_local")}

cfg = K._configs()[0]
common = {"x_ptr": "*bf16", "y_ptr": "*bf16", "temp_ptr": "*fp32", "target_ptr": "*i64", "row_key_ptr": "*i32",
          "col_key_ptr": "*i32", "R": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_y": "i32",
          "R_KEY": "i32", "C_KEY": "i32"}
divisible = ["x_ptr", "y_ptr", "temp_ptr", "target_ptr", "row_key_ptr", "col_key_ptr", "part_ptr", "lse2_ptr",
             "g_ptr", "stride_x", "stride_y", "stride_g", "D", "cols_per_split"]
consts = dict(cfg.kwargs, HAS_KEYS=True, EVEN_D=True, DOT_PRECISION="tf32")
out = {
    "fwd": build(K._fwd_kernel, dict(common, part_ptr="*fp32", cols_per_split="i32", NSPLIT="i32"), consts,
                 divisible, cfg.num_warps, cfg.num_stages),
    "grad": build(K._grad_kernel, dict(common, lse2_ptr="*fp32", g_ptr="*bf16", stride_g="i32"), consts,
                  divisible, cfg.num_warps, cfg.num_stages),
    "fwd_fp32_tf32": build(K._fwd_kernel, dict(common, x_ptr="*fp32", y_ptr="*fp32", part_ptr="*fp32",
                           cols_per_split="i32", NSPLIT="i32"), dict(consts, BLOCK_D=32), divisible, cfg.num_warps, 2),
    "own": build(K._own_logits_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "out_ptr": "*fp32", "R": "i32",
                 "D": "i32", "K": "i32", "first": "i32", "stride_x": "i32", "stride_y": "i32"},
                 dict(BLOCK_R=32, BLOCK_D=256), [], 4, 1),
}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernels compile for real in other tests")
def test_kernels_compile_for_sm90_and_pipeline_their_main_loop():
    result = compile_for_sm90(["-c", SCRIPT])
    for name in ("fwd", "grad"):
        assert result[name]["async_copies"] > 0, f"{name} kernel's main loop is not pipelined: {result[name]}"
        assert result[name]["shared"] <= 227 * 1024, f"{name} kernel needs {result[name]['shared']} B of shared memory"
