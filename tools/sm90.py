"""Compiling Triton kernels for the H100 (sm_90a) on a machine without a GPU: the pieces shared by
bench/compile_attention_fwd.py and the tests that check registers, spills and pipelining before any GPU run.

Run with the real compiler (not TRITON_INTERPRET); to check the GPU machine's triton, put an unpacked wheel of
it first on PYTHONPATH (bench/NOTES.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Tuple


def jit_of(kernel):
    """The JITFunction under a kernel's autotune / heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def ptxas_stats(ptx: str) -> Tuple[int, int, int]:
    """(registers per thread, spill-store bytes, spill-load bytes) of PTX assembled for sm_90a by the ptxas
    that this triton bundles; with several kernels in the PTX, the most registers and the summed spills."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                           capture_output=True, text=True)
    text = r.stderr + r.stdout
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        raise RuntimeError("ptxas: " + text.strip().splitlines()[-1] if text.strip() else "ptxas gave no output")
    return max(regs), sum(int(a) for a, _ in spills), sum(int(b) for _, b in spills)


def compile_sm90(kernel, types, consts, num_warps: int, num_stages: int, floats=("qk_scale", "sm_scale")):
    """Compile a Triton kernel (under its autotune / heuristics wrappers) for sm_90a and return the compiled kernel
    (``.asm["ptx"]``, ``.asm["ttgir"]``, ``.metadata``). ``types``: {argument: "*bf16", "i32", ...}; any other
    argument is "constexpr" where the kernel declares it so, "fp32" when named in ``floats``, else "i32".
    ``consts``: the constexpr values. Pointers and strides are marked 16-divisible, as at the launches."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_of(kernel)
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if name in types:
            sig[name] = types[name]
        elif fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name in floats else "i32"
    divisible = [n for n in fn.arg_names if sig[n].startswith("*") or n.startswith("stride")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
