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


def make_setup(fn, N, P, dtype, device, backward=True):
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        pred = torch.randn(N, P, device=device, dtype=dtype, generator=g).requires_grad_(backward)
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
    return cases


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
