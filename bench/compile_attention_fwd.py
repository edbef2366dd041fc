"""Compile masked_attention's forward kernels for sm_90a without a GPU and report, per config: registers and
spilled bytes (ptxas -v), shared memory, whether the main loop is on wgmma and pipelined (cp.async or TMA), and
whether Triton warp-specialized it (``ttg.warp_specialize`` in the TTGIR) and with how many warps in all.

Headline types: bf16, D = 128 (or --head-dim), owner query tiles of 128, strides divisible by 16, T a runtime
value. Runs with the installed triton; for the GPU machine's triton 3.6, point PYTHONPATH at an unpacked wheel:

    python bench/compile_attention_fwd.py                          # every forward variant's candidates
    PYTHONPATH=/tmp/tri36 python bench/compile_attention_fwd.py    # the same with triton 3.6
    python bench/compile_attention_fwd.py --variants ws --first    # the first candidate only (tests)

Prints one JSON line per config (``RESULT {...}``) then a table. A config that fails to compile is reported
with its error's last line instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from tools.sm90 import compile_sm90, ptxas_stats  # noqa: E402
from moca_kernels.attention import kernels_fwd, tiles  # noqa: E402


def compile_fwd(variant: str, cfg, head_dim: int = 128, q_tile: int = 128):
    """Stats of one forward config: variant "base" (cfg = (walk, warps, stages)) or "ws" / "tma"
    (cfg = (block_m, walk, warps, stages))."""
    bd = tiles.block_d(head_dim)
    if variant == "base":
        kernel, (walk, warps, stages), block_m = kernels_fwd._fwd_kernel, cfg, q_tile
        extra = dict(BLOCK_M=q_tile)
    else:
        kernel = kernels_fwd._fwd_ws_kernel
        block_m, walk, warps, stages = cfg
        extra = dict(Q_TILE=q_tile, BLOCK_M=block_m, WS=variant == "ws")
    ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", Lse="*fp32", Spans="*i32", QTable="*i32")
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_N=walk, DOT_PREC="tf32", **extra)
    if variant == "base":
        consts.update(EVEN_D=head_dim == bd, OFFS64=False)
    t0 = time.perf_counter()
    ck = compile_sm90(kernel, ptrs, consts, warps, stages, floats=("qk_scale",))
    secs = time.perf_counter() - t0
    regs, spill_st, spill_ld = ptxas_stats(ck.asm["ptx"])
    ttgir = ck.asm["ttgir"]
    return {
        "variant": variant, "cfg": list(cfg), "block_m": block_m, "regs": regs, "spill_st": spill_st,
        "spill_ld": spill_ld, "shared_kb": round(ck.metadata.shared / 1024),
        "warp_specialize": "ttg.warp_specialize" in ttgir,
        "wgmma": ttgir.count("warp_group_dot "), "async_copies": ttgir.count("async_copy_global_to_local"),
        "tma_loads": ttgir.count("async_tma_copy_global_to_local"),
        "total_warps": ck.metadata.num_warps,
        "global_scratch": getattr(ck.metadata, "global_scratch_size", 0), "compile_s": round(secs, 1),
    }


def configs(variant: str, first: bool, head_dim: int = 128):
    cuda = torch.device("cuda")
    bd = tiles.block_d(head_dim)
    if variant == "base":
        cands = tiles.all_candidates("fwd", torch.bfloat16, bd, cuda)
        if first:
            return cands[:1]
        extra = [(128, 8, 2), (32, 4, 3), (64, 4, 3)]   # attention_extra's forward configs (MOCA_ATTENTION_EXTRA)
        return cands + [c for c in extra if c not in cands]
    cands = tiles.fwd_desc_all_candidates(variant, torch.bfloat16, bd, cuda, 128)
    return cands[:1] if first else cands


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base", "ws", "tma"])
    ap.add_argument("--configs", nargs="*", default=None,
                    help="explicit configs as comma lists, e.g. 64,64,4,3 (ws) or 64,8,3 (base)")
    ap.add_argument("--first", action="store_true", help="only the first (default) candidate of each variant")
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), sm_90a, bf16, D={args.head_dim}")
    rows = []
    for variant in args.variants:
        cfgs = ([tuple(int(x) for x in c.split(",")) for c in args.configs] if args.configs
                else configs(variant, args.first, args.head_dim))
        for cfg in cfgs:
            try:
                r = compile_fwd(variant, cfg, args.head_dim)
            except Exception as exc:  # report and go on
                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                r = {"variant": variant, "cfg": list(cfg), "error": (lines[-1] if lines else type(exc).__name__)[:300]}
            print("RESULT " + json.dumps(r), flush=True)
            rows.append(r)
    print(f"\n{'variant':<8} {'config':<16} {'regs':>5} {'spill st/ld':>12} {'smem KB':>8} {'WS':>3} {'warps':>6} "
          f"{'wgmma':>6} {'cp.async':>9} {'tma':>4} {'s':>5}")
    for r in rows:
        cfg = ",".join(str(x) for x in r["cfg"])
        if "error" in r:
            print(f"{r['variant']:<8} {cfg:<16} FAILED: {r['error'][:120]}")
            continue
        print(f"{r['variant']:<8} {cfg:<16} {r['regs']:>5} {r['spill_st']:>5}/{r['spill_ld']:<6} {r['shared_kb']:>8} "
              f"{'yes' if r['warp_specialize'] else 'no':>3} {r['total_warps']:>6} {r['wgmma']:>6} "
              f"{r['async_copies']:>9} {r['tma_loads']:>4} {r['compile_s']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
