"""Test setup: Triton runs interpreted on CPU-only machines; GPU tests are marked and skipped without CUDA.

TRITON_INTERPRET must be set before any Triton kernel module is imported (triton reads it when a kernel is
decorated), so it is set here, at collection, and only when no GPU is present.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import triton now, under that setting: its own library functions (tl.sum, ...) are decorated at import,
    # and a first import inside a test that sets TRITON_INTERPRET=0 would leave them compiled-only, breaking
    # every interpreted kernel run after it (seen with test_dispatch.py run before the kernel tests).
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass
else:
    # One config per kernel instead of timing several: the GPU tests check results, not speed.
    os.environ.setdefault("MOCA_KERNELS_AUTOTUNE", "0")
# Tests choose backends explicitly; a developer's MOCA_KERNELS_IMPL must not change what they test.
os.environ.pop("MOCA_KERNELS_IMPL", None)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernel tests run on: cuda when present, else cpu (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the models there
    are tiny, and one thread is several times faster than two on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
