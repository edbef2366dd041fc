"""The benchmarks as a pytest-benchmark suite (``pytest bench/ --benchmark-only``).

Each op is timed against its peers: the peer is a test parameter, one benchmark group per op and shape, so
pytest-benchmark's table (and ``--benchmark-json`` / ``--benchmark-compare``) sets peers side by side and runs
across commits. The cases come from the bench scripts' own builders (``bench_*.py``: ``cases_for``,
``headline_cases``, ...), so the suite and ``bench/gpu_run.sh`` time the same work.

- GPU cases (``*_gpu``) skip without CUDA; each timed call ends in ``torch.cuda.synchronize()``.
- CPU cases (``*_cpu``: attention mask metadata, the ops' torch backends, data loading) run anywhere, so a
  regression shows on any machine: ``pytest bench/ --benchmark-only -k cpu --benchmark-json=run.json``.
- A peer that is missing (not installed, no CUDA extension, out of memory) skips with the reason.
- ``--sweep``: also the scaling shapes of an op where they are cheap to add (info_nce B = M = 4096 ... 262144).
- ``python bench/plot.py run.json``: the tables (ratios to the fastest peer) and a PNG per group.

Nothing here imports a GPU-only peer at collection: peers are imported by the case's setup, inside the test.
The project's own test run (``python -m pytest``, testpaths = tests) does not collect this folder.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HAS_CUDA = torch.cuda.is_available()
# the peer errors that mean "this peer cannot run here", reported as a skip with the reason
UNAVAILABLE = (ImportError, NotImplementedError, torch.cuda.OutOfMemoryError)


def pytest_addoption(parser):
    group = parser.getgroup("moca bench")
    group.addoption("--sweep", action="store_true", default=False,
                    help="also benchmark the ops' scaling shapes (info_nce B = M = 4096 ... 262144 on GPU)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per case (default: 20 on GPU, 10 on CPU)")


@pytest.fixture
def sweep(request) -> bool:
    return request.config.getoption("--sweep")


def need_cuda():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")


@pytest.fixture
def time_case(benchmark, request):
    """``time_case(case, group, **extra)``: time one ``bench.harness.Case`` with pytest-benchmark.

    The case's setup builds the inputs and returns the zero-argument call; a setup that raises (the harness's
    way of saying a peer is missing) or a first call that raises ImportError / NotImplementedError / out of
    memory skips the test with that reason; any other error fails it. One untimed call compiles and autotunes,
    then ``rounds`` timed calls, each followed by a CUDA synchronisation on a GPU."""
    rounds = request.config.getoption("--bench-rounds")

    def run(case, group, **extra):
        benchmark.group = group
        benchmark.extra_info.update(peer=case.name, note=case.note, **{k: str(v) for k, v in extra.items()})
        try:
            fn = case.setup()
        except Exception as exc:  # the peer is not there (harness: setup raises with the reason)
            pytest.skip(f"{case.name}: {type(exc).__name__}: {exc}".splitlines()[0][:300])
        sync = torch.cuda.synchronize if HAS_CUDA else (lambda: None)
        try:
            fn()
            sync()
        except UNAVAILABLE as exc:
            pytest.skip(f"{case.name}: {type(exc).__name__}: {exc}".splitlines()[0][:300])

        def call():
            out = fn()
            sync()
            return out

        n = rounds or (20 if HAS_CUDA else 10)
        return benchmark.pedantic(call, rounds=n, iterations=1, warmup_rounds=1 if HAS_CUDA else 0)

    return run
