"""Shared benchmark harness: timing, peak memory, peers, and reports (table of ratios, JSON, PNG).

A benchmark script defines cases and hands them to :func:`run_cases`::

    cases = [Case("naive torch", setup_naive), Case("moca triton", setup_ours)]
    run_cases("masked_patch_loss fwd+bwd", cases, flops=..., bytes_moved=..., baseline="naive torch")

``setup()`` allocates inputs and returns a zero-argument function that does the timed work. Each case runs
in isolation: its inputs are freed before the next case, peak memory is measured above what was allocated
after setup, and a case that fails (out of memory, peer missing) is reported with its reason, not dropped.

Timing (:func:`time_call`): after warm-up, on a GPU, a call estimated under ``GRAPH_BELOW_MS`` (2 ms: every
sub-millisecond op and the ~1 ms attention forward, so a variant near 1 ms and its baseline use the same timer)
is timed by CUDA-graph replays (``triton.testing.do_bench_cudagraph``: ``GRAPH_SAMPLES`` = 10 replays of one
graph holding as many calls as fill ``GRAPH_REP_MS`` = 50 ms, each sample the mean over those calls, so launch
gaps and host jitter stay out and a sample averages >= 25 calls); a call that cannot be captured (a host sync,
a stream the graph does not see) falls back to CUDA events with at least ``MIN_EVENT_REPS`` = 100 timed calls
and ``MIN_EVENT_MS`` = 200 ms of them for sub-2 ms calls, so a +-3% noise cannot decide a comparison. Longer
calls are timed with CUDA events, ``rep`` calls. Median and 20th/80th percentiles of the samples are reported,
and which timer made them (``Result.timer``). ``MOCA_BENCH_CUDAGRAPH=0`` turns graph timing off. On CPU a wall
clock, unchanged, for smoke runs only. Benchmarks are never run by the test suite's assertions on timing.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    setup: Callable[[], Callable[[], object]]
    note: str = ""
    graph: Optional[bool] = None   # False: never a CUDA graph (the op syncs with the host); see time_call


@dataclass
class Result:
    name: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    peak_extra_gib: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    error: Optional[str] = None
    note: str = ""
    timer: str = ""


@dataclass
class Report:
    title: str
    device: str
    shape: Dict[str, object]
    flops: Optional[float]
    bytes_moved: Optional[float]
    baseline: Optional[str]
    results: List[Result] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment() -> Dict[str, str]:
    from importlib import metadata

    env = {"torch": torch.__version__, "python": platform.python_version()}
    # installed versions from package metadata, without importing (transformers alone takes seconds to import)
    for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("liger_kernel", "liger-kernel"),
                      ("cut_cross_entropy", "cut-cross-entropy"), ("inf_cl", "inf-cl")):
        for name in (dist, mod):
            try:
                env[mod] = metadata.version(name)
                break
            except Exception:
                continue
    if torch.cuda.is_available():
        env["cuda"] = str(torch.version.cuda)
    return env


def peer(module: str) -> Optional[str]:
    """None when ``module`` imports, else the reason it does not (to report instead of a number)."""
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:
        return f"{module} not available ({type(exc).__name__}: {str(exc)[:120]})"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


GRAPH_BELOW_MS = 2.0   # calls estimated shorter than this are timed by CUDA-graph replays
GRAPH_REP_MS = 50      # do_bench_cudagraph's rep: each of its samples averages the calls that fill this many ms
GRAPH_SAMPLES = 10     # samples per do_bench_cudagraph call (triton's n_retries)
MIN_EVENT_REPS = 100   # event timing of a sub-GRAPH_BELOW_MS call (graph capture failed): at least this many calls
MIN_EVENT_MS = 200.0   # ... and at least this many milliseconds of timed calls


@dataclass
class Timing:
    times: List[float]      # per-call milliseconds (graph samples: the mean of the calls in one replay)
    timer: str              # "cudagraph", "events" or "wall" (CPU); "events (...)" says why not the graph
    calls: int = 0          # calls timed in all


def graphs_enabled() -> bool:
    return os.environ.get("MOCA_BENCH_CUDAGRAPH", "1").strip() != "0"


def timer_plan(estimate_ms: float, rep: int, graphs: bool = True) -> tuple:
    """(timer, timed calls) for a CUDA call of about ``estimate_ms``: "cudagraph" (calls per sample) under
    ``GRAPH_BELOW_MS`` when graphs are allowed; else "events" with ``rep`` calls, raised for a short call to at
    least ``MIN_EVENT_REPS`` calls and ``MIN_EVENT_MS`` ms so that a few slow calls cannot move the median."""
    est = max(float(estimate_ms), 1e-4)
    if est < GRAPH_BELOW_MS:
        if graphs:
            return "cudagraph", max(1, int(GRAPH_REP_MS / est))
        return "events", max(rep, MIN_EVENT_REPS, int(math.ceil(MIN_EVENT_MS / est)))
    return "events", rep


def _cudagraph_samples(fn: Callable[[], object]) -> List[float]:
    from triton.testing import do_bench_cudagraph

    return list(do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="all"))


def time_call(fn: Callable[[], object], warmup: int = 5, rep: int = 30, max_seconds: float = 20.0,
              graph: Optional[bool] = None) -> Timing:
    """Per-call milliseconds of ``fn`` after warm-up, and the timer that made them (module docstring).
    ``graph``: None follows ``MOCA_BENCH_CUDAGRAPH`` (default on), False forces events (ops known to sync with
    the host), True allows graphs regardless of the variable."""
    for _ in range(warmup):
        fn()
    _sync()
    if not torch.cuda.is_available():
        times, start_all = [], time.perf_counter()
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
                break
        return Timing(times, "wall", len(times))
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        fn()
    b.record()
    b.synchronize()
    estimate = a.elapsed_time(b) / 3
    allowed = graphs_enabled() if graph is None else graph
    timer, n = timer_plan(estimate, rep, allowed)
    label = "events"
    if timer == "cudagraph":
        try:
            samples = _cudagraph_samples(fn)
            return Timing(samples, "cudagraph", n * len(samples))
        except Exception as exc:  # not capturable (host sync, foreign stream): events, enough of them
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            fn()  # raises here (a real failure, reported by the caller) if the failed capture broke anything
            _sync()
            timer, n = timer_plan(estimate, rep, False)
            label = f"events (graph capture failed: {type(exc).__name__})"
    times = []
    start_all = time.perf_counter()
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    return Timing(times, label, len(times))


def time_fn(fn: Callable[[], object], warmup: int = 5, rep: int = 30, max_seconds: float = 20.0,
            graph: Optional[bool] = None) -> List[float]:
    """Per-call milliseconds of ``fn`` after warm-up (:func:`time_call`'s samples)."""
    return time_call(fn, warmup, rep, max_seconds, graph).times


def stats(timing: Timing) -> Dict[str, object]:
    """median / p20 / p80 ms, samples, calls and timer of a :class:`Timing` (for JSON)."""
    t = timing.times
    qs = statistics.quantiles(t, n=5) if len(t) >= 2 else [t[0]] * 4
    return dict(median_ms=statistics.median(t), p20_ms=qs[0], p80_ms=qs[3], samples=len(t), calls=timing.calls,
                timer=timing.timer)


def kernel_breakdown(fn: Callable[[], object], calls: int = 3, top: int = 10, title: str = "") -> List[tuple]:
    """Device time per kernel of one call of ``fn`` (torch.profiler, averaged over ``calls`` calls after one
    warm-up), printed longest first; returns [(kernel name, ms per call, launches per call)].

    Where the time goes inside a fused op (which kernel, which GEMM), without touching the op's code. On CPU
    the profiler sees operators, not kernels: the table is a smoke test there.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        _sync()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        if not torch.cuda.is_available():
            t = evt.self_cpu_time_total
        if t and t > 0:
            rows.append((evt.key, t / 1e3 / calls, evt.count / calls))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"  kernel breakdown{(' of ' + title) if title else ''}: {total:.3f} ms per call on the "
          f"{'device' if torch.cuda.is_available() else 'CPU'}")
    for name, ms, n in rows[:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        print(f"    {ms:9.3f} ms {100 * ms / total if total else 0:5.1f}%  x{n:<5.4g} {short}")
    return rows


def measure(case: Case, warmup: int, rep: int, flops: Optional[float], bytes_moved: Optional[float]) -> Result:
    if torch.cuda.is_available():  # free the last case's device memory (on CPU gc.collect costs ~0.5 s a case)
        gc.collect()
        torch.cuda.empty_cache()
    res = Result(case.name, note=case.note)
    try:
        fn = case.setup()
        _sync()
        # one call to compile / autotune before the memory measurement
        fn()
        _sync()
        if torch.cuda.is_available():
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            _sync()
            res.peak_extra_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        timing = time_call(fn, warmup, rep, graph=case.graph)
        st = stats(timing)
        res.median_ms, res.p20_ms, res.p80_ms, res.timer = st["median_ms"], st["p20_ms"], st["p80_ms"], timing.timer
        if flops:
            res.tflops = flops / (res.median_ms * 1e-3) / 1e12
        if bytes_moved:
            res.gbps = bytes_moved / (res.median_ms * 1e-3) / 1e9
    except Exception as exc:  # report, never drop
        msg = f"{type(exc).__name__}: {exc}"
        res.error = msg.splitlines()[0][:200]
    finally:
        fn = None
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
    return res


def run_cases(title: str, cases: List[Case], *, shape: Dict[str, object], flops: Optional[float] = None,
              bytes_moved: Optional[float] = None, baseline: Optional[str] = None, warmup: int = 5,
              rep: int = 30, out: Optional[Path] = None, tag: Optional[str] = None) -> Report:
    """Measure every case, print a table with ratios against ``baseline``, save JSON and a PNG."""
    report = Report(title, device_name(), shape, flops, bytes_moved, baseline, env=environment())
    for case in cases:
        r = measure(case, warmup, rep, flops, bytes_moved)
        report.results.append(r)
        print(f"  {case.name:<42s} " + (f"{r.median_ms:9.3f} ms" if r.median_ms is not None else f"-- {r.error}"),
              flush=True)
        save(report, out, tag, plot=False)  # after every case: a run cut off by its time limit keeps what it did
    print(format_table(report))
    save(report, out, tag)
    return report


def format_table(report: Report) -> str:
    base = next((r for r in report.results if r.name == report.baseline and r.median_ms), None)
    lines = [f"\n{report.title} on {report.device}  " + ", ".join(f"{k}={v}" for k, v in report.shape.items())]
    head = f"| {'case':<40} | {'median ms':>9} | {'p20-p80 ms':>15} | {'TFLOP/s':>7} | {'GB/s':>7} | {'extra GiB':>9} | {'speed-up':>8} |"
    lines += [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in report.results:
        if r.median_ms is None:
            lines.append(f"| {r.name:<40} | {'--':>9} | {'':>15} | {'':>7} | {'':>7} | {'':>9} | {'':>8} | {r.error}")
            continue
        speed = f"{base.median_ms / r.median_ms:.2f}x" if base else ""
        lines.append(
            f"| {r.name:<40} | {r.median_ms:9.3f} | {r.p20_ms:6.3f}-{r.p80_ms:<8.3f} | "
            f"{(f'{r.tflops:.0f}' if r.tflops else ''):>7} | {(f'{r.gbps:.0f}' if r.gbps else ''):>7} | "
            f"{(f'{r.peak_extra_gib:.2f}' if r.peak_extra_gib is not None else ''):>9} | {speed:>8} |")
    return "\n".join(lines)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-").replace("--", "-")


def save(report: Report, out: Optional[Path] = None, tag: Optional[str] = None, plot: bool = True) -> Path:
    out = Path(out) if out else RESULTS_DIR / ("scratch" if not torch.cuda.is_available() else _slug(report.device))
    out.mkdir(parents=True, exist_ok=True)
    stem = _slug(tag or report.title)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(asdict(report), indent=2))
    if not plot or os.environ.get("MOCA_BENCH_PLOTS", "1").strip() == "0":  # smoke: matplotlib costs seconds
        return path
    try:
        _plot(report, out / f"{stem}.png")
    except Exception as exc:  # matplotlib missing or headless trouble: the JSON still stands
        print(f"  (no plot: {exc})")
    return path


def _plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if r.median_ms is not None]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(ok) + 1.8))
    names = [r.name for r in ok]
    axes[0].barh(names, [r.median_ms for r in ok], xerr=[[r.median_ms - r.p20_ms for r in ok],
                                                         [r.p80_ms - r.median_ms for r in ok]], color="tab:blue")
    axes[0].set_xlabel("median ms (lower is better)")
    axes[0].invert_yaxis()
    mem = [r.peak_extra_gib or 0.0 for r in ok]
    axes[1].barh(names, mem, color="tab:orange")
    axes[1].set_xlabel("peak extra memory, GiB")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(f"{report.title}\n{report.device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="headline shape only, fewer repetitions")
    p.add_argument("--out", type=Path, default=None, help="directory for JSON and PNG (default bench/results/<device>)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=30)
    return p


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def floor_ms(flops: float = 0.0, bytes_moved: float = 0.0, tflops_peak: float = 738.0, tbps_peak: float = 3.0) -> float:
    """max(compute, memory) time at the H100 ceilings of DESIGN.md section 4, in ms."""
    return max(flops / (tflops_peak * 1e12), bytes_moved / (tbps_peak * 1e12)) * 1e3 if (flops or bytes_moved) else math.nan
