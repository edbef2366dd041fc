"""Benchmark: masked_patch_loss forward+backward (MAE loss of Stage 1) against naive torch and torch.compile.

Headline (DESIGN.md section 4): N=262144 rows, P=1176, bf16, half the rows counted, norm_pix, fwd+bwd.
Floor: read pred and target of the counted rows once, write the whole gradient once.
"""

from __future__ import annotations

import sys

import torch

try:
    from bench.harness import Case, common_args, fmt_bytes, floor_ms, run_cases
except ImportError:  # run as a script from bench/
    from harness import Case, common_args, fmt_bytes, floor_ms, run_cases

import moca_kernels as mk
from moca_kernels import _ext, reference


def make_setup(fn, N, P, dtype, device, backward=True, requires_grad=None):
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        pred = torch.randn(N, P, device=device, dtype=dtype, generator=g).requires_grad_(
            backward if requires_grad is None else requires_grad)
        target = torch.randn(N, P, device=device, dtype=dtype, generator=g)
        mask = torch.rand(N, device=device, generator=g) < 0.5

        def run():
            loss = fn(pred, target, mask)
            if backward:
                loss.backward()
                pred.grad = None  # freed inside the call, so peak extra memory counts the gradient (as DESIGN.md)
            return loss
        return run
    return setup


def cases_for(N, P, dtype, device, norm_pix=True):
    naive = lambda p, t, m: reference.masked_patch_loss(p, t, m, norm_pix=norm_pix)  # noqa: E731
    compiled = torch.compile(reference.masked_patch_loss)
    cases = [
        Case("naive torch (fp32 math)", make_setup(naive, N, P, dtype, device)),
        Case("torch.compile", make_setup(lambda p, t, m: compiled(p, t, m, norm_pix=norm_pix), N, P, dtype, device)),
        Case("moca triton", make_setup(lambda p, t, m: mk.masked_patch_loss(p, t, m, norm_pix=norm_pix, impl="triton"),
                                       N, P, dtype, device)),
    ]
    if _ext.available():
        cases.append(Case("moca cuda", make_setup(
            lambda p, t, m: mk.masked_patch_loss(p, t, m, norm_pix=norm_pix, impl="cuda"), N, P, dtype, device)))
    else:
        cases.append(Case("moca cuda", lambda: (_ for _ in ()).throw(RuntimeError(_ext.unavailable_reason()))))
    # phases of the fused op (which part costs what): forward alone, forward writing the gradient
    best = "cuda" if _ext.available() else "triton"
    ours = lambda p, t, m: mk.masked_patch_loss(p, t, m, norm_pix=norm_pix, impl=best)  # noqa: E731
    cases.append(Case(f"moca {best}: forward only, no grad", make_setup(ours, N, P, dtype, device, backward=False)))
    cases.append(Case(f"moca {best}: forward writing grad, no bwd", make_setup(
        ours, N, P, dtype, device, backward=False, requires_grad=True)))
    return cases


def gradient_adopted(device, dtype, impl) -> str:
    """Whether autograd keeps the fused gradient buffer as pred.grad (yes) or copies it (a whole extra pass)."""
    from moca_kernels import _alloc

    made, original = [], _alloc.empty_like

    def recording(t, dtype=None):
        out = original(t, dtype)
        made.append(out.data_ptr())
        return out

    pred = torch.randn(64, 1176, device=device, dtype=dtype, requires_grad=True)
    _alloc.empty_like = recording
    try:
        mk.masked_patch_loss(pred, torch.randn_like(pred), impl=impl).backward()
    finally:
        _alloc.empty_like = original
    return "yes" if pred.grad.data_ptr() in made else "NO (copied)"


def main(argv=None):
    args = common_args(__doc__.splitlines()[1]).parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [(262144, 1176)] if cuda else [(4096, 1176)]
    if cuda and not args.quick:
        shapes += [(65536, 1176), (262144, 4704 // 4 * 4)]
    if not cuda:
        print("no GPU: a CPU smoke run at a small shape (triton skipped unless TRITON_INTERPRET=1)")
    if cuda:
        for impl in (["cuda"] if _ext.available() else []) + ["triton"]:
            print(f"fused gradient adopted as pred.grad ({impl}): {gradient_adopted(device, dtype, impl)}")
    for N, P in shapes:
        el = torch.finfo(dtype).bits // 8
        bytes_moved = (2 * (N // 2) * P + N * P) * el  # counted rows of pred+target read, grad written
        print(f"\nmasked_patch_loss N={N} P={P} {dtype}: floor {fmt_bytes(bytes_moved)} -> "
              f"{floor_ms(bytes_moved=bytes_moved):.3f} ms at 3.0 TB/s")
        run_cases("masked_patch_loss fwd+bwd", cases_for(N, P, dtype, device), shape=dict(N=N, P=P, dtype=str(dtype),
                  counted="half", norm_pix=True), bytes_moved=bytes_moved, baseline="naive torch (fp32 math)",
                  warmup=args.warmup, rep=args.rep if not args.quick else 20, out=args.out, tag=f"masked_patch_loss_N{N}_P{P}")


if __name__ == "__main__":
    sys.exit(main())
