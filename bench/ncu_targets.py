"""One forward + backward of an op at its headline shape, for Nsight Compute to profile one launch of a kernel.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        -k regex:'_bwd_(dkdv|dq)_kernel' -c 2 python bench/ncu_targets.py attention_bwd
    ncu ... -k regex:mpl_fwd -c 1 python bench/ncu_targets.py masked_patch_loss

bench/gpu_run.sh step (i) runs these. ``attention_bwd``: T = 16384 (the documents mask of
bench_attention.HEADLINE_DOCS), Hq = 16, Hkv = 2, D = 128, bf16, default variant, dQ by its own kernel (so the
dK/dV kernel launches first, then the dQ kernel: ``-c 2`` profiles one launch of each). ``masked_patch_loss``:
N = 262144, P = 1176, bf16, half the rows counted, norm_pix, the cuda backend when moca_kernels._C loads
(kernel ``mpl_fwd_*``), else triton. Every kernel takes its first configuration (``tuning.override(autotune=False)``)
so that no tuner launches come first. ``--smoke``: tiny shapes on CPU (TRITON_INTERPRET=1), to check the script.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import moca_kernels as mk  # noqa: E402
from moca_kernels import _ext, tuning  # noqa: E402

from bench.bench_attention import HEADLINE_DOCS, build_mask, inputs  # noqa: E402


def attention_bwd(device, smoke):
    docs = [8, 8, 16] if smoke else HEADLINE_DOCS
    Hq, Hkv, D = (2, 1, 32) if smoke else (16, 2, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    q, k, v, do = inputs(sum(docs), Hq, Hkv, D, dtype, device)
    mask = build_mask("documents", docs, device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with tuning.override(autotune=False, attention_dq="separate"):
        out = mk.masked_attention(*leaves, mask, impl="triton")
        grads = torch.autograd.grad(out, leaves, do)
    return f"attention fwd+bwd T={sum(docs)} Hq={Hq} Hkv={Hkv} D={D} {dtype}: |dq| {grads[0].float().norm():.3e}"


def masked_patch_loss(device, smoke):
    N, P = (16, 48) if smoke else (262144, 1176)
    dtype = torch.float32 if smoke else torch.bfloat16
    impl = "cuda" if device == "cuda" and _ext.available() else "triton"
    g = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(N, P, device=device, dtype=dtype, generator=g).requires_grad_()
    target = torch.randn(N, P, device=device, dtype=dtype, generator=g)
    mask = torch.rand(N, device=device, generator=g) < 0.5
    with tuning.override(autotune=False):
        loss = mk.masked_patch_loss(pred, target, mask, norm_pix=True, impl=impl)
        loss.backward()
    return f"masked_patch_loss N={N} P={P} {dtype} impl={impl}: loss {loss.item():.4f}"


TARGETS = {"attention_bwd": attention_bwd, "masked_patch_loss": masked_patch_loss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", choices=sorted(TARGETS))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.targets:
        t0 = time.perf_counter()
        msg = TARGETS[name](device, args.smoke or device == "cpu")
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{msg} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
