"""Benchmark: masked_patch_loss forward+backward (MAE loss of Stage 1) against naive torch and torch.compile.

Headline (DESIGN.md section 4): N=262144 rows, P=1176, bf16, half the rows counted, norm_pix, fwd+bwd.
Floor: read pred and target of the counted rows once, write the whole gradient once.

Kernel variants (backends "cuda:v2", "cuda:v2p", "triton:v2" of moca_kernels/losses/masked_patch_loss.py, passed as
impl=) run side by side: "moca cuda v1"
and "moca triton v1" (the original kernels), then "moca cuda v2", "moca cuda v2p", "moca triton v2", and each
cuda variant split into phases (forward alone; forward writing the gradient, no backward). The v1 cases run
first, so a failing new variant cannot spoil them. At the end each variant is checked against v1 on a smaller
shape (loss and gradient differences printed).
"""

from __future__ import annotations

import os
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


def moca(impl, variant, norm_pix):
    """masked_patch_loss on backend ``impl``, kernel variant ``variant`` (impl="cuda:v2p")."""
    spec = f"{impl}:{variant}"

    def run(p, t, m):
        return mk.masked_patch_loss(p, t, m, norm_pix=norm_pix, impl=spec)
    return run


def _unavailable(reason):
    def setup():
        raise RuntimeError(reason)
    return setup


def cases_for(N, P, dtype, device, norm_pix=True, smoke=False):
    naive = lambda p, t, m: reference.masked_patch_loss(p, t, m, norm_pix=norm_pix)  # noqa: E731
    # --smoke on CPU: inductor's C++ compile alone takes ~30 s on a small CPU; the case is reported as skipped
    skip_compile = smoke and device == "cpu"
    compiled = None if skip_compile else torch.compile(reference.masked_patch_loss)
    cuda = _ext.available()

    def fused(impl, variant):
        if impl == "cuda" and not cuda:
            return _unavailable(_ext.unavailable_reason())
        return make_setup(moca(impl, variant, norm_pix), N, P, dtype, device)

    def phases(impl, variant):
        """Which part costs what: forward alone (reads the counted rows), forward writing the gradient."""
        if impl == "cuda" and not cuda:
            return []
        fn = moca(impl, variant, norm_pix)
        return [Case(f"moca {impl} {variant}: forward only, no grad",
                     make_setup(fn, N, P, dtype, device, backward=False), note="reads half the bytes"),
                Case(f"moca {impl} {variant}: forward writing grad, no bwd",
                     make_setup(fn, N, P, dtype, device, backward=False, requires_grad=True))]

    best = "cuda" if cuda else "triton"
    return [
        Case("naive torch (fp32 math)", make_setup(naive, N, P, dtype, device)),
        Case("torch.compile", _unavailable("skipped in --smoke on CPU") if skip_compile else
             make_setup(lambda p, t, m: compiled(p, t, m, norm_pix=norm_pix), N, P, dtype, device)),
        Case("moca triton v1", fused("triton", "v1")),
        Case("moca cuda v1", fused("cuda", "v1")),
        *phases(best, "v1"),
        # variants prepared for measurement (bench/NOTES.md); a failing one reports its error, the others go on
        Case("moca triton v2", fused("triton", "v2")),
        Case("moca cuda v2", fused("cuda", "v2")),
        Case("moca cuda v2p", fused("cuda", "v2p")),
        *(phases("cuda", "v2") + phases("cuda", "v2p") if cuda else phases("triton", "v2")),
    ]


def variants_agree(device, dtype, N=4096, P=1176) -> None:
    """Each variant's loss and gradient against v1 of the same backend, on one random input (printed)."""
    g = torch.Generator(device=device).manual_seed(1)
    pred = torch.randn(N, P, device=device, dtype=dtype, generator=g)
    target = torch.randn(N, P, device=device, dtype=dtype, generator=g)
    mask = torch.rand(N, device=device, generator=g) < 0.5
    cuda = _ext.available() and torch.device(device).type == "cuda"
    for impl, variants in (("triton", ["v2"]), ("cuda", ["v2", "v2p"] if cuda else [])):
        if impl == "cuda" and not cuda:
            continue
        out = {}
        for v in ["v1"] + variants:
            try:
                p = pred.clone().requires_grad_()
                loss = moca(impl, v, True)(p, target, mask)
                loss.backward()
                out[v] = (loss.detach().double(), p.grad.double())
            except Exception as exc:  # report, go on
                print(f"variant check {impl} {v}: FAILED ({type(exc).__name__}: {str(exc)[:200]})")
        for v in variants:
            if v in out and "v1" in out:
                dl = ((out[v][0] - out["v1"][0]).abs() / out["v1"][0].abs()).item()
                dg = (out[v][1] - out["v1"][1]).abs().max().item() / out["v1"][1].abs().max().item()
                print(f"variant check {impl} {v} vs v1 (N={N}, P={P}, {dtype}): loss rel diff {dl:.2e}, "
                      f"grad max abs diff / max |grad| {dg:.2e}")


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
    parser = common_args(__doc__.splitlines()[1])
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest shape (N=8, P=48) that runs every case: the CPU test of bench/gpu_run.sh")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [(262144, 1176)] if cuda else [(4096, 1176)]
    if args.smoke:
        shapes = [(8, 48)]
    if cuda and not args.quick and not args.smoke:
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
        run_cases("masked_patch_loss fwd+bwd", cases_for(N, P, dtype, device, smoke=args.smoke), shape=dict(N=N, P=P, dtype=str(dtype),
                  counted="half", norm_pix=True), bytes_moved=bytes_moved, baseline="naive torch (fp32 math)",
                  warmup=args.warmup, rep=args.rep if not args.quick or args.smoke else 20, out=args.out, tag=f"masked_patch_loss_N{N}_P{P}")
    if cuda or os.environ.get("TRITON_INTERPRET") == "1":
        variants_agree(device, dtype, **(dict(N=8, P=48) if args.smoke else dict(N=4096 if cuda else 64)))


if __name__ == "__main__":
    sys.exit(main())
