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
