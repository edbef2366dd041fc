"""Sweep masked_attention's owner tiles and a wider config search at the headline shape, in one GPU call.

Each variant runs in a fresh process (its own tuning cache) under the tuning environment variables of
moca_kernels/tuning.py (MOCA_ATTENTION_TILES="q_tile,k_tile", MOCA_ATTENTION_EXTRA=1 for more
walked-tile/warps/stages candidates, MOCA_ATTENTION_MIN_DKDV_PROGRAMS). It
prints, per variant: documents forward, documents forward+backward, mixed forward+backward (median ms), the
error of out/dq/dk/dv against the fp32 reference, and the configs the tuner chose.

    python bench/sweep_attention.py                 # the default variant list
    python bench/sweep_attention.py 128,64 64,64    # owner tiles to try (with the wider search)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child() -> None:
    import statistics

    import torch

    sys.path.insert(0, str(ROOT))
    import moca_kernels as mk
    from bench.bench_attention import HEADLINE_DOCS, build_mask, inputs
    from bench.harness import time_fn
    from moca_kernels import reference, tuning

    dev, dt = "cuda", torch.bfloat16
    T = sum(HEADLINE_DOCS)
    q, k, v, do = inputs(T, 16, 2, 128, dt, dev)
    out = {}
    for kind, backward in (("documents", False), ("documents", True), ("mixed", True)):
        mask = build_mask(kind, HEADLINE_DOCS, dev)
        for t in (q, k, v):
            t.requires_grad_(backward)

        def run():
            o = mk.masked_attention(q, k, v, mask)
            if backward:
                q.grad = k.grad = v.grad = None
                o.backward(do)
            return o
        run()  # compile and tune
        out[f"{kind} {'fwd+bwd' if backward else 'fwd'}"] = statistics.median(time_fn(run, warmup=3, rep=15))
        if kind == "documents" and backward:
            mine = [run().detach()] + [t.grad.detach() for t in (q, k, v)]
            leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref = reference.masked_attention(*leaves, mask)
            ref.backward(do.float())
            errs = [((a.float() - b.float()).norm() / b.float().norm()).item()
                    for a, b in zip(mine, [ref.detach()] + [t.grad for t in leaves])]
            out["rel err out/dq/dk/dv"] = [round(e, 5) for e in errs]
    tuned = tuning.cached("masked_attention")
    out["configs"] = {str(key[1:-1]): cfg for key, cfg in tuned.items() if key[1] != "dq_strategy"}
    out["dq route"] = {str(key[2:-1]): s for key, s in tuned.items() if key[1] == "dq_strategy"}
    print("RESULT " + json.dumps(out))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--child"]:
        child()
        return 0
    variants = [dict(MOCA_ATTENTION_TILES=t, MOCA_ATTENTION_EXTRA="1") for t in (argv or ["128,128", "128,64", "64,64"])]
    print(f"{'variant':<40} {'docs fwd':>9} {'docs f+b':>9} {'mixed f+b':>10}  rel err (out, dq, dk, dv)")
    for var in variants:
        t0 = time.perf_counter()
        env = dict(os.environ, **var)
        env.pop("MOCA_ATTENTION_TUNE", None)
        proc = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                              cwd=str(ROOT), timeout=240)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        name = " ".join(f"{k.replace('MOCA_ATTENTION_', '').lower()}={v}" for k, v in var.items())
        if line is None:
            print(f"{name:<40} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        print(f"{name:<40} {r['documents fwd']:9.3f} {r['documents fwd+bwd']:9.3f} {r['mixed fwd+bwd']:10.3f}  "
              f"{r.get('rel err out/dq/dk/dv')}  ({time.perf_counter() - t0:.0f} s)")
        print(f"    configs {r['configs']}  dq {r['dq route']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
