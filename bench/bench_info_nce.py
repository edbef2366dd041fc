"""Benchmark: info_nce forward+backward (Stage 2 InfoNCE) against naive fp32, naive bf16 and Inf-CL.

Headline (DESIGN.md section 4): B = M = 32768 queries x documents, D = 2048, bf16, temperature 0.03,
forward + backward. Floor with O(B) memory: the logits are formed twice (once for the LSE, once for the
gradients) and both gradients are GEMMs: 8 B M D FLOP = 17.6 TFLOP, 23.8 ms at 738 TFLOP/s.
Outside --quick: a scaling sweep B = M = 4096 ... 262144 (time should grow as B^2, memory as B).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

try:
    from bench.harness import Case, common_args, floor_ms, peer, run_cases
except ImportError:  # run as a script from bench/
    from harness import Case, common_args, floor_ms, peer, run_cases

import moca_kernels as mk

TEMPERATURE = 0.03


def inputs(B, M, D, dtype, device, grad):
    g = torch.Generator(device=device).manual_seed(0)
    q = F.normalize(torch.randn(B, D, device=device, generator=g), dim=-1).to(dtype).requires_grad_(grad)
    d = F.normalize(torch.randn(M, D, device=device, generator=g), dim=-1).to(dtype).requires_grad_(grad)
    return q, d


def make_setup(loss_fn, B, M, D, dtype, device, backward=True):
    def setup():
        q, d = inputs(B, M, D, dtype, device, backward)

        def run():
            if backward:
                q.grad = d.grad = None     # the previous gradients are freed before this call allocates its own
                loss = loss_fn(q, d)
                loss.backward()
            else:
                with torch.no_grad():
                    loss = loss_fn(q, d)
            return loss
        return run
    return setup


def naive(q, d):
    """The textbook loss: [B, M] logits in the inputs' dtype, cross-entropy, autograd."""
    logits = (q @ d.T) / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def inf_cl(q, d):
    from inf_cl import cal_flash_loss  # inf-cl 1.2.1: (q, k, labels=None, scale=None, head_dim=256) -> [B] losses

    return cal_flash_loss(q, d, None, 1.0 / TEMPERATURE).mean()


def ours(q, d):
    return mk.info_nce(q, d, TEMPERATURE, impl="triton")


def headline_cases(B, M, D, device, lowp=torch.bfloat16):
    bf16 = lowp

    def inf_cl_setup():   # Inf-CL is imported (or found missing) when its case runs, not when the list is built
        missing = peer("inf_cl") or (None if device == "cuda" else "Inf-CL runs on CUDA only")
        if missing:
            raise RuntimeError(missing)
        return make_setup(inf_cl, B, M, D, bf16, device)()

    return [
        Case("naive fp32 (logits materialised)", make_setup(naive, B, M, D, torch.float32, device)),
        Case("naive bf16 (logits materialised)", make_setup(naive, B, M, D, bf16, device)),
        Case("Inf-CL cal_flash_loss (fp32 inside)", inf_cl_setup),
        Case("moca triton", make_setup(ours, B, M, D, bf16, device)),
        Case("moca triton, forward only", make_setup(ours, B, M, D, bf16, device, backward=False),
             note="not fwd+bwd"),
    ]


def agreement(B, M, D, device, lowp=torch.bfloat16):
    """Our bf16 loss and gradients against the naive fp32 computation on the headline inputs (sanity)."""
    q, d = inputs(B, M, D, lowp, device, True)
    loss = ours(q, d)
    loss.backward()
    q32, d32 = q.detach().float().requires_grad_(), d.detach().float().requires_grad_()
    ref = naive(q32, d32)
    ref.backward()

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    print(f"  agreement with naive fp32: loss {loss.item():.6f} vs {ref.item():.6f}; max rel err "
          f"dq {rel(q.grad, q32.grad):.2e}, ddoc {rel(d.grad, d32.grad):.2e}")


def main(argv=None):
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=int, nargs="+", default=None, metavar="B",
                        help="run only the scaling sweep, at these B = M (e.g. --sweep 262144)")
    parser.add_argument("--smoke", action="store_true",
                        help="without a GPU: B = M = 32, D = 16, one timed call (the CPU test of bench/gpu_run.sh)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            print("no GPU: info_nce's triton kernels need one (or TRITON_INTERPRET=1 for a CPU smoke run)")
            return 0
        n, d, (warmup, rep) = (32, 16, (0, 1)) if args.smoke else (96, 40, (1, 2))
        print(f"no GPU: a CPU smoke run of the script at B=M={n}, D={d} "
              "(fp16 stands in for bf16; timings mean nothing)")
        agreement(n, n, d, "cpu", torch.float16)
        run_cases("info_nce fwd+bwd", headline_cases(n, n, d, "cpu", torch.float16),
                  shape=dict(B=n, M=n, D=d, dtype="float16"), flops=8.0 * n * n * d,
                  baseline="naive bf16 (logits materialised)", warmup=warmup, rep=rep, out=args.out,
                  tag="info_nce_cpu_smoke")
        return 0
    device = "cuda"
    B = M = 32768
    D = 2048
    flops = 8.0 * B * M * D
    warmup, rep = (2, 10) if args.quick else (args.warmup, args.rep)
    if args.sweep:
        return sweep(args.sweep, D, device, warmup, rep, args.out)
    print(f"info_nce B=M={B} D={D} bf16 fwd+bwd: floor {flops / 1e12:.1f} TFLOP -> {floor_ms(flops):.1f} ms at "
          f"738 TFLOP/s (naive forms the logits once: 6 B M D)")
    agreement(B, M, D, device)
    run_cases("info_nce fwd+bwd", headline_cases(B, M, D, device),
              shape=dict(B=B, M=M, D=D, dtype="bfloat16", temperature=TEMPERATURE), flops=flops,
              baseline="naive bf16 (logits materialised)", warmup=warmup, rep=rep, out=args.out,
              tag=f"info_nce_B{B}_D{D}")
    if args.quick:
        return 0
    return sweep((4096, 8192, 16384, 32768, 65536, 131072, 262144), D, device, warmup, rep, args.out)


def sweep(sizes, D, device, warmup, rep, out):
    print(f"\nscaling sweep (moca triton, B = M, D = {D}, bf16, fwd+bwd): time ~ B^2, memory ~ B")
    rows = []
    for n in sizes:
        f = 8.0 * n * n * D
        cases = [Case("moca triton", make_setup(ours, n, n, D, torch.bfloat16, device))]
        if n <= 65536:
            cases.append(Case("naive bf16 (logits materialised)",
                              make_setup(naive, n, n, D, torch.bfloat16, device)))
        big = n >= 65536
        rep_n = run_cases("info_nce fwd+bwd scaling", cases, shape=dict(B=n, M=n, D=D, dtype="bfloat16"), flops=f,
                          baseline=None, warmup=1 if big else warmup, rep=3 if big else rep, out=out,
                          tag=f"info_nce_sweep_B{n}")
        rows.append((n, rep_n.results[0]))
    print("\n| B = M | ms | ms / (B/32768)^2 | extra GiB | GiB / (B/32768) |")
    print("|---|---|---|---|---|")
    for n, r in rows:
        if r.median_ms is None:
            print(f"| {n} | -- | | | | {r.error}")
            continue
        s = n / 32768
        print(f"| {n} | {r.median_ms:.2f} | {r.median_ms / s ** 2:.2f} | {r.peak_extra_gib:.2f} | "
              f"{r.peak_extra_gib / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
