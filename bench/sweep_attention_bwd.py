"""masked_attention's backward variants side by side with FlexAttention, at the headline shape, in one process.

T = 16384 (documents of bench_attention.HEADLINE_DOCS), Hq = 16, Hkv = 2, D = 128, bf16; masks "documents" and
"mixed". Variants (backends impl="triton", "triton:even", "triton:fused"; see moca_kernels/attention/launch.py):

* base   the default: dK/dV kernel, then dQ by its own kernel (tuning setting attention_dq="separate" here, which
         the H100 tuner chose; pass --dq auto to let it time atomics too, which compiles two more kernels);
* even   base + unmasked loads when T is a multiple of the walked tile, the 64-row dK/dV walk tried first;
* fused  even + dK/dV and dQ programs in one launch (no atomics).

Before timing a variant, its out / dq / dk / dv on the documents mask are compared with float32 attention
(reference.masked_attention on float32 copies): relative error max|ours - ref| / max|ref| per tensor. Then per
mask: forward + backward and backward alone (autograd.grad on a kept graph, includes the delta kernel), median
of CUDA-event times. One kernel-time breakdown of each variant's backward (documents) follows the table, and
the configs its tuner chose. FlexAttention (torch.compile'd, block mask built once outside the timing) is timed
the same way.

    python bench/sweep_attention_bwd.py                    # all variants + Flex (~60-90 s on an H100)
    python bench/sweep_attention_bwd.py --variants fused --no-flex
    python bench/sweep_attention_bwd.py --tune 3           # time every config candidate (slower: more compiles)

Without a GPU, TRITON_INTERPRET=1 runs a tiny smoke version (T = 128, fp32, ~1 min) of the same code path;
--smoke shrinks it to T = 32 (the test of bench/gpu_run.sh). --json PATH writes every row (median, p20, p80,
samples, timer) for bench/decide.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_attention import _flex_mask_mod, sweep_setup, write_rows  # noqa: E402
from bench.harness import kernel_breakdown, stats, time_call  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads(fn, q, k, v, do):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    gq, gk, gv = torch.autograd.grad(out, leaves, do)
    return [out.detach(), gq, gk, gv]


def timings(fn, q, k, v, do, warmup, rep):
    """(fwd+bwd, bwd-only): harness.stats dicts (median_ms, p20_ms, p80_ms, timer, ...)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd_bwd():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, do)
    full = stats(time_call(fwd_bwd, warmup=warmup, rep=rep))
    out = fn(*leaves)

    def bwd():
        torch.autograd.grad(out, leaves, do, retain_graph=True)
    back = stats(time_call(bwd, warmup=warmup, rep=rep))
    return full, back


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base", "even", "fused"])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--tune", default="2", help="config candidates timed per kernel (tuning setting attention_tune, "
                    "as MOCA_ATTENTION_TUNE)")
    ap.add_argument("--dq", default="separate", choices=["separate", "atomic", "auto"],
                    help="dQ route of the base / even variants (auto: timed, compiles the atomic kernels too)")
    ap.add_argument("--rep", type=int, default=15)
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU (interpreter) only: T = 32 instead of 128")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (bench/decide.py reads them)")
    args = ap.parse_args(argv)
    from moca_kernels import tuning

    settings = dict(attention_tune=int(args.tune))
    if args.dq != "auto":
        settings["attention_dq"] = args.dq
    with tuning.override(**settings):
        return _main(args)


def _main(args) -> int:
    import moca_kernels as mk
    from moca_kernels import reference, tuning

    t_start = time.perf_counter()
    setup = sweep_setup(args)
    if setup is None:
        return 1
    (dev, dt, T, Hq, Hkv, D), (q, k, v, do), masks = setup
    print(f"T={T} Hq={Hq} Hkv={Hkv} D={D} {dt}; tune={args.tune} dq={args.dq}")

    ref = grads(lambda a, b, c: reference.masked_attention(a.float(), b.float(), c.float(), masks["documents"]),
                q, k, v, do.float())
    warmup = 0 if args.smoke else 3
    rows = []

    def dump(rows):
        """--json: every row so far (after each variant, so a run cut off by its time limit keeps what it did)."""
        if not args.json:
            return
        write_rows(args.json, "attention_bwd", T, Hq, Hkv, D, dt, tune=args.tune, dq=args.dq,
                   rows=[dict(variant="flex" if name == "FlexAttention" else name, errors=errs,
                              timings={f"{kind}.{part}": res[kind][i] for kind in res
                                       for i, part in enumerate(("fwd_bwd", "bwd"))})
                         for name, res, errs, secs in rows])
    def impl(variant):
        return "triton" if variant == "base" else "triton:" + variant

    for variant in args.variants:
        t0 = time.perf_counter()
        try:
            mine = grads(lambda a, b, c: mk.masked_attention(a, b, c, masks["documents"], impl=impl(variant)),
                         q, k, v, do)
            errs = [rel_err(a, b) for a, b in zip(mine, ref)]
            del mine
            res = {kind: timings(lambda a, b, c, m=m: mk.masked_attention(a, b, c, m, impl=impl(variant)), q, k, v, do,
                                 warmup, args.rep)
                   for kind, m in masks.items()}
        except Exception as exc:  # a variant that fails to compile or run: report it, go on
            print(f"{variant}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        rows.append((variant, res, errs, time.perf_counter() - t0))
        dump(rows)
        print(f"  {variant} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        t0 = time.perf_counter()
        flex = torch.compile(flex_attention)
        qb, kb, vb, dob = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v, do))
        res, errs = {}, None
        for kind, m in masks.items():
            bm = create_block_mask(_flex_mask_mod(m), None, None, T, T, device=dev)
            fn = lambda a, b, c, bm=bm: flex(a, b, c, block_mask=bm, enable_gqa=True)  # noqa: E731
            if kind == "documents":
                out = grads(fn, qb, kb, vb, dob)
                back = [out[0][0].transpose(0, 1), out[1][0].transpose(0, 1), out[2][0].transpose(0, 1),
                        out[3][0].transpose(0, 1)]
                errs = [rel_err(a, b) for a, b in zip(back, ref)]
            res[kind] = timings(fn, qb, kb, vb, dob, warmup, args.rep)
        rows.append(("FlexAttention", res, errs, time.perf_counter() - t0))

    print(f"\n{'variant':<14} {'docs f+b':>9} {'docs bwd':>9} {'mixed f+b':>10} {'mixed bwd':>10}   "
          f"max rel err out / dq / dk / dv (documents, vs fp32)")
    for name, res, errs, secs in rows:
        e = " / ".join(f"{x:.2e}" for x in errs) if errs else "-"
        print(f"{name:<14} {res['documents'][0]['median_ms']:9.3f} {res['documents'][1]['median_ms']:9.3f} "
              f"{res['mixed'][0]['median_ms']:10.3f} {res['mixed'][1]['median_ms']:10.3f}   {e}   ({secs:.0f} s)")
    dump(rows)
    print("targets (H100): documents fwd+bwd <= 3.25 ms, mixed fwd+bwd <= 2.45 ms")

    if not args.no_breakdown:
        for variant in [r[0] for r in rows if r[0] != "FlexAttention"]:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = mk.masked_attention(*leaves, masks["documents"], impl=impl(variant))
            kernel_breakdown(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), calls=3, top=6,
                             title=f"{variant} backward (documents)")
    print("\nconfigs chosen (kernel, head dim, dtype, group, ...): (walked tile(s), warps, stages)")
    for key, cfg in tuning.cached("masked_attention").items():
        print(f"  {key[1:-1]}: {cfg}")
    print(f"\nsweep_attention_bwd total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
