"""masked_attention's forward variants side by side with FlexAttention, at the headline shape, in one process.

T = 16384 (documents of bench_attention.HEADLINE_DOCS), Hq = 16, Hkv = 2, D = 128, bf16; masks "documents" and
"mixed". Variants (backends impl="triton" and "triton:ws" / "triton:tma"; see moca_kernels/attention/launch.py):

* base  the default: three loops (partial / full / partial key tiles), pointer loads (cp.async), 8 warps;
* ws    one masked loop over every non-empty key tile, loads through tensor descriptors (TMA), warp-specialized
        by Triton (producer warp group + two consumer warp groups, 12 warps);
* tma   the ws kernel without warp specialization (tells the gain of WS from that of TMA and the single loop).

Per variant: out and lse on both masks against float32 attention (reference.masked_attention on float32
copies; max |ours - ref| / max |ref| for out, max |ours - ref| for lse), then forward time per mask (no grad,
median of CUDA-event times), the config its tuner chose, and which kernel ran (a variant whose inputs cannot be
described raises its reasons, reported as a failed row). Then every candidate config of every variant (compiled by then): its out against
fp32 on both masks, its documents forward time. Last, FlexAttention's forward (torch.compile'd, block mask built
once outside the timing). --with-bwd adds forward + backward on the documents mask (default backward).

    python bench/sweep_attention_fwd.py                      # ~30-45 s on an H100
    python bench/sweep_attention_fwd.py --variants base ws --no-flex

Without a GPU, TRITON_INTERPRET=1 runs a tiny smoke version (T = 128, float32) of the same code path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_attention import _flex_mask_mod, sweep_setup, write_rows  # noqa: E402
from bench.harness import stats, time_call, time_fn  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def median_ms(fn, warmup: int, rep: int) -> float:
    return statistics.median(time_fn(fn, warmup=warmup, rep=rep))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base", "ws", "tma"])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--tune", default="", help="config candidates timed per kernel (tuning setting attention_tune, "
                    "as MOCA_ATTENTION_TUNE; default: every candidate of each variant)")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--no-configs", action="store_true", help="skip the per-config table")
    ap.add_argument("--with-bwd", action="store_true", help="also forward + backward on the documents mask")
    ap.add_argument("--smoke", action="store_true", help="CPU (interpreter) only: T = 32 instead of 128")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (bench/decide.py reads them)")
    args = ap.parse_args(argv)
    from moca_kernels import tuning

    with tuning.override(**(dict(attention_tune=int(args.tune)) if args.tune else {})):
        return _main(args)


def _main(args) -> int:
    import moca_kernels as mk
    from moca_kernels import reference, tuning
    from moca_kernels.attention import tiles

    t_start = time.perf_counter()
    setup = sweep_setup(args)
    if setup is None:
        return 1
    (dev, dt, T, Hq, Hkv, D), (q, k, v, do), masks = setup
    print(f"T={T} Hq={Hq} Hkv={Hkv} D={D} {dt}; tune={args.tune or 'all'}")
    refs = {kind: reference.masked_attention(q.float(), k.float(), v.float(), m, return_lse=True)
            for kind, m in masks.items()}
    device = torch.device(dev)
    q_tile = tiles.plan(device, dt, D)[0]
    group = Hq // Hkv

    def tuned_key(variant):
        return (tiles.OP, "fwd" if variant == "base" else "fwd_" + variant, D, dt, group, q_tile, device)

    def impl(variant):
        return "triton" if variant == "base" else "triton:" + variant

    warmup, rows, stat_rows = 0 if args.smoke else 3, [], {}

    def dump(rows):
        """--json: every row so far (after each variant, so a run cut off by its time limit keeps what it did)."""
        if not args.json:
            return
        write_rows(args.json, "attention_fwd", T, Hq, Hkv, D, dt, tune=args.tune or "all",
                   rows=[dict(variant="flex" if name == "FlexAttention" else name, errors=errs, config=str(cfg),
                              kernel=ran, timings={(k if "." in k else f"{k}.fwd"): v
                                                   for k, v in stat_rows["flex" if name == "FlexAttention"
                                                                         else name].items()})
                         for name, times, errs, cfg, ran, secs in rows])
    for variant in args.variants:
        t0 = time.perf_counter()
        try:
            errs = []
            with torch.no_grad():
                for kind, m in masks.items():
                    out, lse = mk.masked_attention(q, k, v, m, return_lse=True, impl=impl(variant))
                    errs.append((rel_err(out, refs[kind][0]), (lse - refs[kind][1]).abs().max().item()))
                ran = "_fwd_kernel" if variant == "base" else "_fwd_ws_kernel"
                full = {kind: stats(time_call(lambda m=m: mk.masked_attention(q, k, v, m, impl=impl(variant)),
                                              warmup, args.rep))
                        for kind, m in masks.items()}
                times = {kind: st["median_ms"] for kind, st in full.items()}
            if args.with_bwd:
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]

                def fwd_bwd():
                    out = mk.masked_attention(*leaves, masks["documents"], impl=impl(variant))
                    torch.autograd.grad(out, leaves, do)
                full["documents.fwd_bwd"] = stats(time_call(fwd_bwd, warmup, max(5, args.rep // 2)))
                times["docs f+b"] = full["documents.fwd_bwd"]["median_ms"]
        except Exception as exc:  # a variant that fails to compile or run: report it, go on
            print(f"{variant}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        rows.append((variant, times, errs, tuning.CACHE.get(tuned_key(variant)), ran, time.perf_counter() - t0))
        stat_rows[variant] = full
        dump(rows)
        print(f"  {variant} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        t0 = time.perf_counter()
        flex = torch.compile(flex_attention)
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
        times, errs, full = {}, [], {}
        with torch.no_grad():
            for kind, m in masks.items():
                bm = create_block_mask(_flex_mask_mod(m), None, None, T, T, device=dev)
                fn = lambda bm=bm: flex(qb, kb, vb, block_mask=bm, enable_gqa=True)  # noqa: E731
                errs.append((rel_err(fn()[0].transpose(0, 1), refs[kind][0]), float("nan")))
                full[kind] = stats(time_call(fn, warmup, args.rep))
                times[kind] = full[kind]["median_ms"]
        stat_rows["flex"] = full
        rows.append(("FlexAttention", times, errs, None, "flex_attention", time.perf_counter() - t0))

    print(f"\n{'variant':<14} {'docs fwd':>9} {'mixed fwd':>10} {'docs f+b':>9}   "
          f"out rel err / lse abs err vs fp32 (documents; mixed)   config   kernel")
    for name, times, errs, cfg, ran, secs in rows:
        e = "; ".join(f"{a:.1e} / {b:.1e}" for a, b in errs)
        fb = f"{times['docs f+b']:9.3f}" if "docs f+b" in times else f"{'-':>9}"
        print(f"{name:<14} {times['documents']:9.3f} {times['mixed']:10.3f} {fb}   {e}   {cfg}   {ran}   "
              f"({secs:.0f} s)")
    print("target (H100): documents fwd <= 0.83 ms; floor 0.53 ms (documents), 0.32 ms (mixed) at 738 TFLOP/s")
    dump(rows)

    if not args.no_configs:
        print("\nevery candidate: documents forward ms, out rel err vs fp32 (documents / mixed); config: base "
              "(walk, warps, stages), ws / tma (rows per program, walk, warps, stages)")
        for variant in [r[0] for r in rows if r[0] != "FlexAttention"]:
            key = tuned_key(variant)
            if key not in tuning.CACHE:
                continue
            chosen = tuning.CACHE[key]
            cands = (tiles.candidates("fwd", dt, tiles.block_d(D), device) if variant == "base" else
                     tiles.fwd_desc_candidates(variant, dt, tiles.block_d(D), device, q_tile))
            for cfg in cands:
                tuning.CACHE[key] = cfg   # the tuner's cache decides the config: pin each candidate in turn
                try:
                    with torch.no_grad():
                        err = {kind: rel_err(mk.masked_attention(q, k, v, m, impl=impl(variant)), refs[kind][0])
                               for kind, m in masks.items()}
                        ms = median_ms(lambda: mk.masked_attention(q, k, v, masks["documents"], impl=impl(variant)),
                                       warmup, args.rep)
                    print(f"  {variant:<5} {str(cfg):<18} {ms:8.3f}   out rel err {err['documents']:.1e} / "
                          f"{err['mixed']:.1e}{'   (chosen)' if cfg == chosen else ''}")
                except Exception as exc:
                    print(f"  {variant:<5} {str(cfg):<18} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]}")
            tuning.CACHE[key] = chosen
    print(f"\nsweep_attention_fwd total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
