"""moca model/trainer tests run every kernel through its torch backend: they test the model and the trainer,
not the kernels (those have their own tests), and interpreted Triton would make CPU runs very slow."""

import pytest


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")
