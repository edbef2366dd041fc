"""Benchmark: Stage 1's data path (moca.data.stream) on synthetic shards: peak memory and start-up time against the
dataset's size, and records/s and tokens/s of one reader (= one DataLoader worker).

Generates JSONL shards of text-only records (default 10k, 100k and 1M records, 16 shards each, ~120 words a
record) and a smaller image case (records with one PNG file each, 448 x 448 -> 256 merged image tokens at the
official Qwen2.5-VL pixel bounds). Each measurement runs in a fresh subprocess (``ru_maxrss`` is a high-water
mark): build the loader, take the first micro-batch (start-up), then read ``--measure`` records through the
packing loader with the tiny tokenizer and report records/s and tokens/s. ``--baseline`` also measures the
in-memory path it replaced (``RecordSet`` + ``PackingLoader``: every line in memory on every rank).

    python bench/bench_data_stream.py                       # 10k, 100k, 1M text + image case
    python bench/bench_data_stream.py --sizes 10000 100000 --image-sizes 1000 --baseline

Prints a table and writes ``bench/results/data-stream-<host>-<date>.json``. The tokenizer is moca's small shipped
one (not Qwen's 151k-entry BPE), so tokens/s is indicative; CPU numbers are only comparable on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of and to in is was for on with as by at from that this which image text document table figure "
         "model data page report city river mountain market history science music colour shape circle square "
         "blue red green small large north south quickly slowly measured").split()


def write_text_shards(d: Path, n: int, shards: int = 16, words: int = 120, seed: int = 0) -> Path:
    """``shards`` JSONL files holding ``n`` text records in total (skipped when already there)."""
    d.mkdir(parents=True, exist_ok=True)
    done = d / "DONE"
    if done.exists():
        return d
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(4096)]   # bodies, reused (fast to write)
    per = [n // shards + (1 if i < n % shards else 0) for i in range(shards)]
    k = 0
    for s, m in enumerate(per):
        with open(d / f"text-{s:05d}.jsonl", "w") as f:
            for _ in range(m):
                f.write(json.dumps({"id": f"t{k}", "text": f"{k} {rng.choice(pool)}"}) + "\n")
                k += 1
    done.write_text(str(n))
    return d


def write_image_shards(d: Path, n: int, shards: int = 4, n_images: int = 64, side: int = 448, seed: int = 0) -> Path:
    """JSONL records each with one of ``n_images`` random PNG files (side x side) and ~40 words."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    done = d / "DONE"
    if done.exists():
        return d
    (d / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
    r = random.Random(seed)
    per = [n // shards + (1 if i < n % shards else 0) for i in range(shards)]
    k = 0
    for s, m in enumerate(per):
        with open(d / f"img-{s:05d}.jsonl", "w") as f:
            for _ in range(m):
                text = " ".join(r.choice(WORDS) for _ in range(40))
                f.write(json.dumps({"id": f"i{k}", "content": [{"image": f"images/{k % n_images}.png"},
                                                                {"text": text}]}) + "\n")
                k += 1
    done.write_text(str(n))
    return d


def child(args) -> dict:
    """One measurement (run in a fresh process)."""
    t0 = time.perf_counter()
    from moca.data.processor import MocaProcessor

    proc = MocaProcessor.tiny()
    if args.images:      # the official Qwen2.5-VL bounds: 256 .. 1024 merged tokens per image
        proc.image_spec.min_pixels, proc.image_spec.max_pixels = 256 * 28 * 28, 1024 * 28 * 28
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    if args.loader == "stream":
        from moca.data.stream import StreamLoader

        loader = StreamLoader([{"name": "bench", "path": args.dir}], proc, args.budget, seed=0,
                              num_workers=args.workers)
    else:
        from moca.data.loader import PackingLoader, RecordSet
        from moca.data.stream import expand_paths

        loader = PackingLoader(RecordSet(expand_paths(args.dir)), proc, args.budget, seed=0)
    first = loader.next_micro_batch()
    startup = time.perf_counter() - t1
    recs, toks = len(first), sum(len(s) for s in first)
    t2 = time.perf_counter()
    while recs < args.measure:
        b = loader.next_micro_batch()
        recs += len(b)
        toks += sum(len(s) for s in b)
    dt = time.perf_counter() - t2
    if hasattr(loader, "close"):
        loader.close()
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    readers = max(1, args.workers)
    return {"records": args.records, "loader": args.loader, "workers": args.workers, "images": args.images,
            "import_s": t_import, "startup_s": startup, "peak_rss_mib": me, "peak_rss_worker_mib": kids,
            "records_per_s": recs / dt, "tokens_per_s": toks / dt,
            "records_per_s_per_worker": recs / dt / readers, "tokens_per_s_per_worker": toks / dt / readers,
            "tokens_per_record": toks / max(recs, 1), "measured_records": recs}


def run_child(d: Path, n: int, loader: str, workers: int, images: bool, measure: int, budget: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--dir", str(d), "--records", str(n), "--loader", loader,
           "--workers", str(workers), "--measure", str(measure), "--budget", str(budget)] + (["--images"] if images else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--image-sizes", type=int, nargs="*", default=[2_000, 20_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader workers (0 = in process)")
    ap.add_argument("--measure", type=int, default=3000, help="records read per measurement (text)")
    ap.add_argument("--measure-images", type=int, default=300)
    ap.add_argument("--budget", type=int, default=4096, help="token budget of a micro-batch")
    ap.add_argument("--baseline", action="store_true", help="also measure the in-memory RecordSet path")
    ap.add_argument("--data-dir", default=str(ROOT / "bench" / "_data_stream"), help="where shards are generated")
    ap.add_argument("--out", default=None)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--records", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--loader", default="stream", help=argparse.SUPPRESS)
    ap.add_argument("--images", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.workers = args.workers[0]
        print(json.dumps(child(args)))
        return
    base = Path(args.data_dir)
    rows = []
    plan = []
    for n in args.sizes:
        plan += [(n, "stream", w, False) for w in args.workers]
        if args.baseline:
            plan.append((n, "memory", 0, False))
    for n in args.image_sizes:
        plan += [(n, "stream", w, True) for w in args.workers]
    for i, (n, loader, w, images) in enumerate(plan, 1):
        t = time.perf_counter()
        d = (write_image_shards if images else write_text_shards)(base / f"{'img' if images else 'text'}-{n}", n)
        gen = time.perf_counter() - t
        r = run_child(d, n, loader, w, images, args.measure_images if images else args.measure, args.budget)
        r["generate_s"] = gen
        rows.append(r)
        print(f"[{i}/{len(plan)}] {'image' if images else 'text'} {n} {loader} w={w}: "
              f"rss {r['peak_rss_mib']:.0f} MiB, start-up {r['startup_s']:.2f} s, "
              f"{r['records_per_s_per_worker']:.0f} rec/s/worker", file=sys.stderr, flush=True)
    print(f"\n{'case':<8}{'records':>10}{'loader':>8}{'workers':>8}{'peak RSS MiB':>14}{'child RSS':>12}"
          f"{'start-up s':>12}{'rec/s/worker':>14}{'tok/s/worker':>14}{'tok/rec':>9}")
    for r in rows:
        print(f"{'image' if r['images'] else 'text':<8}{r['records']:>10,}{r['loader']:>8}{r['workers']:>8}"
              f"{r['peak_rss_mib']:>14.0f}{r['peak_rss_worker_mib']:>12.0f}{r['startup_s']:>12.2f}"
              f"{r['records_per_s_per_worker']:>14.0f}{r['tokens_per_s_per_worker']:>14.0f}"
              f"{r['tokens_per_record']:>9.0f}")
    text = [r for r in rows if not r["images"] and r["loader"] == "stream" and r["workers"] == args.workers[0]]
    if len(text) > 1:
        lo, hi = min(text, key=lambda r: r["records"]), max(text, key=lambda r: r["records"])
        print(f"\npeak RSS {hi['records']:,} / {lo['records']:,} records: {hi['peak_rss_mib'] / lo['peak_rss_mib']:.2f}x "
              f"(target <= 1.3x); start-up {hi['startup_s']:.2f} s vs {lo['startup_s']:.2f} s")
    step_rate = 78_488   # tok/s, moca packed Stage 1 step of the 3B slice on one H100 (bench/results/h100-2026-11-26)
    for kind in (False, True):
        rs = [r for r in rows if r["images"] == kind and r["loader"] == "stream"]
        if rs:
            per = min(r["tokens_per_s_per_worker"] for r in rs if r["workers"] == min(x["workers"] for x in rs))
            print(f"{'image' if kind else 'text'} records: {per:,.0f} tok/s per worker -> "
                  f"{-(-step_rate // per):.0f} workers per H100 to feed {step_rate:,} tok/s")
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" /
                                           f"data-stream-{socket.gethostname()}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": socket.gethostname(), "cpus": os.cpu_count(),
                               "loadavg": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
